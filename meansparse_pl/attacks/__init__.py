"""Adversarial attacks: training-time PGD / TRADES and the evaluation attack registry.

``meansparse_pl.attacks.training`` holds the attacks that run inside training steps; the evaluation attacks
(AutoAttack components via pyautoattack, BPDA, the paper's adaptive attack) are behind
:func:`run_attack` in ``meansparse_pl.attacks.evaluation``.
"""

from __future__ import annotations

from meansparse_pl.attacks.evaluation import (
    ATTACK_NAMES,
    adaptive_penalty,
    attack_options,
    band_mask,
    run_attack,
    worst_case,
)
from meansparse_pl.attacks.training import (
    NORMS,
    check_eps,
    check_norm,
    eval_mode,
    pgd_perturb,
    trades_adversarial,
    trades_loss,
    trades_objective,
)

__all__ = [
    "ATTACK_NAMES",
    "NORMS",
    "adaptive_penalty",
    "attack_options",
    "band_mask",
    "check_eps",
    "check_norm",
    "eval_mode",
    "pgd_perturb",
    "run_attack",
    "trades_adversarial",
    "trades_loss",
    "trades_objective",
    "worst_case",
]
