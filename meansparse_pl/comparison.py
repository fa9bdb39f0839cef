"""Compare models on the same samples with the same attacks: a gain only counts against an equal-budget control.

Every model (base, control, post-hoc MeanSparse, per-site MeanSparse, fine-tuned MeanSparse, ...) is attacked on
the same samples with the same seeds, so each difference to the control is paired: its standard error comes from
the samples on which the two disagree (:func:`~meansparse_pl.attacks.paired_gap`). Best known is the per-sample
worst case over every attack, the cascade included (each cascade attack runs only on the samples every earlier one
failed to break). :class:`ModelComparison` is the result, in the manner of the alpha search's: :meth:`table`
(Markdown), :meth:`to_json` / :meth:`from_json` (lossless: the verdicts are kept), :meth:`plot` (``ax=None ->
Figure``) and :meth:`metrics` for the user's Lightning loggers.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.attacks import (
    PerSample,
    column_verdicts,
    decode_verdicts,
    encode_verdicts,
    paired_gap,
)
from meansparse_pl.config import AttackConfig, DiagnosticsConfig, ThreatModel
from meansparse_pl.diagnostics import Diagnostics, diagnose
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import accuracy
from meansparse_pl.ops import alphas_of, operators
from meansparse_pl.robustness import RobustnessEvaluation

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

# what counts as a gain: at least this many points of best known above the control, beyond this many paired
# standard errors, losing at most this many points of clean accuracy
TARGET_GAIN = 1.0
TARGET_STANDARD_ERRORS = 2.0
TARGET_CLEAN_LOSS = 0.5


@dataclass
class ModelComparison:
    """Per model (label) and attack column, which samples stayed correct; everything else is computed from it."""

    norm: str
    eps: float
    control: str
    attacks: list[str]  # the full columns (composites included), as the user named them
    cascade: list[str]  # attacks of the best-known column only, in their order
    per_sample: dict[str, dict[str, PerSample]]  # label -> atomic attack -> sample -> correct
    settings: dict[str, str] = field(default_factory=dict)  # label -> how its operators were set
    seconds: dict[str, float] = field(default_factory=dict)  # label -> evaluation wall time
    diagnostics: Diagnostics | None = None  # the indicators of attack failure, per model

    def __post_init__(self) -> None:
        if self.control not in self.per_sample:
            raise ConfigurationError(
                f"the control {self.control!r} is not one of the compared models {sorted(self.per_sample)}; "
                "name one of their labels as the control."
            )

    # ------------------------------------------------------------------------------------------ numbers
    @property
    def labels(self) -> list[str]:
        return list(self.per_sample)

    @property
    def num_samples(self) -> int:
        return len(self.per_sample[self.control]["clean"]) if "clean" in self.per_sample[self.control] else 0

    def verdicts(self, label: str, column: str) -> PerSample:
        """Per-sample verdicts of one column: an attack, a composite (its parts ANDed) or ``best_known``."""
        return column_verdicts(self.per_sample[label], column)

    def accuracy(self, label: str, column: str) -> float:
        return accuracy(self.verdicts(label, column))

    def difference(self, label: str, column: str = "best_known") -> tuple[float, float]:
        """``label`` minus the control on ``column``, in points, and its paired standard error."""
        return paired_gap(self.verdicts(label, column), self.verdicts(self.control, column))

    def meets_target(self, label: str) -> bool:
        """Best known at least TARGET_GAIN points above the control, beyond TARGET_STANDARD_ERRORS paired standard
        errors, with at most TARGET_CLEAN_LOSS points of clean accuracy lost."""
        gain, error = self.difference(label)
        clean = self.difference(label, "clean")[0] if "clean" in self.per_sample[label] else 0.0
        return (
            label != self.control
            and gain >= TARGET_GAIN
            and gain > TARGET_STANDARD_ERRORS * error
            and clean >= -TARGET_CLEAN_LOSS
        )

    def first_breaks(self, label: str) -> dict[str, float]:
        """Per attack, in the order they ran, the points of samples it broke that no earlier attack had broken
        (of those correct when clean): what each attack adds to best known."""
        columns = self.per_sample[label]
        alive = dict(columns.get("clean") or dict.fromkeys(next(iter(columns.values())), True))
        out: dict[str, float] = {}
        for name, verdicts in columns.items():
            if name == "clean":
                continue
            broken = [i for i, ok in alive.items() if ok and not verdicts[i]]
            for i in broken:
                alive[i] = False
            out[name] = 100.0 * len(broken) / max(len(alive), 1)
        return out

    # ---------------------------------------------------------------------------------------- rendering
    def _columns(self) -> list[str]:
        return [*self.attacks, *self.cascade, "best_known"]

    def _signed(self, label: str, column: str) -> str:
        gap, error = self.difference(label, column)
        return f"{gap:+.2f} ± {error:.2f}"

    def table(self) -> str:
        """Markdown: accuracy per model and column, differences to the control with paired standard errors,
        what each attack added to best known, and the verdict on the target, stated plainly either way."""
        labels = self.labels
        heads = [f"{lab} ({self.settings[lab]})" if self.settings.get(lab) else lab for lab in labels]
        lines = ["| attack | " + " | ".join(heads) + " |", "|---|" + "---:|" * len(labels)]
        for column in self._columns():
            name = "**best known (per-sample worst case)**" if column == "best_known" else column
            if column in self.cascade:
                name += " (cascade)"
            cells = [f"{self.accuracy(lab, column):.2f}" for lab in labels]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"{self.num_samples} samples, {self.norm} eps = {self.eps:g}, the same samples and attack seeds for "
            "every model; accuracies in percent."
            + (
                f" The cascade ({', '.join(self.cascade)}) runs each attack only on the samples no earlier attack "
                "had broken, so a cascade row is the worst case up to and including that attack."
                if self.cascade
                else ""
            ),
            "",
            f"Against the control ({self.control}), paired over the same samples (difference ± standard error, "
            "points):",
            "",
            "| model | clean | best known | target met |",
            "|---|---:|---:|:---:|",
        ]
        for lab in labels:
            if lab != self.control:
                met = "yes" if self.meets_target(lab) else "no"
                lines.append(
                    f"| {lab} | {self._signed(lab, 'clean')} | {self._signed(lab, 'best_known')} | {met} |"
                )
        order = [a for a in self.per_sample[labels[0]] if a != "clean"]
        lines += [
            "",
            "What each attack adds to best known (points of samples it broke first, in the order the attacks ran):",
            "",
            "| model | " + " | ".join(order) + " |",
            "|---|" + "---:|" * len(order),
        ]
        for lab in labels:
            adds = self.first_breaks(lab)
            lines.append(f"| {lab} | " + " | ".join(f"{adds.get(a, 0.0):.2f}" for a in order) + " |")
        lines += ["", self.conclusion()]
        if self.diagnostics is not None:
            lines += ["", self.diagnostics.table()]
        return "\n".join(lines)

    def conclusion(self) -> str:
        """One sentence on the target: which models meet it, or that none does, with the best one's numbers."""
        others = [lab for lab in self.labels if lab != self.control]
        winners = [lab for lab in others if self.meets_target(lab)]
        rule = (
            f"at least +{TARGET_GAIN:g} point of best known over the control beyond {TARGET_STANDARD_ERRORS:g} "
            f"paired standard errors, losing at most {TARGET_CLEAN_LOSS:g} points of clean accuracy"
        )
        if not others:
            return "Only the control was evaluated; there is nothing to compare."
        if winners:
            return f"Target ({rule}) met by: {', '.join(winners)}."
        best = max(others, key=lambda lab: self.difference(lab)[0])
        gain, error = self.difference(best)
        return (
            f"Target ({rule}) NOT met by any model: the best, {best}, is {gain:+.2f} ± {error:.2f} points of best "
            f"known against the control."
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Each model's difference to the control in best known and clean accuracy, with error bars of two paired
        standard errors, the zero line and the target gain. With ``ax`` it draws there and returns its figure;
        without, it builds a standalone Figure (pyplot and the backend are never touched)."""
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(7.5, 1.2 + 0.7 * len(self.labels)))
            ax = fig.add_subplot(1, 1, 1)
        figure = ax.get_figure()
        others = [lab for lab in self.labels if lab != self.control]
        for offset, (column, colour, name) in enumerate(
            (("best_known", "tab:red", "best known"), ("clean", "tab:blue", "clean"))
        ):
            points = [self.difference(lab, column) for lab in others]
            ax.errorbar(
                [p[0] for p in points],
                [k + 0.15 * (offset * 2 - 1) for k in range(len(others))],
                xerr=[TARGET_STANDARD_ERRORS * p[1] for p in points],
                fmt="o",
                color=colour,
                capsize=4,
                label=f"{name} (± {TARGET_STANDARD_ERRORS:g} paired SE)",
            )
        ax.axvline(0.0, color="black", linewidth=1)
        ax.axvline(
            TARGET_GAIN, color="tab:red", linestyle="--", linewidth=1, label=f"target +{TARGET_GAIN:g}"
        )
        ax.set_yticks(range(len(others)))
        ax.set_yticklabels(
            [f"{lab}\n{self.accuracy(lab, 'best_known'):.1f}% best known" for lab in others], fontsize=8
        )
        ax.set_xlabel(f"difference from the control '{self.control}' (accuracy points)")
        ax.set_title(
            f"{self.num_samples} samples, {self.norm} eps={self.eps:g}; control best known "
            f"{self.accuracy(self.control, 'best_known'):.1f}%",
            fontsize=9,
        )
        # below the axes: inside, it hides an error bar whichever corner it takes
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3, frameon=False)
        ax.grid(axis="x", alpha=0.3)
        if hasattr(figure, "tight_layout"):
            figure.tight_layout()
        return figure  # type: ignore[return-value]

    def metrics(self) -> list[dict[str, float]]:
        """Every number under a flat name, as one logger row: ``compare/<model>/<column>`` and
        ``compare/<model>/vs_control/...``."""
        out: dict[str, float] = {}
        for lab in self.labels:
            for column in self._columns():
                out[f"compare/{lab}/{column}"] = self.accuracy(lab, column)
            if lab != self.control:
                for column in ("clean", "best_known"):
                    gap, error = self.difference(lab, column)
                    out[f"compare/{lab}/vs_control/{column}"] = gap
                    out[f"compare/{lab}/vs_control/{column}_se"] = error
        if self.diagnostics is not None:
            out.update(self.diagnostics.metrics("compare"))
        return [out]

    def to_json(self) -> dict[str, Any]:
        diagnostics = self.diagnostics.report_fields() if self.diagnostics is not None else {}
        return diagnostics | {
            "norm": self.norm,
            "eps": self.eps,
            "control": self.control,
            "attacks": self.attacks,
            "cascade": self.cascade,
            "num_samples": self.num_samples,
            "settings": self.settings,
            "seconds": self.seconds,
            "accuracy": {lab: {c: self.accuracy(lab, c) for c in self._columns()} for lab in self.labels},
            "versus_control": {
                lab: {
                    c: dict(zip(("difference", "standard_error"), self.difference(lab, c), strict=True))
                    for c in ("clean", "best_known")
                }
                | {"target_met": self.meets_target(lab)}
                for lab in self.labels
                if lab != self.control
            },
            "first_breaks": {lab: self.first_breaks(lab) for lab in self.labels},
            "conclusion": self.conclusion(),
            "per_sample": {
                lab: {a: encode_verdicts(v) for a, v in columns.items()}
                for lab, columns in self.per_sample.items()
            },
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ModelComparison:
        return cls(
            norm=data["norm"],
            eps=float(data["eps"]),
            control=data["control"],
            attacks=list(data["attacks"]),
            cascade=list(data["cascade"]),
            per_sample={
                lab: {a: decode_verdicts(v) for a, v in columns.items()}
                for lab, columns in data["per_sample"].items()
            },
            settings=dict(data.get("settings") or {}),
            seconds={k: float(v) for k, v in (data.get("seconds") or {}).items()},
            diagnostics=Diagnostics.from_report(data),
        )


def compare_models(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    *,
    control: str,
    attacks: AttackConfig,
    threat: ThreatModel,
    batch_size: int = 256,
    seed: int = 0,
    state_dir: str | os.PathLike | None = None,
    trainer: pl.Trainer | None = None,
    distributed: bool | None = None,
    settings: Mapping[str, str] | None = None,
    diagnostics: DiagnosticsConfig | None = DiagnosticsConfig(),
) -> ModelComparison:
    """Attack every model on every sample of ``dataset`` with the same attacks and seeds; ``control`` is the label
    every other model is compared with. Each model has its own resume state in ``state_dir``. ``diagnostics``
    (None: none) runs the indicators of attack failure on each model (no collective: every process computes the
    same)."""
    if control not in models:
        raise ConfigurationError(
            f"the control {control!r} is not one of the compared models {sorted(models)}; name one of their "
            "labels as the control."
        )
    evaluation = RobustnessEvaluation(attacks, threat, diagnostics=None, seed=seed, batch_size=batch_size)
    per_sample: dict[str, dict[str, PerSample]] = {}
    seconds: dict[str, float] = {}
    for label, model in models.items():
        started = time.perf_counter()
        state = None if state_dir is None else os.path.join(state_dir, _state_name(label))
        where = {"trainer": trainer, "state_path": state, "distributed": distributed}
        verdicts = evaluation.attack(model, dataset, [(label, None)], **where)  # alpha as the model has it
        per_sample[label] = evaluation.columns(verdicts, label)
        seconds[label] = round(time.perf_counter() - started, 1)
    found = None
    if diagnostics is not None:
        found = diagnose_models(models, dataset, per_sample, threat, attacks, diagnostics, seed)
    return ModelComparison(
        norm=threat.norm,
        eps=threat.eps,
        control=control,
        attacks=list(attacks.names),
        cascade=list(attacks.cascade),
        per_sample=per_sample,
        settings=dict(settings or {}),
        seconds=seconds,
        diagnostics=found,
    )


def operator_setting(model: nn.Module) -> str:
    """How a compared model's operators are set, for the report's column heads."""
    if not operators(model):
        return "no operators"
    values = alphas_of(model)
    if len(set(values)) > 1:
        return "alpha per operator"
    return f"alpha {values[0]:g}"


def _state_name(label: str) -> str:
    """A compared model's resume-state file name (its label hashed: any label is a safe file name)."""
    return f"compare-{hashlib.sha256(label.encode()).hexdigest()[:12]}.state"


def diagnose_models(
    models: Mapping[str, nn.Module],
    dataset: Dataset,
    per_sample: Mapping[str, Mapping[str, PerSample]],
    threat: ThreatModel,
    attacks: AttackConfig,
    config: DiagnosticsConfig,
    seed: int,
) -> Diagnostics:
    """The indicators of attack failure of every compared model (each its own variant, labelled as in the
    comparison), its per-sample indicators read from its verdicts."""
    found = Diagnostics(subset=min(config.subset, len(dataset)))  # type: ignore[arg-type]
    for label, model in models.items():
        part = diagnose(
            model,
            dataset,
            threat=threat,
            attacks=attacks,
            config=config,
            variants={label: None},
            seed=seed,
            verdicts={(label, threat.eps): per_sample[label]},
        )
        found.indicators += part.indicators
        found.seconds = round(found.seconds + part.seconds, 2)
    return found
