"""What every evaluation attack shares: the context it runs in, how its adversarial point is judged, and the
checks of what it can attack.

Common rules, whatever the attack:

* the model is attacked and judged in eval mode (every submodule's flag is restored afterwards);
* parameters are frozen for the duration (``requires_grad=False``, restored afterwards): attacks need
  gradients with respect to the input only, and FAB would otherwise accumulate ``.grad`` into the model;
* the global RNG state is saved and restored (pyautoattack reseeds the global generator); every batch is
  attacked with the same ``seed``, as AutoAttack does;
* a sample counts as correct only if it is correctly classified clean AND at the adversarial point, and the
  adversarial point is projected onto the eps ball and the [0, 1] box before it is judged, so no attack can
  "succeed" outside the threat model and robust accuracy can never exceed clean accuracy.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from meansparse_pl.attacks.pgd import project
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.modes import eval_mode


@contextlib.contextmanager
def frozen_parameters(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def model_device(model: nn.Module, x: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return x.device


@contextlib.contextmanager
def evaluation_context(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, frozen parameters, gradients enabled (even inside a Lightning validation step running in
    inference mode) and the caller's RNG state preserved."""
    cuda_devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=cuda_devices),
        torch.inference_mode(False),
        torch.enable_grad(),
        eval_mode(model),
        frozen_parameters(model),
    ):
        yield


def seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def predicts(logits: Tensor, y: Tensor) -> Tensor:
    """Per sample, whether the logits predict ``y``: the top class is ``y`` and every logit is finite (argmax
    reads NaN as the largest value, so NaN logits would otherwise "predict" class 0)."""
    return (logits.argmax(dim=1) == y) & torch.isfinite(logits).all(dim=1)


@torch.no_grad()
def judge(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float, norm: str) -> Tensor:
    """Correct clean AND correct at the adversarial point projected onto the threat model."""
    x_adv = project(x_adv.detach().to(x.dtype), x, eps, norm)
    clean_ok = predicts(model(x), y)
    adv_ok = predicts(model(x_adv), y)
    return clean_ok & adv_ok


def n_target_classes(requested: int, n_classes: int) -> int:
    # pyautoattack indexes the sorted logits with -target_class for target_class in 2..n_target_classes+1, so
    # more targets than n_classes - 1 is an IndexError; AutoAttack's standard 9 assumes 10+ classes.
    return max(1, min(int(requested), n_classes - 1))


def require_classes(name: str, n_classes: int, minimum: int) -> None:
    if n_classes < minimum:
        raise ConfigurationError(
            f"attack {name!r} needs a model with at least {minimum} classes (its DLR loss uses the top "
            f"{minimum} logits), this one has {n_classes}; use 'apgd-ce', 'fab-t', 'square' or 'pgd' instead."
        )


def require_image_batch(name: str, x: Tensor, norm: str) -> None:
    # Square Attack draws squares on (C, H, W) images; its L2 initialisation tiles 5x5 blocks.
    if x.dim() != 4:
        raise ConfigurationError(
            f"attack {name!r} needs image batches shaped (N, C, H, W), got shape {tuple(x.shape)}; "
            "reshape the inputs or use a gradient attack."
        )
    if norm == "L2" and min(x.shape[2], x.shape[3]) < 5:
        raise ConfigurationError(
            f"attack {name!r} with norm L2 needs images of at least 5x5 pixels, got "
            f"{x.shape[2]}x{x.shape[3]}; use norm='Linf' or a gradient attack."
        )


@dataclass(frozen=True)
class AttackContext:
    """What every per-batch attack function receives besides the batch itself."""

    model: nn.Module
    eps: float
    norm: str
    seed: int
    device: torch.device
    n_classes: int
    options: dict[str, Any]


# A per-batch attack: (context, x, y) -> bool tensor "still correct".
BatchAttack = Callable[[AttackContext, Tensor, Tensor], Tensor]


# What an attack is, for the reports' checks: the clean forward, a white-box attack on the model's own (exact)
# gradient, an adaptive one that sees past masked gradients (straight-through, surrogate, the paper's band
# penalty), a black-box one (queries only), a transfer from another model, or an ensemble (AutoAttack, which
# includes a black-box attack).
Family = Literal["clean", "exact", "adaptive", "black_box", "transfer", "ensemble"]


@dataclass(frozen=True)
class AttackSpec:
    """One evaluation attack: how it runs and its facts (the one place each attack's facts are written)."""

    run: BatchAttack
    defaults: dict[str, Any] = field(default_factory=dict)
    min_classes: int = 2
    needs_images: bool = False
    whole_set: bool = False  # the attack does its own batching (AutoAttack)
    family: Family = "exact"
    parts: tuple[str, ...] = ()  # a combined column: the attacks whose per-sample verdicts it ANDs
    masking_words: str | None = (
        None  # how a gradient-masking flag names an attack that sees past masked gradients
    )
