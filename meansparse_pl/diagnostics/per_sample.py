"""Indicators read from an evaluation's per-sample verdicts: a black-box or transfer attack breaking samples
the white-box attacks kept, an adaptive attack breaking samples exact-gradient APGD kept, accuracy that rises
with eps. They cost nothing: the verdicts are there.
"""

from __future__ import annotations

from collections.abc import Mapping

from meansparse_pl.attacks import BLACK_BOX_OR_TRANSFER, EXACT_WHITE_BOX, MASKING_WORDS, PerSample, worst_case
from meansparse_pl.diagnostics.indicators import Indicator, counted

# the attacks that see past masked gradients (straight-through, surrogate, transfer), from their facts
ADAPTIVE = tuple(MASKING_WORDS)
TOLERATED_BLACK_BOX = 0.01  # a sample a black-box attack breaks and strong white-box attacks miss: rare noise
TOLERATED_ADAPTIVE = 0.01
TOLERATED_NOT_MONOTONE = 0.01

# key of one block of verdicts: (variant, eps) -> attack -> sample -> correct
VerdictBlocks = Mapping[tuple[str, float], Mapping[str, PerSample]]


def broken_only_by(
    columns: Mapping[str, PerSample], others: tuple[str, ...], reference: tuple[str, ...]
) -> int:
    """Samples broken by some attack of ``others`` while every attack of ``reference`` kept them."""
    other = worst_case([columns[a] for a in others])
    kept = worst_case([columns[a] for a in reference])
    return sum(1 for i, ok in kept.items() if ok and not other[i])


def verdict_indicators(blocks: VerdictBlocks, significance: float) -> list[Indicator]:
    """The per-sample indicators of every (variant, eps) block that has the attacks they compare."""
    out: list[Indicator] = []
    for (variant, eps), columns in blocks.items():
        n = len(next(iter(columns.values()))) if columns else 0
        white = tuple(a for a in EXACT_WHITE_BOX if a in columns)
        exact = ("apgd-ce",) if "apgd-ce" in columns else ()
        # indicator, the attacks that must not win, the ones they must not beat, tolerated rate, words, advice
        contests = (
            ("black_box_beats_white_box", BLACK_BOX_OR_TRANSFER, white, "", TOLERATED_BLACK_BOX,
             "the white-box gradients are misleading: quote best known, and add bpda-apgd-ce and square with more "
             "queries"),
            ("adaptive_beats_exact", ADAPTIVE, exact, "exact-gradient ", TOLERATED_ADAPTIVE,
             "gradients are masked: quote best known (never apgd-ce alone); the cause is in the measured values"),
        )  # fmt: skip
        for name, candidates, reference, words, tolerated, advice in contests:
            others = tuple(a for a in candidates if a in columns)
            if not (others and reference):
                continue
            out.append(
                counted(
                    name,
                    variant,
                    eps,
                    count=broken_only_by(columns, others, reference),
                    n=n,
                    tolerated=tolerated,
                    significance=significance,
                    what=f"{' or '.join(others)} breaks a sample that {words}{', '.join(reference)} kept",
                    advice=advice,
                    attacks=", ".join(others),
                )
            )
    out += monotone_indicators(blocks, significance)
    return out


def monotone_indicators(blocks: VerdictBlocks, significance: float) -> list[Indicator]:
    """``not_monotone_in_eps`` between consecutive radii of a variant: samples robust (best known) at the larger
    eps but broken at the smaller one."""
    out: list[Indicator] = []
    for variant in dict.fromkeys(v for v, _ in blocks):
        radii = sorted(e for v, e in blocks if v == variant)
        for small, large in zip(radii, radii[1:], strict=False):
            at_small = worst_case(blocks[(variant, small)])
            at_large = worst_case(blocks[(variant, large)])
            count = sum(1 for i, ok in at_large.items() if ok and not at_small[i])
            out.append(
                counted(
                    "not_monotone_in_eps",
                    variant,
                    large,
                    count=count,
                    n=len(at_large),
                    tolerated=TOLERATED_NOT_MONOTONE,
                    significance=significance,
                    what=f"a sample is robust at eps {large:g} but broken at the smaller eps {small:g}",
                    advice="the attacks miss points a larger ball contains: raise n_iter and n_restarts",
                    smaller_eps=small,
                )
            )
    return out
