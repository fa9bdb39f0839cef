"""Probes of the attack: did APGD-CE converge, did it return the adversarial points it found, would a stronger
run break more, does a large radius break everything.

All run pyautoattack's own APGD-CE, with the options the evaluation gives it, on the subset's clean-correct
samples; every verdict is judged by the package's one rule (correct clean and at the projected point).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.attacks.autoattack import make_apgd
from meansparse_pl.attacks.common import judge, seed_everything
from meansparse_pl.diagnostics.indicators import Indicator, Probe
from meansparse_pl.inputs import logits_of
from meansparse_pl.ops import backward_mode, operators

TRACE_WINDOW = (
    10  # the last iterations whose loss must be flat (Pintor et al.'s incomplete-optimisation rule)
)
TRACE_RISE = 0.05  # the rise of the best loss over that window, as a share of the whole run's rise
TOLERATED_RISING = 0.05
TOLERATED_SILENT = 0.01
TOLERATED_STRONGER = 0.02  # a converged attack's extra restart still breaks a sample now and then
TOLERATED_LARGE_EPS = 0.01
TOLERATED_NOT_MONOTONE = 0.01


class _LossTrace(nn.Module):
    """The model, recording each forward pass's per-sample cross-entropy on the attacked batch."""

    def __init__(self, model: nn.Module, y: Tensor) -> None:
        super().__init__()
        self.model = model
        self.y = y
        self.trace: list[Tensor] = []

    def forward(self, x: Tensor) -> Tensor:
        z = self.model(x)
        if x.shape[0] == self.y.shape[0]:
            logits = logits_of(z, x.shape[0], where="diagnostics").detach().float()
            self.trace.append(F.cross_entropy(logits, self.y, reduction="none"))
        return z


@dataclass
class AttackRun:
    """APGD-CE as the evaluation runs it, on the subset: where it ended, what it believed, the loss trace."""

    x_adv: Tensor
    believed_broken: Tensor
    kept: Tensor  # judged: still correct at the returned point
    trace: Tensor  # (steps, N) per-sample loss of the first restart


def apgd_run(
    probe: Probe, *, eps: float | None = None, options: dict[str, Any] | None = None, seed: int | None = None
) -> AttackRun:
    """``n_restarts`` single runs of APGD-CE (seeds ``seed``, ``seed + 1``, ...), each keeping the adversarial
    point it found, as ``APGDAttack.perturb`` does, judged by the model; the probe's eps, options and seed unless
    given."""
    model, x, y = probe.model, probe.x, probe.y
    eps = probe.eps if eps is None else eps
    options = probe.options if options is None else options
    seed = probe.seed if seed is None else seed
    traced = _LossTrace(model, y)
    believed = torch.zeros_like(y, dtype=torch.bool)
    x_adv = x.clone()
    first: list[Tensor] = []
    for restart in range(options["n_restarts"]):
        attack = make_apgd(
            traced,
            loss="ce",
            eps=eps,
            norm=probe.norm,
            seed=seed + restart,
            device=x.device,
            n_iter=options["n_iter"],
            n_restarts=1,
            rho=options["rho"],
            eot_iter=options["eot_iter"],
        )
        attack.init_hyperparam(x)
        seed_everything(seed + restart, x.device)
        traced.trace = []
        _, acc, _, adv = attack.attack_single_run(x, y)
        if restart == 0:
            first = traced.trace
        found = ~acc.bool() & ~believed
        x_adv[found] = adv[found]
        believed |= ~acc.bool()
    kept = judge(model, x, x_adv, y, eps, probe.norm)
    return AttackRun(x_adv, believed, kept, torch.stack(first))


def still_rising(trace: Tensor) -> Tensor:
    """Per sample: the best loss so far, scaled to [0, 1] over the run, rose by more than :data:`TRACE_RISE`
    over the last :data:`TRACE_WINDOW` steps (Pintor et al. 2022, incomplete optimisation)."""
    best = trace.cummax(dim=0).values
    span = best[-1] - best[0]
    window = min(TRACE_WINDOW, best.shape[0] - 1)
    rise = best[-1] - best[-1 - window]
    return (span > 0) & (rise > TRACE_RISE * span)


def optimisation_indicators(probe: Probe, expensive: bool) -> tuple[list[Indicator], AttackRun]:
    """``incomplete_optimisation``, ``silent_success`` and, when ``expensive``, ``attack_budget`` (twice the
    iterations or one more restart break more than noise allows); returns them and the configured run."""
    run = apgd_run(probe)
    n_iter = probe.options["n_iter"]
    rising = still_rising(run.trace) & run.kept
    indicators = [
        probe.counted(
            "incomplete_optimisation",
            count=int(rising.sum()),
            n=int(run.kept.sum()),
            tolerated=TOLERATED_RISING,
            what=f"APGD-CE's best loss still rose by over {100 * TRACE_RISE:g}% of its run in the last "
            f"{TRACE_WINDOW} iterations on a sample it did not break",
            advice=f"the attack stopped before converging: raise n_iter (now {n_iter})",
            n_iter=n_iter,
        ),
        probe.counted(
            "silent_success",
            count=int((run.believed_broken & run.kept).sum()),
            n=probe.x.shape[0],
            tolerated=TOLERATED_SILENT,
            what="APGD-CE found a point it took for adversarial, yet the model classifies the returned point "
            "correctly",
            advice="the attack's success is not reproducible: check the model for randomness (eot_iter) and "
            "for a prediction that depends on the batch (eval mode, batch statistics)",
        ),
    ]
    if expensive:
        indicators.append(stronger_attack_indicator(probe, run))
    return indicators, run


def stronger_attack_indicator(probe: Probe, run: AttackRun) -> Indicator:
    """``attack_budget``: samples the configured APGD-CE kept that twice its iterations or one more restart
    (another seed) break."""
    options = probe.options
    doubled = apgd_run(probe, options={**options, "n_iter": 2 * options["n_iter"]})
    another = apgd_run(probe, options={**options, "n_restarts": 1}, seed=probe.seed + options["n_restarts"])
    broken_by_stronger = run.kept & ~(doubled.kept & another.kept)
    return probe.counted(
        "attack_budget",
        count=int(broken_by_stronger.sum()),
        n=int(run.kept.sum()),
        tolerated=TOLERATED_STRONGER,
        what="twice the iterations or one more restart break a sample the configured APGD-CE kept",
        advice=f"the attack budget is too small: raise n_iter (now {options['n_iter']}) and n_restarts "
        f"(now {options['n_restarts']})",
        broken_by_double_iterations=int((run.kept & ~doubled.kept).sum()),
        broken_by_one_more_restart=int((run.kept & ~another.kept).sum()),
    )


def default_large_eps(norm: str, x: Tensor) -> float:
    """A radius that reaches the mid-grey image from any image in [0, 1]: 0.5 (Linf), 0.5 * sqrt(size) (L2)."""
    return 0.5 if norm == "Linf" else 0.5 * math.sqrt(x[0].numel())


def large_eps_indicators(probe: Probe, kept_at_eps: Tensor, large_eps: float) -> list[Indicator]:
    """``unconstrained_failure`` (APGD-CE, and its straight-through twin when the model has operators, leave
    samples correct at ``large_eps``) and ``not_monotone_in_eps`` (samples correct at ``large_eps`` that the
    attack broke at the probe's eps)."""
    kept = apgd_run(probe, eps=large_eps).kept
    if operators(probe.model):
        with backward_mode(probe.model, "straight_through"):
            kept &= apgd_run(probe, eps=large_eps).kept
    return [
        probe.counted(
            "unconstrained_failure",
            count=int(kept.sum()),
            n=probe.x.shape[0],
            tolerated=TOLERATED_LARGE_EPS,
            what=f"a sample stays correct under APGD-CE at eps {large_eps:g}, where every image can be moved "
            "to mid-grey",
            advice="the attack cannot move the prediction even without a real constraint: its gradients are "
            "broken (add bpda-apgd-ce and square) or it is misconfigured (norm, eps units, input range)",
            large_eps=large_eps,
        ),
        probe.counted(
            "not_monotone_in_eps",
            count=int((kept & ~kept_at_eps).sum()),
            n=probe.x.shape[0],
            tolerated=TOLERATED_NOT_MONOTONE,
            what=f"a sample is correct at eps {large_eps:g} but broken at the smaller eps {probe.eps:g}",
            advice="the attack is not monotone in eps: it fails to find points a larger ball contains; raise "
            "n_iter and n_restarts or change the attack",
            large_eps=large_eps,
        ),
    ]
