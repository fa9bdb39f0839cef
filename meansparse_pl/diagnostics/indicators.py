"""One indicator of attack failure, the statistical rule that decides whether it fired, and the result of a
diagnostics run.

Every indicator counts samples: samples with a zero input gradient, samples whose prediction changes between
two forward passes, samples a stronger attack breaks that the configured one kept, ... Each has a *tolerated
rate*, the share of samples on which the effect may appear by chance (attack noise, numerics) on a model and
an attack that work, and fires when the count is beyond what that rate allows on the samples measured: a
one-sided binomial test, ``P(Binomial(n, tolerated) >= count) < significance``. A tolerated rate of 0 means
the effect should never appear, so a single sample fires it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from meansparse_pl.errors import ConfigurationError


def binomial_tail(count: int, n: int, rate: float) -> float:
    """``P(X >= count)`` for ``X ~ Binomial(n, rate)``, summed exactly in log space."""
    if count <= 0:
        return 1.0
    if count > n:
        return 0.0
    if rate <= 0.0:
        return 0.0
    if rate >= 1.0:
        return 1.0
    log_p, log_q = math.log(rate), math.log1p(-rate)
    total = 0.0
    for k in range(count, n + 1):
        log_pmf = (
            math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1) + k * log_p + (n - k) * log_q
        )
        total += math.exp(log_pmf)
    return min(1.0, total)


def beyond_noise(count: int, n: int, tolerated: float, significance: float) -> tuple[bool, float]:
    """Whether ``count`` of ``n`` samples is more than the ``tolerated`` rate allows at ``significance``, and
    the test's p-value."""
    p_value = binomial_tail(count, n, tolerated)
    return count > 0 and p_value < significance, p_value


@dataclass(frozen=True)
class Indicator:
    """One indicator for one model variant at one radius: what it measured, its rule, whether it fired and,
    when it did, what to do."""

    indicator: str
    variant: str
    eps: float
    measured: dict[str, Any]
    fired: bool
    rule: str
    advice: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "indicator": self.indicator,
            "variant": self.variant,
            "eps": self.eps,
            "measured": self.measured,
            "fired": self.fired,
            "rule": self.rule,
            "advice": self.advice if self.fired else "",
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Indicator:
        try:
            return cls(
                indicator=str(data["indicator"]),
                variant=str(data["variant"]),
                eps=float(data["eps"]),
                measured=dict(data["measured"]),
                fired=bool(data["fired"]),
                rule=str(data["rule"]),
                advice=str(data.get("advice", "")),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise ConfigurationError(
                f"not a diagnostics entry ({type(error).__name__}: {error}); give the diagnostics list a report wrote."
            ) from None


def counted(
    indicator: str,
    variant: str,
    eps: float,
    *,
    count: int,
    n: int,
    tolerated: float,
    significance: float,
    what: str,
    advice: str,
    **measured: Any,
) -> Indicator:
    """An indicator decided by the binomial rule on ``count`` of ``n`` samples showing ``what``."""
    fired, p_value = beyond_noise(count, n, tolerated, significance)
    rule = (
        f"fires when {what} on more samples than a tolerated rate of {100 * tolerated:g}% allows "
        f"(one-sided binomial test, p < {significance:g})"
        if tolerated > 0
        else f"fires when {what} on any sample"
    )
    values = {"samples": n, "count": count, "share": round(count / n, 4) if n else 0.0, "p_value": p_value}
    return Indicator(indicator, variant, eps, {**values, **measured}, fired, rule, advice)


@dataclass(frozen=True)
class Probe:
    """What every model probe of one variant takes, passed whole: the model with its operators set, the samples,
    where its indicators are reported (variant, eps), APGD-CE's resolved options, the seed and the test level."""

    model: nn.Module
    x: Tensor
    y: Tensor
    variant: str
    eps: float
    norm: str = "Linf"
    options: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    significance: float = 0.01

    def restricted(self, keep: Tensor) -> Probe:
        """The same probe on the samples ``keep`` marks (e.g. the clean-correct ones)."""
        return dataclasses.replace(self, x=self.x[keep], y=self.y[keep])

    def counted(self, indicator: str, **rule: Any) -> Indicator:
        """An indicator of this probe's variant and eps, decided by :func:`counted`."""
        return counted(indicator, self.variant, self.eps, significance=self.significance, **rule)


# the words a report uses for the cause of a gradient-masking flag, by the probe indicator that measured it
MASKING_CAUSES = {
    "randomness": "the model's randomness (repeated forward passes disagree)",
    "loss_saturation": "a saturated softmax (cross-entropy gradients vanish)",
    "unavailable_gradients": "unavailable input gradients (zero for every loss)",
    "operator_band": "the MeanSparse operators' band (it removes the exact gradient)",
}


@dataclass
class Diagnostics:
    """Every indicator of a diagnostics run, with the subset size and the time it took (``seconds``: for the log
    and the benchmarks, never written into a report, which must not depend on the machine's load)."""

    indicators: list[Indicator] = field(default_factory=list)
    subset: int = 0
    seconds: float = 0.0

    def fired(self) -> list[Indicator]:
        return [i for i in self.indicators if i.fired]

    def find(self, indicator: str, variant: str) -> list[Indicator]:
        return [i for i in self.indicators if i.indicator == indicator and i.variant == variant]

    def masking_cause(self, variant: str) -> str:
        """What the probes measured as the cause of masked gradients for ``variant``, in words."""
        causes = [
            words for name, words in MASKING_CAUSES.items() if any(i.fired for i in self.find(name, variant))
        ]
        if causes:
            return " and ".join(causes)
        # nothing fired, but the band may still remove part of the gradient: the only measured difference between
        # the exact and the straight-through attack of a deterministic, unsaturated model
        for band in self.find("operator_band", variant):
            removed = band.measured.get("gradient_mass_removed") or []
            if removed and max(removed) > 0:
                return (
                    f"the MeanSparse operators' band (it removes up to {100 * max(removed):.0f}% of the gradient "
                    f"mass at an operator; mean cosine of exact and straight-through gradient "
                    f"{band.measured.get('mean_cosine', float('nan')):.2f})"
                )
        return "not identified: no randomness, saturation or operator-band effect measured"

    def verdict(self) -> str:
        fired = self.fired()
        if not fired:
            return (
                f"No indicator of attack failure fired ({len(self.indicators)} checked). That does not prove "
                "robustness; it says the attacks did not fail in any of the ways measured."
            )
        names = sorted({f"{i.indicator} ({i.variant})" for i in fired})
        return (
            f"No: {len(fired)} of {len(self.indicators)} indicators fired ({', '.join(names)}). The robust numbers "
            "they concern may overstate robustness; follow the advice below and evaluate again."
        )

    def table(self) -> str:
        """The Markdown section "Can this number be trusted?": the verdict, then one row per indicator."""
        lines = [
            "## Can this number be trusted?",
            "",
            self.verdict(),
            "",
            "| indicator | model | eps | measured | fired | what to do |",
            "|---|---|---:|---|:---:|---|",
        ]
        for i in self.indicators:
            lines.append(
                f"| {i.indicator} | {i.variant} | {i.eps:g} | {summary(i.measured)} | "
                f"{'**yes**' if i.fired else 'no'} | {i.advice if i.fired else ''} |"
            )
        # no time here: a report is the same bytes whoever computes it, an interrupted and resumed run included
        lines += ["", f"Model probes on a seeded subset of {self.subset} samples. Rules:", ""]
        rules = {}
        for i in self.indicators:
            rules.setdefault(i.indicator, i.rule)
        lines += [f"- {name}: {rule}" for name, rule in rules.items()]
        return "\n".join(lines)

    def brief(self) -> list[str]:
        """The verdict and one line per fired indicator: the short form a longer report embeds."""
        lines = [f"Diagnostics ({self.subset} samples): {self.verdict()}"]
        lines += [f"- {i.indicator} ({i.variant}): {summary(i.measured)}; {i.advice}" for i in self.fired()]
        return lines

    def to_json(self) -> list[dict[str, Any]]:
        return [i.to_json() for i in self.indicators]

    @classmethod
    def from_json(cls, entries: list[dict[str, Any]], subset: int = 0, seconds: float = 0.0) -> Diagnostics:
        return cls([Indicator.from_json(e) for e in entries], subset, seconds)

    def report_fields(self) -> dict[str, Any]:
        """The keys a result's JSON carries for its diagnostics (read back by :meth:`from_report`)."""
        return {"diagnostics": self.to_json(), "diagnostics_subset": self.subset}

    @classmethod
    def from_report(cls, data: dict[str, Any]) -> Diagnostics | None:
        """The diagnostics a result's JSON carries (:meth:`report_fields`), or None when it has none."""
        if "diagnostics" not in data:
            return None
        return cls.from_json(data["diagnostics"], int(data.get("diagnostics_subset", 0)))

    def metrics(self, prefix: str) -> dict[str, float]:
        """Each indicator's numbers under ``<prefix>/diagnostics/<variant>/eps=<eps>/<indicator>/...`` and its
        ``fired`` as 0 / 1, for a logger."""
        out: dict[str, float] = {}
        for i in self.indicators:
            key = f"{prefix}/diagnostics/{i.variant}/eps={i.eps:g}/{i.indicator}"
            out[f"{key}/fired"] = float(i.fired)
            for name, value in i.measured.items():
                if isinstance(value, bool | int | float):
                    out[f"{key}/{name}"] = float(value)
        return out


def summary(measured: dict[str, Any]) -> str:
    """The measured values of one indicator as a short cell: count/samples first, then the rest."""
    parts = []
    if "count" in measured and "samples" in measured:
        parts.append(f"{measured['count']}/{measured['samples']}")
    for name, value in measured.items():
        if name in ("count", "samples", "share") or isinstance(value, list | dict):
            continue
        parts.append(f"{name} {value:.3g}" if isinstance(value, float) else f"{name} {value}")
    return ", ".join(parts)
