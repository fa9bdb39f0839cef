"""Indicators of attack failure: does the robust number of an evaluation deserve trust?

MeanSparse zeroes the gradient inside its band, which AutoAttack's own checks do not see (they look for
whole-sample zero gradients of the DLR loss). Every ``evaluate`` and ``compare`` therefore runs these
indicators, after Pintor et al. (2022), "Indicators of Attack Failure", and Carlini et al. (2019), "On Evaluating
Adversarial Robustness":

* model probes on a seeded subset (:mod:`.gradients`): ``unavailable_gradients``, ``loss_saturation``,
  ``operator_band`` (exact vs straight-through gradient, gradient mass the band removes, in-band shares),
  ``randomness``;
* attack probes on the subset (:mod:`.optimisation`): ``incomplete_optimisation`` (loss still rising),
  ``silent_success``, ``attack_budget`` (twice the iterations or one more restart), ``unconstrained_failure``
  and ``not_monotone_in_eps`` (a large radius);
* per-sample verdicts of the evaluation (:mod:`.per_sample`): ``black_box_beats_white_box``,
  ``adaptive_beats_exact`` (with the cause the probes measured), ``not_monotone_in_eps`` across radii.

Each indicator has a tolerated rate and fires by a one-sided binomial test (:mod:`.indicators`).
"""

from __future__ import annotations

from meansparse_pl.diagnostics.indicators import Diagnostics, Indicator, beyond_noise, binomial_tail
from meansparse_pl.diagnostics.per_sample import verdict_indicators
from meansparse_pl.diagnostics.runner import alpha_variant, diagnose, quick_diagnostics, seeded_subset

__all__ = [
    "alpha_variant",
    "Diagnostics",
    "Indicator",
    "beyond_noise",
    "binomial_tail",
    "diagnose",
    "quick_diagnostics",
    "seeded_subset",
    "verdict_indicators",
]
