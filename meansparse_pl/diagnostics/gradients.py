"""Probes of the model itself, before any attack: are input gradients there, does the softmax saturate, how much
of the gradient do the MeanSparse operators remove, is the forward pass random.

They run on the clean samples of a small subset and cost a few forward and backward passes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.diagnostics.indicators import Indicator, Probe
from meansparse_pl.inputs import logits_of
from meansparse_pl.ops import MeanSparse, backward_mode, operators

# a per-sample gradient whose largest entry is below float32's smallest normal number carries no direction
VANISHING = torch.finfo(torch.float32).tiny
TOLERATED_ZERO_GRADIENTS = 0.01  # a working model has a gradient everywhere but on measure-zero plateaus
TOLERATED_SATURATION = 0.01
TOLERATED_MISDIRECTED = 0.05  # exact and straight-through gradients disagree on this share by chance
MISDIRECTED_COSINE = (
    0.5  # below this cosine the exact gradient points elsewhere than the straight-through one
)
RANDOMNESS_TOLERANCE = 1e-4  # AutoAttack's check_randomized: L2 distance of L2-normalised logits


def logits(model: nn.Module, x: Tensor) -> Tensor:
    return logits_of(model(x), x.shape[0], where="diagnostics").float()


def margin_loss(z: Tensor, y: Tensor) -> Tensor:
    """Per sample, the best other logit minus the true one: a loss whose gradient does not saturate."""
    other = z.clone()
    other.scatter_(1, y[:, None], float("-inf"))
    return other.max(dim=1).values - z.gather(1, y[:, None]).squeeze(1)


def input_gradient(model: nn.Module, x: Tensor, y: Tensor, loss: str) -> Tensor:
    """Per-sample input gradient of the summed ``ce`` or ``margin`` loss, flattened to ``(N, D)``."""
    x = x.detach().clone().requires_grad_(True)
    z = logits(model, x)
    value = F.cross_entropy(z, y, reduction="sum") if loss == "ce" else margin_loss(z, y).sum()
    (grad,) = torch.autograd.grad(value, x)
    return grad.flatten(1)


def vanishing(grad: Tensor) -> Tensor:
    """Per sample: the gradient is zero, below float32's normal range, or not finite."""
    return ~torch.isfinite(grad).all(dim=1) | (grad.abs().amax(dim=1) <= VANISHING)


def gradient_indicators(probe: Probe) -> list[Indicator]:
    """``unavailable_gradients`` (no loss has an input gradient: shattered or obfuscated gradients) and
    ``loss_saturation`` (cross-entropy's gradient vanishes where the margin loss's does not: scaled logits)."""
    margin = vanishing(input_gradient(probe.model, probe.x, probe.y, "margin"))
    ce = vanishing(input_gradient(probe.model, probe.x, probe.y, "ce"))
    n = probe.x.shape[0]
    unavailable = probe.counted(
        "unavailable_gradients",
        count=int(margin.sum()),
        n=n,
        tolerated=TOLERATED_ZERO_GRADIENTS,
        what="the input gradient of both the cross-entropy and the margin loss is zero or vanishing",
        advice="gradients are shattered or obfuscated: add bpda-apgd-ce (straight-through backward) and square, "
        "and attack through a differentiable approximation of the layer that removes them",
    )
    saturated = probe.counted(
        "loss_saturation",
        count=int((ce & ~margin).sum()),
        n=n,
        tolerated=TOLERATED_SATURATION,
        what="the cross-entropy gradient vanishes while the margin loss's does not",
        advice="the softmax saturates (scaled logits): use apgd-dlr and apgd-t (margin losses), as AutoAttack does",
    )
    return [unavailable, saturated]


class _OperatorGradients:
    """Forward hooks that keep each operator's input band and the gradient arriving at its output."""

    def __init__(self, ops: list[MeanSparse]) -> None:
        self.ops = ops
        self.removed: dict[int, list[float]] = {k: [0.0, 0.0] for k in range(len(ops))}
        self.handles: list[Any] = []

    def __enter__(self) -> _OperatorGradients:
        for k, op in enumerate(self.ops):
            self.handles.append(op.register_forward_hook(self._hook(k)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, k: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            if not output.requires_grad:
                return
            inside = module.overwritten(args[0].detach())  # type: ignore[operator]

            def on_grad(grad: Tensor) -> None:
                magnitude = grad.detach().abs().float()
                self.removed[k][0] += float((magnitude * inside).sum())
                self.removed[k][1] += float(magnitude.sum())

            output.register_hook(on_grad)

        return record

    def shares(self) -> list[float]:
        return [round(r / t, 4) if t > 0 else 0.0 for r, t in self.removed.values()]


def band_shares(model: nn.Module, x: Tensor) -> list[float]:
    """Per operator, the share of its input elements inside the band (the ones it overwrites) on ``x``."""
    ops = operators(model)
    inside = [[0.0, 0.0] for _ in ops]

    def hook(k: int) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...]) -> None:
            mask = module.overwritten(args[0].detach())  # type: ignore[operator]
            inside[k][0] += float(mask.sum())
            inside[k][1] += mask.numel()

        return record

    handles = [op.register_forward_pre_hook(hook(k)) for k, op in enumerate(ops)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for handle in handles:
            handle.remove()
    return [round(a / b, 4) if b else 0.0 for a, b in inside]


def operator_band_indicator(probe: Probe, x_adv: Tensor | None) -> Indicator | None:
    """``operator_band``: the exact input gradient against the straight-through one (the operators' backward as
    the identity). Measured: per-sample cosine, the share of gradient mass the band removes at each operator, and
    each operator's in-band share on clean and on attacked inputs. None for a model without operators."""
    model, x, y = probe.model, probe.x, probe.y
    ops = operators(model)
    if not ops:
        return None
    # the same random draws for both passes: a random model's noise must not pass for the band's doing
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        state = torch.get_rng_state(), torch.cuda.get_rng_state(x.device) if x.device.type == "cuda" else None
        exact = input_gradient(model, x, y, "ce")
        torch.set_rng_state(state[0])
        if state[1] is not None:
            torch.cuda.set_rng_state(state[1], x.device)
        with backward_mode(model, "straight_through"), _OperatorGradients(ops) as removed:
            straight = input_gradient(model, x, y, "ce")
    cosine = F.cosine_similarity(exact.double(), straight.double(), dim=1, eps=1e-30)
    cosine = torch.nan_to_num(cosine, nan=0.0)
    misdirected = cosine < MISDIRECTED_COSINE
    return probe.counted(
        "operator_band",
        count=int(misdirected.sum()),
        n=x.shape[0],
        tolerated=TOLERATED_MISDIRECTED,
        what=f"the exact input gradient has a cosine below {MISDIRECTED_COSINE:g} with the straight-through one",
        advice="the operators' band masks the exact gradient: quote best known with bpda-apgd-ce and "
        "surrogate-apgd-ce in the attack list, never exact-gradient APGD alone",
        mean_cosine=round(float(cosine.mean()), 4),
        gradient_mass_removed=removed.shares(),
        in_band_clean=band_shares(model, x),
        in_band_attacked=band_shares(model, x_adv) if x_adv is not None else [],
    )


def randomness_indicator(probe: Probe, forwards: int) -> Indicator:
    """``randomness``: ``forwards`` passes over the same inputs in eval mode; a sample varies when the L2 distance
    of two of its L2-normalised logit vectors exceeds AutoAttack's tolerance, or its prediction changes."""
    with torch.no_grad():
        outputs = [logits(probe.model, probe.x) for _ in range(forwards)]
    unit = [o / (o.norm(dim=1, keepdim=True) + 1e-10) for o in outputs]
    spread = torch.stack([(u - unit[0]).norm(dim=1) for u in unit[1:]]).amax(dim=0)
    predictions = torch.stack([o.argmax(dim=1) for o in outputs])
    flips = (predictions != predictions[0]).any(dim=0)
    varies = ~torch.isfinite(spread) | (spread > RANDOMNESS_TOLERANCE) | flips
    return probe.counted(
        "randomness",
        count=int(varies.sum()),
        n=probe.x.shape[0],
        tolerated=0.0,
        what=f"{forwards} forward passes of the same input disagree",
        advice="the forward pass is random: attack with --attacks.eot_iter 20 (Expectation over Transformation) "
        "and count a sample robust only if it survives repeated judging",
        prediction_changes=int(flips.sum()),
        max_spread=round(float(torch.nan_to_num(spread, nan=float("inf")).max()), 6),
    )


def labels_kept(probe: Probe) -> Tensor:
    """Per sample, whether the model classifies it correctly (finite logits, top class ``y``)."""
    with torch.no_grad():
        z = logits(probe.model, probe.x)
    return (z.argmax(dim=1) == probe.y) & torch.isfinite(z).all(dim=1)
