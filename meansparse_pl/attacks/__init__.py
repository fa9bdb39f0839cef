"""Adversarial attacks.

* :mod:`.pgd` and :mod:`.trades`: the attacks that run inside training steps (Madry PGD, TRADES), and the PGD
  ascent every gradient attack shares;
* :mod:`.registry`: the evaluation attacks behind :func:`run_attack`, each with its facts (white / black box,
  adaptive, combined columns) and :func:`column_verdicts`, the one rule a report's columns are read by (AutoAttack components via pyautoattack in
  :mod:`.autoattack`, BPDA, the paper's adaptive attack in :mod:`.adaptive`), each returning per-sample verdicts;
* :mod:`.verdicts`: :func:`worst_case`, the per-sample worst case ("best known") over attacks, and
  :func:`paired_gap`, the paired difference of two settings on the same samples with its standard error.
"""

from __future__ import annotations

from meansparse_pl.attacks.adaptive import adaptive_penalty, band_mask
from meansparse_pl.attacks.pgd import pgd_perturb
from meansparse_pl.attacks.registry import (
    ATTACK_NAMES,
    BEST_KNOWN_COLUMNS,
    BLACK_BOX_ATTACKS,
    BLACK_BOX_OR_TRANSFER,
    COMPOSITE_ATTACKS,
    EXACT_WHITE_BOX,
    MASKING_WORDS,
    WHITE_BOX_ATTACKS,
    attack_options,
    check_attack_config,
    column_verdicts,
    options_for,
    run_attack,
)
from meansparse_pl.attacks.trades import trades_adversarial, trades_loss, trades_objective
from meansparse_pl.attacks.verdicts import (
    PerSample,
    decode_verdicts,
    encode_verdicts,
    paired_comparison,
    paired_gap,
    worst_case,
)

__all__ = [
    "ATTACK_NAMES",
    "BEST_KNOWN_COLUMNS",
    "BLACK_BOX_ATTACKS",
    "BLACK_BOX_OR_TRANSFER",
    "COMPOSITE_ATTACKS",
    "EXACT_WHITE_BOX",
    "MASKING_WORDS",
    "WHITE_BOX_ATTACKS",
    "adaptive_penalty",
    "attack_options",
    "band_mask",
    "check_attack_config",
    "column_verdicts",
    "options_for",
    "pgd_perturb",
    "run_attack",
    "trades_adversarial",
    "trades_loss",
    "trades_objective",
    "PerSample",
    "decode_verdicts",
    "encode_verdicts",
    "paired_comparison",
    "paired_gap",
    "worst_case",
]
