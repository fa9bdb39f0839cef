"""The result of an alpha search, in the manner of Lightning's learning-rate finder: a table of accuracies per
alpha and attack, :meth:`~AlphaSearchResult.suggestion` (the alpha the rule picks),
:meth:`~AlphaSearchResult.plot` (``ax=None -> Figure``, no global matplotlib state), a way to apply the answer
(:meth:`~AlphaSearchResult.apply_to`), and a lossless JSON form (:meth:`~AlphaSearchResult.to_json` /
:meth:`~AlphaSearchResult.from_json`) that keeps the per-sample verdicts the paired statistics need.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from meansparse_pl.attacks import (
    BEST_KNOWN_COLUMNS,
    COMPOSITE_ATTACKS,
    PerSample,
    column_verdicts,
    decode_verdicts,
    encode_verdicts,
    paired_gap,
    worst_case,
)
from meansparse_pl.diagnostics import Diagnostics, alpha_variant
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import accuracy
from meansparse_pl.io import write_result
from meansparse_pl.ops import set_alpha

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

GRADIENT_MASKING_GAP = 1.0  # points by which BPDA may beat exact-gradient APGD before we flag masking


def criterion_column(criterion: str) -> str:
    """The result column a criterion ranks by."""
    return "worst_case" if criterion == "worst_case" else "apgd-ce"


@dataclass
class AlphaSearchResult:
    """Accuracies (percent) per alpha and attack, the rule that picks alpha, and flags worth a look.

    ``per_sample`` holds every verdict (alpha -> column -> sample -> correct): the table's accuracies, the
    paired standard errors of the one-standard-error rule and the plot's error bars all come from it.
    """

    alphas: list[float]
    attacks: list[str]
    accuracy: dict[float, dict[str, float]]  # alpha -> column -> accuracy
    criterion: str
    max_clean_drop: float
    eps: float
    norm: str
    num_samples: int
    flags: list[str] = field(default_factory=list)
    schedule: str = "exhaustive"
    # alpha -> held-out samples it was evaluated on; empty means every alpha saw all num_samples
    samples_per_alpha: dict[float, int] = field(default_factory=dict)
    # successive halving: per round, the samples, the alphas evaluated and the alphas kept
    rounds: list[dict[str, Any]] = field(default_factory=list)
    selection: str = "highest"
    per_sample: dict[float, dict[str, PerSample]] = field(default_factory=dict, repr=False)
    # per-site search (schedule PerSite): one alpha per operator, and each step of the coordinate ascent
    site_alphas: list[float] | None = None
    site_steps: list[dict[str, Any]] = field(default_factory=list)
    site_accuracy: dict[str, float] = field(default_factory=dict)  # the table row of site_alphas
    # the cheap indicators of attack failure at each alpha (variants "alpha=<a>"), which name masking causes
    diagnostics: Diagnostics | None = None

    # ------------------------------------------------------------------------------------------ facts
    def samples(self, alpha: float) -> int:
        return self.samples_per_alpha.get(alpha, self.num_samples)

    @property
    def finalists(self) -> list[float]:
        """The alphas measured on all ``num_samples`` samples: the only ones the rule chooses among."""
        return [a for a in self.alphas if self.samples(a) == self.num_samples]

    @property
    def evaluated_fraction(self) -> float:
        """Sample-alpha evaluations done, as a fraction of an exhaustive search's ``len(alphas) * num_samples``."""
        done = sum(self.samples(a) for a in self.alphas)
        return done / max(len(self.alphas) * self.num_samples, 1)

    @property
    def columns(self) -> list[str]:
        present = self.accuracy[self.alphas[0]]
        return [c for c in ["clean", *self.attacks, *COMPOSITE_ATTACKS, "worst_case"] if c in present]

    def criterion_per_sample(self, alpha: float) -> PerSample:
        """Per sample, whether ``alpha`` is correct under the criterion (all attacks, or APGD-CE)."""
        if alpha not in self.per_sample:
            raise ConfigurationError(
                "this result holds no per-sample verdicts (written by an older version); run the search again, "
                "or use selection 'highest'."
            )
        verdicts = self.per_sample[alpha]
        return verdicts["apgd-ce"] if self.criterion == "apgd" else worst_case(verdicts.values())

    def column_per_sample(self, alpha: float, column: str) -> PerSample | None:
        """Per-sample verdicts behind one table cell (None where the result holds none)."""
        verdicts = self.per_sample.get(alpha)
        if verdicts is None or not (
            column in verdicts or column in BEST_KNOWN_COLUMNS or column in COMPOSITE_ATTACKS
        ):
            return None
        return column_verdicts(verdicts, column)

    # ------------------------------------------------------------------------------------------- rule
    def rule(self) -> str:
        target = (
            "worst-case robust accuracy (per sample, over all attacks)"
            if self.criterion == "worst_case"
            else "APGD-CE accuracy (the paper's rule)"
        )
        eligible = (
            f"among alphas whose clean accuracy is at most {self.max_clean_drop:g} points below alpha = 0"
        )
        if self.selection == "smallest_within_error":
            return (
                f"smallest alpha whose {target} is within one paired standard error of the highest, {eligible} "
                "(one-standard-error rule)"
            )
        return f"highest {target} {eligible}; ties go to the smaller alpha"

    def eligible(self) -> list[float]:
        """The finalists whose clean accuracy is within ``max_clean_drop`` points of alpha = 0 (0 included)."""
        base_clean = self.accuracy[0.0]["clean"]
        return [
            a for a in self.finalists if self.accuracy[a]["clean"] >= base_clean - self.max_clean_drop - 1e-9
        ]

    def best_eligible(self) -> float:
        """The eligible alpha with the highest criterion accuracy; ties go to the smaller alpha."""
        column = criterion_column(self.criterion)
        return max(self.eligible(), key=lambda a: (self.accuracy[a][column], -a))

    def suggestion(self) -> float:
        """The alpha the rule picks (see :meth:`rule`)."""
        best = self.best_eligible()
        if self.selection == "highest":
            return best
        for alpha in sorted(
            self.eligible()
        ):  # the smallest alpha that the evidence does not tell from the best
            gap, error = self.gap_to(best, alpha)
            if gap <= error + 1e-9:
                return alpha
        return best  # unreachable: the best is within zero errors of itself

    def gap_to(self, best: float, alpha: float) -> tuple[float, float]:
        """Criterion accuracy of ``best`` minus that of ``alpha`` and its paired standard error (points)."""
        return paired_gap(self.criterion_per_sample(best), self.criterion_per_sample(alpha))

    def apply_to(self, model: nn.Module) -> float | list[float]:
        """Set the answer on ``model``: the per-site alphas of a per-site search, else the suggested alpha on every
        operator; returns what was set."""
        answer: float | list[float] = self.site_alphas if self.site_alphas is not None else self.suggestion()
        set_alpha(model, answer)
        return answer

    # -------------------------------------------------------------------------------------- rendering
    def table(self) -> str:
        chosen = self.suggestion()
        partial = self.schedule == "successive_halving"  # per_site runs the exhaustive search first
        extra = ["samples"] if partial else []
        header = "| alpha | " + " | ".join(self.columns + extra) + " |"
        lines = [header, "|" + "---:|" * (len(self.columns) + len(extra) + 1)]
        for a in self.alphas:
            mark = " **(chosen)**" if a == chosen else ""
            cells = " | ".join(f"{self.accuracy[a][c]:.2f}" for c in self.columns)
            if partial:
                cells += f" | {self.samples(a)}"
            lines.append(f"| {a:g}{mark} | {cells} |")
        notes = [
            "",
            f"{self.num_samples} held-out samples, {self.norm} eps = {self.eps:g}; accuracies in percent.",
            f"Rule: {self.rule()}. Chosen alpha: {chosen:g}.",
        ]
        if partial:
            notes.append(
                f"Successive halving: alphas dropped early were measured on fewer samples (column 'samples'); "
                f"the rule chose among the finalists {', '.join(f'{a:g}' for a in self.finalists)}; "
                f"{100 * self.evaluated_fraction:.0f}% of the sample-alpha evaluations of an exhaustive search."
            )
        if self.selection == "smallest_within_error" and chosen != self.best_eligible():
            gap, error = self.gap_to(self.best_eligible(), chosen)
            notes.append(
                f"The highest is alpha {self.best_eligible():g}; alpha {chosen:g} is {gap:.2f} points below it, "
                f"within one paired standard error ({error:.2f} points)."
            )
        notes += [f"WARNING: {flag}" for flag in self.flags]
        if self.diagnostics is not None:
            notes += ["", *self.diagnostics.brief()]
        return "\n".join(lines + notes + self._site_table())

    def _site_table(self) -> list[str]:
        """The per-site search: each step's sites, the alpha kept, the gain over the step before and its paired
        standard error, and the final per-operator alphas with their row of the table."""
        if self.site_alphas is None:
            return []
        lines = [
            "",
            f"Per-site search from alpha {self.suggestion():g} (coordinate ascent; a change is kept only when it beats "
            "the current choice by more than one paired standard error):",
            "",
            "| step | sites | alphas tried | kept | gain (points) | paired SE |",
            "|---:|---|---|---:|---:|---:|",
        ]
        for number, step in enumerate(self.site_steps):
            tried = ", ".join(f"{a:g}" for a in step["tried"])
            kept = f"{step['kept']:g}" + ("" if step["accepted"] else " (unchanged)")
            lines.append(
                f"| {number} | {', '.join(str(i) for i in step['sites'])} | {tried} | {kept} | "
                f"{step['gain']:+.2f} | {step['standard_error']:.2f} |"
            )
        row = " | ".join(f"{c}: {v:.2f}" for c, v in self.site_accuracy.items())
        lines += ["", f"Per-operator alphas: {', '.join(f'{a:g}' for a in self.site_alphas)} ({row})."]
        return lines

    def error_bar(self, alpha: float, column: str) -> float:
        """The paired standard error (points) of a cell's difference to alpha 0 on the same samples; 0 for alpha
        0 itself and where the result holds no per-sample verdicts."""
        cell, base = self.column_per_sample(alpha, column), self.column_per_sample(0.0, column)
        if alpha == 0.0 or cell is None or base is None:
            return 0.0
        return paired_gap(cell, base)[1]

    def plot(self, ax: Axes | None = None, suggest: bool = True) -> Figure:
        """Clean and robust accuracy against alpha, one line per column, with error bars (the paired standard
        error of each point's difference to alpha 0), the clean-accuracy limit of the rule, the alphas flagged
        for gradient masking and (``suggest``) the chosen alpha.

        Draws into ``ax`` when given (its figure is returned), else on a new standalone ``Figure``; pyplot and
        the matplotlib backend are never touched, so a notebook's settings stay as they are.
        """
        from matplotlib.figure import Figure

        if ax is None:
            fig = Figure(figsize=(7.5, 4.8))
            ax = fig.add_subplot()
        else:
            fig = ax.figure  # type: ignore[assignment]
        for column in self.columns:
            emphasis = column in ("clean", "worst_case")
            ax.errorbar(
                self.alphas,
                [self.accuracy[a][column] for a in self.alphas],
                yerr=[self.error_bar(a, column) for a in self.alphas],
                fmt="-o" if emphasis else "--o",
                linewidth=2.0 if emphasis else 1.0,
                markersize=4,
                capsize=3,
                label={"worst_case": "worst case over attacks (best known)", "clean": "clean"}.get(
                    column, column
                ),
            )
        limit = self.accuracy[0.0]["clean"] - self.max_clean_drop
        ax.axhline(
            limit, color="grey", linestyle="-.", linewidth=1, label=f"clean-accuracy limit ({limit:.2f})"
        )
        self._mark_flagged(ax)
        if suggest:
            chosen = self.suggestion()
            ax.axvline(chosen, color="black", linestyle=":", label=f"chosen alpha {chosen:g}")
        ax.set_xlabel("alpha (band half-width in channel standard deviations)")
        ax.set_ylabel("accuracy on the held-out split (%)")
        ax.set_title(
            f"MeanSparse alpha search ({self.norm}, eps={self.eps:g}, n={self.num_samples}); "
            "error bars: paired SE vs alpha 0",
            fontsize=9,
        )
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        return fig  # type: ignore[return-value]

    def _mark_flagged(self, ax: Axes) -> None:
        """A red cross on the criterion's line at every alpha flagged for gradient masking."""
        flagged = [a for a in self.alphas if masked(self.accuracy[a])]  # where flags_for flags, never parsed
        if flagged:
            column = criterion_column(self.criterion)
            ax.plot(
                flagged,
                [self.accuracy[a][column] for a in flagged],
                "x",
                color="red",
                markersize=10,
                markeredgewidth=2,
                label="gradient masking flagged (BPDA > 1 point below APGD-CE)",
            )

    def metrics(self) -> list[dict[str, float]]:
        """The table as logger rows, one per alpha (its step is its position in the grid), then the choice:
        ``alpha_search/alpha``, ``alpha_search/<column>`` (clean, every attack, worst_case), and
        ``alpha_search/suggestion`` with ``alpha_search/highest_eligible``."""
        rows: list[dict[str, float]] = [
            {
                "alpha_search/alpha": alpha,
                **{f"alpha_search/{column}": self.accuracy[alpha][column] for column in self.columns},
                "alpha_search/samples": float(self.samples(alpha)),
            }
            for alpha in self.alphas
        ]
        rows.append(
            {
                "alpha_search/suggestion": self.suggestion(),
                "alpha_search/highest_eligible": self.best_eligible(),
                **(self.diagnostics.metrics("alpha_search") if self.diagnostics is not None else {}),
            }
        )
        return rows

    def write(self, folder: str | os.PathLike) -> list[Path]:
        """``alpha_search.md`` / ``.json`` / ``.png`` in ``folder``, written as one."""
        return write_result(folder, "alpha_search", self)

    # ------------------------------------------------------------------------------------------- JSON
    def to_json(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas,
            "attacks": self.attacks,
            "accuracy": {f"{a:g}": self.accuracy[a] for a in self.alphas},
            "criterion": self.criterion,
            "rule": self.rule(),
            "max_clean_drop": self.max_clean_drop,
            "eps": self.eps,
            "norm": self.norm,
            "num_samples": self.num_samples,
            "suggestion": self.suggestion(),
            "flags": self.flags,
            "schedule": self.schedule,
            "samples_per_alpha": {f"{a:g}": self.samples(a) for a in self.alphas},
            "evaluated_fraction": self.evaluated_fraction,
            "rounds": self.rounds,
            "selection": self.selection,
            "highest_eligible": self.best_eligible(),
            "per_sample": {
                f"{a:g}": {column: encode_verdicts(v) for column, v in self.per_sample[a].items()}
                for a in self.alphas
                if a in self.per_sample
            },
            **(
                {
                    "site_alphas": self.site_alphas,
                    "site_steps": self.site_steps,
                    "site_accuracy": self.site_accuracy,
                }
                if self.site_alphas is not None
                else {}
            ),
            **(self.diagnostics.report_fields() if self.diagnostics is not None else {}),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AlphaSearchResult:
        """The result :meth:`to_json` wrote (e.g. ``alpha_search.json``), with its per-sample verdicts."""
        try:
            alphas = [float(a) for a in data["alphas"]]
            key = {f"{a:g}": a for a in alphas}
            partial = data.get("schedule", "exhaustive") == "successive_halving"
            return cls(
                alphas=alphas,
                attacks=list(data["attacks"]),
                accuracy={
                    key[k]: {c: float(v) for c, v in row.items()} for k, row in data["accuracy"].items()
                },
                criterion=data["criterion"],
                max_clean_drop=float(data["max_clean_drop"]),
                eps=float(data["eps"]),
                norm=data["norm"],
                num_samples=int(data["num_samples"]),
                flags=list(data.get("flags", [])),
                schedule=data.get("schedule", "exhaustive"),
                samples_per_alpha={key[k]: int(v) for k, v in data.get("samples_per_alpha", {}).items()}
                if partial
                else {},
                rounds=list(data.get("rounds", [])),
                selection=data.get("selection", "highest"),
                per_sample={
                    key[k]: {column: decode_verdicts(v) for column, v in columns.items()}
                    for k, columns in data.get("per_sample", {}).items()
                },
                site_alphas=[float(a) for a in data["site_alphas"]]
                if data.get("site_alphas") is not None
                else None,
                site_steps=list(data.get("site_steps", [])),
                site_accuracy={c: float(v) for c, v in data.get("site_accuracy", {}).items()},
                diagnostics=Diagnostics.from_report(data),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigurationError(
                f"not an alpha-search result ({type(error).__name__}: {error}); give the alpha_search.json a "
                "search wrote."
            ) from None


def masked(row: dict[str, float]) -> bool:
    """BPDA-APGD-CE more than :data:`GRADIENT_MASKING_GAP` points below exact-gradient APGD-CE."""
    if "bpda-apgd-ce" not in row or "apgd-ce" not in row:
        return False
    return row["apgd-ce"] - row["bpda-apgd-ce"] > GRADIENT_MASKING_GAP


def flags_for(
    alpha: float, row: dict[str, float], seen: int, num_samples: int, cause: str | None = None
) -> list[str]:
    """The gradient-masking flag of one alpha (:func:`masked`), naming the ``cause`` the diagnostics measured
    (randomness, saturation, the operators' band, ...)."""
    if not masked(row):
        return []
    # an alpha dropped early was measured on a few samples, where one sample is several points
    where = "" if seen == num_samples else f" (on {seen} of {num_samples} samples)"
    return [
        f"{alpha_variant(alpha)}{where}: BPDA-APGD-CE accuracy {row['bpda-apgd-ce']:.2f} is more than "
        f"{GRADIENT_MASKING_GAP:g} point below APGD-CE {row['apgd-ce']:.2f}: gradients are masked here (cause "
        f"measured: {cause or 'not measured'}), so APGD-CE alone overstates robustness."
    ]


def row_of(per_attack: dict[str, PerSample]) -> dict[str, float]:
    """One table row: accuracy per column, APGD-CE+DLR and the worst case over every attack."""
    row = {name: accuracy(values) for name, values in per_attack.items()}
    for combined, parts in COMPOSITE_ATTACKS.items():
        if all(part in per_attack for part in parts):
            row[combined] = accuracy(column_verdicts(per_attack, combined))
    row["worst_case"] = accuracy(column_verdicts(per_attack, "worst_case"))
    return row
