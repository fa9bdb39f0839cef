"""The paper's Adaptive-(p, q) PGD (Amini et al. 2024, eq. 8, appendix A.4).

It maximises ``CE(f(x + d), y) - lambda * sum_i || m_i * (z_i - z_i^d) ||_p^q`` where ``z_i`` is the input of the
i-th MeanSparse operator on the clean image, ``z_i^d`` on the perturbed one, and ``m_i`` marks the features of
the clean image that lie inside the operator's band (the ones MeanSparse overwrites).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.attacks.common import AttackContext, judge, seed_everything
from meansparse_pl.attacks.pgd import pgd_ascent, random_point_in_ball
from meansparse_pl.ops import MeanSparse, operators


def band_mask(op: MeanSparse, z: Tensor) -> Tensor:
    """Where ``op`` overwrites its input ``z``: ``|z - centre| < alpha * sigma`` per channel (paper A.4).

    The operator's own band test (:meth:`MeanSparse.overwritten`: its centre, threshold and strict comparison),
    so the mask is exactly what the operator does, on the band's edge too. Empty when alpha is 0.
    """
    return op.overwritten(z)


class _OperatorInputs:
    """Forward pre-hooks that record the input of every MeanSparse operator, in call order, during
    :meth:`capture` only (other forward passes, e.g. judging, keep no references to their activations)."""

    def __init__(self, model: nn.Module) -> None:
        self.ops = operators(model)
        self.inputs: list[tuple[MeanSparse, Tensor]] = []
        self._handles: list[Any] = []
        self._recording = False

    def __enter__(self) -> _OperatorInputs:
        for op in self.ops:
            self._handles.append(op.register_forward_pre_hook(self._record))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _record(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if self._recording:
            self.inputs.append((module, args[0]))  # type: ignore[arg-type]

    def capture(self, fn: Callable[[], Tensor]) -> tuple[Tensor, list[tuple[MeanSparse, Tensor]]]:
        self.inputs = []
        self._recording = True
        try:
            out = fn()
        finally:
            self._recording = False
        return out, self.inputs


def adaptive_penalty(
    clean: list[tuple[Tensor, Tensor]], perturbed: list[Tensor], p: float, q: float
) -> Tensor:
    """``sum_i sum_n || m_i[n] * (z_i[n] - z_i^d[n]) ||_p^q`` over operators i and samples n, in float32.

    ``clean`` holds ``(mask, z)`` per operator call. ``torch.linalg.vector_norm`` has a zero (not NaN)
    gradient at a zero vector, so features that have not moved yet do not poison the step.
    """
    total = torch.zeros((), device=perturbed[0].device if perturbed else "cpu")
    for (mask, z), z_d in zip(clean, perturbed, strict=True):
        diff = (mask * (z.float() - z_d.float())).flatten(1)
        total = total + (torch.linalg.vector_norm(diff, ord=p, dim=1) ** q).sum()
    return total


def adaptive(ctx: AttackContext, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    step_size = o["step_size"] if o["step_size"] is not None else ctx.eps / 8
    lambda_, p, q = o["lambda_"], o["p"], o["q"]
    model = ctx.model
    correct = judge(model, x, x, y, ctx.eps, ctx.norm)
    with _OperatorInputs(model) as recorder:
        with torch.no_grad():
            _, recorded = recorder.capture(lambda: model(x))
            clean = [(band_mask(op, z), z.detach()) for op, z in recorded]

        def objective(x_adv: Tensor) -> Tensor:
            logits, recorded_adv = recorder.capture(lambda: model(x_adv))
            ce = F.cross_entropy(logits.float(), y, reduction="sum")
            penalty = adaptive_penalty(clean, [z for _, z in recorded_adv], p, q)
            return ce - lambda_ * penalty

        seed_everything(ctx.seed, ctx.device)
        for _ in range(o["n_restarts"]):
            if not bool(correct.any()):
                break
            start = random_point_in_ball(x, ctx.eps, ctx.norm) if o["random_start"] else x.clone()
            x_adv = pgd_ascent(
                x,
                start,
                objective,
                eps=ctx.eps,
                step_size=step_size,
                steps=o["steps"],
                norm=ctx.norm,
                eot_iter=o["eot_iter"],
            )
            correct &= judge(model, x, x_adv, y, ctx.eps, ctx.norm)
    return correct
