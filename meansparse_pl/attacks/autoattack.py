"""The AutoAttack family and PGD behind the registry: pyautoattack's own APGD-CE / -DLR / -T, FAB-T, Square and
standard AutoAttack, and Madry PGD; only the glue lives here. ``bpda-apgd-ce`` is APGD-CE with every MeanSparse
operator's backward replaced by the identity (BPDA, Athalye et al. 2018): the operator's exact gradient is zero
inside its band, which starves gradient attacks; the straight-through gradient does not. The forward pass is
identical, so the adversarial points found are judged with the real model.
"""

from __future__ import annotations

import sys

import torch
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from torch import Tensor, nn

from meansparse_pl.attacks.common import (
    AttackContext,
    BatchAttack,
    judge,
    n_target_classes,
    predicts,
    seed_everything,
)
from meansparse_pl.attacks.pgd import pgd_perturb
from meansparse_pl.ops import temporary_alpha


def clean(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return predicts(ctx.model(x), y)


def make_apgd(
    model: nn.Module,
    *,
    loss: str,
    eps: float,
    norm: str,
    seed: int,
    device: torch.device,
    n_iter: int,
    n_restarts: int,
    rho: float,
    eot_iter: int = 1,
) -> APGDAttack:
    # A fresh object every time: APGDAttack derives its checkpoint schedule (n_iter_2, n_iter_min, size_decr)
    # from n_iter in __init__, so setting .n_iter on an existing object silently keeps the old schedule.
    return APGDAttack(
        model,
        n_iter=n_iter,
        norm=norm,
        n_restarts=n_restarts,
        eps=eps,
        seed=seed,
        loss=loss,
        eot_iter=eot_iter,
        rho=rho,
        verbose=False,
        device=device,
    )


def make_apgd_t(
    model: nn.Module,
    *,
    eps: float,
    norm: str,
    seed: int,
    device: torch.device,
    n_iter: int,
    n_restarts: int,
    n_target_classes: int,
    rho: float,
    eot_iter: int = 1,
) -> APGDAttack_targeted:
    return APGDAttack_targeted(
        model,
        n_iter=n_iter,
        norm=norm,
        n_restarts=n_restarts,
        eps=eps,
        seed=seed,
        eot_iter=eot_iter,
        rho=rho,
        n_target_classes=n_target_classes,
        verbose=False,
        device=device,
    )


def pgd(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    opts = ctx.options
    step_size = opts["step_size"] if opts["step_size"] is not None else ctx.eps / 8
    correct = judge(ctx.model, x, x, y, ctx.eps, ctx.norm)
    seed_everything(ctx.seed, ctx.device)
    for _ in range(opts["n_restarts"]):
        if not bool(correct.any()):
            break
        x_adv = pgd_perturb(
            ctx.model,
            x,
            y,
            eps=ctx.eps,
            step_size=step_size,
            steps=opts["steps"],
            norm=ctx.norm,
            random_start=opts["random_start"],
            eot_iter=opts["eot_iter"],
        )
        correct &= judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)
    return correct


def apgd_point(ctx: AttackContext, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """APGD's adversarial point for ``x`` against ``ctx.model`` as it is (its operators' alpha and backward)."""
    o = ctx.options
    attack = make_apgd(
        ctx.model,
        loss=loss,
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=o["n_restarts"],
        rho=o["rho"],
        eot_iter=o["eot_iter"],
    )
    return attack.perturb(x, y)


def apgd(loss: str) -> BatchAttack:
    def run(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
        # the operators' backward (exact, straight-through, surrogate) is the registry's switch; the adversarial
        # point is judged with the real model, whose forward no backward mode changes
        return judge(ctx.model, x, apgd_point(ctx, x, y, loss), y, ctx.eps, ctx.norm)

    return run


def transfer_base(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    """APGD-CE against the base model (every operator's alpha 0: the identity), judged on the MeanSparse model:
    the base is a near-perfect surrogate of the defended model, its gradients are not masked, and it costs
    nothing to obtain."""
    with temporary_alpha(ctx.model, 0.0):
        x_adv = apgd_point(ctx, x, y, "ce")
    return judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)


def apgd_ce_dlr(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    return apgd("ce")(ctx, x, y) & apgd("dlr")(ctx, x, y)


def apgd_t(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    attack = make_apgd_t(
        ctx.model,
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=o["n_restarts"],
        rho=o["rho"],
        n_target_classes=n_target_classes(o["n_target_classes"], ctx.n_classes),
        eot_iter=o["eot_iter"],
    )
    return judge(ctx.model, x, attack.perturb(x, y), y, ctx.eps, ctx.norm)


def fab_t(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    attack = FABAttack_PT(
        ctx.model,
        norm=ctx.norm,
        n_restarts=o["n_restarts"],
        n_iter=o["n_iter"],
        eps=ctx.eps,
        seed=ctx.seed,
        targeted=True,
        device=ctx.device,
        n_target_classes=n_target_classes(o["n_target_classes"], ctx.n_classes),
    )
    return judge(ctx.model, x, attack.perturb(x, y), y, ctx.eps, ctx.norm)


def square(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    # Same configuration as inside AutoAttack (p_init 0.8, no schedule rescaling).
    attack = SquareAttack(
        ctx.model,
        norm=ctx.norm,
        n_queries=o["n_queries"],
        eps=ctx.eps,
        p_init=o["p_init"],
        n_restarts=o["n_restarts"],
        seed=ctx.seed,
        verbose=False,
        device=ctx.device,
        resc_schedule=False,
    )
    with torch.no_grad():
        x_adv = attack.perturb(x, y)
    return judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)


def autoattack(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    """Standard AutoAttack over the whole set (pyautoattack batches it and attacks only the samples still
    robust after the previous attack); the iteration counts can be lowered for tests."""
    o = ctx.options
    adversary = AutoAttack(
        ctx.model, norm=ctx.norm, eps=ctx.eps, seed=ctx.seed, version="standard", device=ctx.device
    )
    n_targets = n_target_classes(o["n_target_classes"], ctx.n_classes)
    adversary.apgd = make_apgd(
        ctx.model,
        loss="ce",
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=1,
        rho=0.75,
        eot_iter=o["eot_iter"],
    )
    adversary.apgd_targeted = make_apgd_t(
        ctx.model,
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=1,
        n_target_classes=n_targets,
        rho=0.75,
        eot_iter=o["eot_iter"],
    )
    adversary.fab.n_iter = o["n_iter"]
    adversary.fab.n_target_classes = n_targets
    adversary.square.n_queries = o["n_queries"]
    adversary.verbose = False
    # pyautoattack's check_dynamic ends with sys.settrace(None), which would silently switch off a debugger
    # or coverage tracer for the rest of the run; put the caller's tracer back.
    tracer = sys.gettrace()
    try:
        x_adv, _ = adversary.run_standard_evaluation(x, y, batch_size=o["batch_size"])
    finally:
        sys.settrace(tracer)
    correct = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    bs = o["batch_size"]
    for start in range(0, x.shape[0], bs):
        xb, ab, yb = (t[start : start + bs].to(ctx.device) for t in (x, x_adv, y))
        correct[start : start + bs] = judge(ctx.model, xb, ab, yb, ctx.eps, ctx.norm).to(x.device)
    return correct
