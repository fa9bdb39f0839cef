"""Robustness reports: per-attack accuracy and the per-sample worst case, base vs MeanSparse, with checks.

The sanity checks follow the spirit of Carlini et al. (2019), "On Evaluating Adversarial Robustness":
robust accuracy never exceeds clean accuracy, accuracy falls as epsilon grows and reaches about zero at a
large epsilon, a black-box attack must not beat the white-box ones, and the straight-through (BPDA)
attack must not beat exact-gradient APGD by more than a point — if either happens, gradients are masked
and the exact-gradient number is not a robustness claim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.attacks import (
    BLACK_BOX_ATTACKS,
    COMPOSITE_ATTACKS,
    MASKING_WORDS,
    WHITE_BOX_ATTACKS,
    column_verdicts,
)
from meansparse_pl.diagnostics import Diagnostics
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import accuracy
from meansparse_pl.io import atomic_write
from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import operators, set_alpha, temporary_alpha

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

LARGE_EPS_CHANCE_MARGIN = 5.0  # points above zero accuracy still accepted at the "large" epsilon


@dataclass
class VariantResult:
    """One model setting (base or MeanSparse) at one epsilon: accuracy per attack and the worst case."""

    name: str
    alpha: float | None  # None: each operator keeps its own alpha (RobustnessReport.operator_alphas)
    eps: float
    accuracy: dict[str, float]  # attack -> percent; includes "best_known"

    @property
    def alpha_label(self) -> str:
        return "per operator" if self.alpha is None else f"{self.alpha:g}"

    @property
    def tag(self) -> str:
        """How the report names this setting: ``<name> (alpha=<alpha>, eps=<eps>)``."""
        return f"{self.name} (alpha={self.alpha_label}, eps={self.eps:g})"


@dataclass
class RobustnessReport:
    norm: str
    num_samples: int
    attacks: list[str]
    results: list[VariantResult]
    large_eps_check: dict[str, float] = field(default_factory=dict)  # variant -> accuracy at large eps
    large_eps: float | None = None
    operator_alphas: list[float] | None = None  # the per-operator alphas of a variant whose alpha is None
    cascade: list[str] | None = None  # attacks in the best-known column only, run on the survivors in order
    diagnostics: Diagnostics | None = None  # the indicators of attack failure (meansparse_pl.diagnostics)

    # --------------------------------------------------------------------------------------- checks
    def sanity_checks(self) -> list[str]:
        """Human-readable findings; a line starting with FAIL or FLAG needs attention."""
        findings: list[str] = []
        for r in self.results:
            clean = r.accuracy.get("clean")
            tag = r.tag
            if clean is not None:
                above = [a for a, v in r.accuracy.items() if a != "clean" and v > clean + 1e-9]
                findings.append(
                    f"FAIL {tag}: robust accuracy above clean for {above}"
                    if above
                    else f"ok   {tag}: robust <= clean"
                )
            white = [r.accuracy[a] for a in WHITE_BOX_ATTACKS if a in r.accuracy]
            for black in BLACK_BOX_ATTACKS:
                if black in r.accuracy and white and r.accuracy[black] < min(white) - 1e-9:
                    findings.append(
                        f"FLAG {tag}: black-box {black} ({r.accuracy[black]:.2f}) beats every white-box attack "
                        f"({min(white):.2f}): gradient masking"
                    )
            for adaptive, words in MASKING_WORDS.items():
                if adaptive in r.accuracy and "apgd-ce" in r.accuracy:
                    gap = r.accuracy["apgd-ce"] - r.accuracy[adaptive]
                    if gap > 1.0:
                        findings.append(
                            f"FLAG {tag}: {words} is {gap:.2f} points below APGD-CE: gradients are masked, "
                            f"cause measured: {self.masking_cause(r.name)}; quote the best-known number, not APGD-CE"
                        )
        for name in {r.name for r in self.results}:
            series = sorted((r.eps, r.accuracy["best_known"]) for r in self.results if r.name == name)
            increasing = [(a, b) for a, b in zip(series, series[1:], strict=False) if b[1] > a[1] + 1e-9]
            if len(series) > 1:
                findings.append(
                    f"FAIL {name}: best-known accuracy rises with epsilon at {increasing}"
                    if increasing
                    else f"ok   {name}: accuracy falls as epsilon grows"
                )
        for name, value in self.large_eps_check.items():
            ok = value <= LARGE_EPS_CHANCE_MARGIN
            findings.append(
                f"{'ok  ' if ok else 'FAIL'} {name}: accuracy {value:.2f}% at eps={self.large_eps:g} "
                f"({'about zero, as it must be' if ok else 'not about zero: the attack does not work on this model'})"
            )
        return findings

    def masking_cause(self, variant: str) -> str:
        if self.diagnostics is None:
            return "not measured (no diagnostics)"
        return self.diagnostics.masking_cause(variant)

    # -------------------------------------------------------------------------------------- rendering
    def table(self) -> str:
        labels = {r.name: r.alpha_label for r in self.results}
        variants = sorted(
            {(r.name, r.alpha) for r in self.results}, key=lambda v: (v[1] is None, v[1] or 0.0)
        )
        eps_values = sorted({r.eps for r in self.results})
        by_key = {(r.name, r.eps): r for r in self.results}
        header = "| attack | " + " | ".join(
            f"{n} (alpha={labels[n]}), eps={e:g}" for e in eps_values for n, _ in variants
        )
        lines = [header + " |", "|---|" + "---:|" * (len(variants) * len(eps_values))]
        for attack in [*self.attacks, "best_known"]:
            label = "**best known (per-sample worst case)**" if attack == "best_known" else attack
            cells = []
            for e in eps_values:
                for n, _ in variants:
                    value = by_key[(n, e)].accuracy.get(attack)
                    cells.append("-" if value is None else f"{value:.2f}")
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines += [
            "",
            f"{self.num_samples} samples, {self.norm}; accuracies in percent.",
            *(
                [f"Per-operator alphas: {', '.join(f'{a:g}' for a in self.operator_alphas)}."]
                if self.operator_alphas is not None
                else []
            ),
            *(
                [
                    f"Best known also includes the cascade {', '.join(self.cascade)}: each run, in this order, only on "
                    "the samples no earlier attack had broken."
                ]
                if self.cascade
                else []
            ),
            "",
            "Sanity checks:",
        ]
        lines += [f"- {line}" for line in self.sanity_checks()]
        if self.diagnostics is not None:
            lines += ["", self.diagnostics.table()]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        data = {
            "norm": self.norm,
            "num_samples": self.num_samples,
            "attacks": self.attacks,
            "results": [r.__dict__ for r in self.results],
            "large_eps": self.large_eps,
            "large_eps_accuracy": self.large_eps_check,
            "sanity_checks": self.sanity_checks(),
        }
        if self.operator_alphas is not None:
            data["operator_alphas"] = self.operator_alphas
        if self.cascade:
            data["cascade"] = self.cascade
        if self.diagnostics is not None:
            data.update(self.diagnostics.report_fields())
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RobustnessReport:
        """The report :meth:`to_json` wrote (its sanity checks are recomputed, not read)."""
        results = [
            VariantResult(
                str(r["name"]),
                None if r["alpha"] is None else float(r["alpha"]),
                float(r["eps"]),
                {attack: float(value) for attack, value in r["accuracy"].items()},
            )
            for r in data["results"]
        ]
        return cls(
            norm=str(data["norm"]),
            num_samples=int(data["num_samples"]),
            attacks=list(data["attacks"]),
            results=results,
            large_eps_check={k: float(v) for k, v in (data.get("large_eps_accuracy") or {}).items()},
            large_eps=None if data.get("large_eps") is None else float(data["large_eps"]),
            operator_alphas=data.get("operator_alphas"),
            cascade=data.get("cascade"),
            diagnostics=Diagnostics.from_report(data),
        )

    def plot(self, ax: Axes | None = None) -> Figure:
        """Accuracy per attack column and best known, one bar per model setting and radius, with error bars of
        one binomial standard error (``sqrt(p (100 - p) / n)`` points). Draws into ``ax`` when given (its figure
        is returned), else on a new standalone ``Figure``; pyplot is never touched."""
        from matplotlib.figure import Figure

        columns = [*self.attacks, "best_known"]
        if ax is None:
            fig = Figure(figsize=(7.5, 1.5 + 0.35 * len(columns) * max(len(self.results), 1)))
            ax = fig.add_subplot()
        else:
            fig = ax.figure  # type: ignore[assignment]
        height = 0.8 / max(len(self.results), 1)
        for position, r in enumerate(self.results):
            values = [r.accuracy.get(column, float("nan")) for column in columns]
            errors = [math.sqrt(max(v * (100.0 - v), 0.0) / max(self.num_samples, 1)) for v in values]
            rows = [i + position * height for i in range(len(columns))]
            ax.barh(rows, values, height=height, xerr=errors, capsize=2, label=r.tag)
        ax.set_yticks([i + 0.4 - height / 2 for i in range(len(columns))])
        ax.set_yticklabels(
            ["best known (worst case)" if c == "best_known" else c for c in columns], fontsize=8
        )
        ax.invert_yaxis()
        ax.set_xlim(0, 100)
        ax.set_xlabel("accuracy (%)")
        ax.set_title(
            f"Robust accuracy per attack ({self.norm}, n={self.num_samples}); error bars: binomial SE",
            fontsize=9,
        )
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        return fig  # type: ignore[return-value]

    def metrics(self) -> list[dict[str, float]]:
        """Every number of the report under a flat name, as one logger row: ``evaluate/<model>/eps=<eps>/<attack>``
        (``best_known`` among the attacks) and ``evaluate/<model>/large_eps``."""
        out = {
            f"evaluate/{r.name}/eps={r.eps:g}/{attack}": value
            for r in self.results
            for attack, value in r.accuracy.items()
        }
        out.update({f"evaluate/{name}/large_eps": value for name, value in self.large_eps_check.items()})
        if self.diagnostics is not None:
            out.update(self.diagnostics.metrics("evaluate"))
        return [out]


def atomic_attacks(attacks: Sequence[str]) -> list[str]:
    """The attacks to run for the report's columns: composites expanded into their parts, in the user's order,
    each once."""
    order: list[str] = []
    for name in attacks:
        for atomic in COMPOSITE_ATTACKS.get(name, (name,)):
            if atomic not in order:
                order.append(atomic)
    return order


def summarise(per_sample: dict[str, dict[int, bool]], attacks: Sequence[str]) -> dict[str, float]:
    """Accuracy per attack (composites ANDed per sample) and the best-known worst case over all of them."""
    columns = [*attacks, "best_known"]
    return {column: accuracy(column_verdicts(per_sample, column)) for column in columns}


def plot_channel_histogram(
    before: Any, after: Any, mean: float, threshold: float, path: str | os.PathLike, title: str
) -> str:
    """Paper Figure 1: one channel's values before and after the operator, with the blocked band shaded.

    Drawn on a standalone matplotlib ``Figure`` (no pyplot, so the caller's backend and figures are untouched)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 3.8))
    axes = fig.subplots(1, 2, sharex=True)
    for ax, values, label in ((axes[0], before, "input of the operator"), (axes[1], after, "output")):
        ax.hist(values, bins=80, color="tab:blue", alpha=0.8)
        ax.axvspan(mean - threshold, mean + threshold, color="tab:red", alpha=0.15, label="blocked band")
        ax.axvline(mean, color="tab:red", linewidth=1, label="channel mean")
        ax.set_title(label)
        ax.set_xlabel("feature value")
        ax.set_yscale("log")
    axes[0].set_ylabel("count (log)")
    axes[0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
    return str(path)


def channel_histogram(
    model: nn.Module, dataset: Dataset, site: int, alpha: float | None, path: str | os.PathLike
) -> str:
    """Collect one site's input over up to 256 images and plot its most populated channel before / after, at
    ``alpha`` (None: the operator's own); the model's alphas are left as they were."""
    ops = [op for op in operators(model) if op.site_name.startswith(f"site {site} ")]
    if not ops:
        raise ConfigurationError(f"histogram_site {site} is not an operator site; see the placement table.")
    op = ops[0]
    captured: list[torch.Tensor] = []
    # a copy: an in-place activation after the operator may overwrite its input
    handle = op.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach().clone()))
    images = torch.stack([dataset[i][0] for i in range(min(256, len(dataset)))])  # type: ignore[arg-type]
    with temporary_alpha(model):
        if alpha is not None:
            set_alpha(model, alpha)
        alpha = op.alpha_value
        try:
            with torch.no_grad(), eval_mode(model):
                model(images.to(op.mean.device))
        finally:
            handle.remove()
        features = captured[0].movedim(op.channel_dim, -1).reshape(-1, op.num_channels)
        channel = int(torch.argmax(op.var))
        with torch.no_grad():
            after = (
                op.without_activation(captured[0])
                .movedim(op.channel_dim, -1)
                .reshape(-1, op.num_channels)[:, channel]
            )
    return plot_channel_histogram(
        features[:, channel].cpu().numpy(),
        after.detach().cpu().numpy(),
        float(op.mean[channel]),
        alpha * float(op.var[channel].sqrt()),
        path,
        f"{op.site_name}, channel {channel}, alpha={alpha:g}",
    )
