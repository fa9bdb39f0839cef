"""Training-time attacks: Madry PGD (CE) and the TRADES inner maximisation / objective.

These run inside every training step, so they are written for speed and for mixed precision: the input and
the perturbation stay in the input's dtype (float32), the model may run under ``torch.autocast`` (bf16), and
the loss is always computed in float32 so that its gradient does not underflow. Gradients are taken with
``torch.autograd.grad`` with respect to the input only, so nothing is ever accumulated into the model's
``.grad`` fields and the optimiser step of the caller is not disturbed.

Train / eval mode: ``pgd_perturb`` and ``trades_adversarial`` never change the model's mode; the caller
picks it. The LightningModule of this package generates adversarial examples in **eval** mode (BatchNorm
uses its running statistics and is not updated by the attack's forward passes) and computes the training
loss in **train** mode; :func:`eval_mode` is the context manager it uses for that, and :func:`trades_loss`
does the whole switch itself.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.errors import ConfigurationError

Norm = Literal["Linf", "L2"]
NORMS: tuple[str, ...] = ("Linf", "L2")
PGD_LOSSES: tuple[str, ...] = ("ce", "kl")

# Guards the L2 normalisation of a zero gradient / zero perturbation (e.g. a sample whose loss is flat).
_TINY = 1e-12


def check_eps(eps: float) -> float:
    """Validate an attack radius; the one place where the rule ``0 < eps < inf`` lives."""
    eps = float(eps)
    if not (eps > 0.0) or math.isinf(eps):
        raise ConfigurationError(
            f"eps must be a finite number > 0, got {eps}; pass the attack radius, e.g. eps=8/255 for Linf."
        )
    return eps


def check_norm(norm: str) -> str:
    if norm not in NORMS:
        raise ConfigurationError(f"norm must be one of {NORMS}, got {norm!r}; use 'Linf' or 'L2'.")
    return norm


def _check_pgd_args(eps: float, step_size: float, steps: int, norm: str) -> tuple[float, float, int]:
    eps = check_eps(eps)
    check_norm(norm)
    step_size = float(step_size)
    if not (step_size > 0.0) or math.isinf(step_size):
        raise ConfigurationError(
            f"step_size must be a finite number > 0, got {step_size}; a common choice is eps/4 (Linf, eps=8/255: 2/255)."
        )
    if isinstance(steps, bool) or int(steps) != steps or steps < 1:
        raise ConfigurationError(
            f"steps must be an integer >= 1, got {steps!r}; use e.g. steps=10 for PGD-10."
        )
    return eps, step_size, int(steps)


def _check_box(x: Tensor) -> None:
    # The ball/box projection below is exact only for inputs inside [0, 1]; anything else means the data
    # pipeline normalised the images before the model (the model must do its own normalisation).
    if x.numel() and (bool(x.min() < 0) or bool(x.max() > 1)):
        raise ConfigurationError(
            f"attack inputs must lie in [0, 1], got values in [{float(x.min()):.3g}, {float(x.max()):.3g}]; "
            "remove Normalize from the data transforms and let the model normalise its input."
        )


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own train flag.

    Restoring per submodule (rather than calling ``model.train()``) keeps deliberately frozen parts, e.g. a
    BatchNorm kept in eval mode during fine-tuning, frozen.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped for broadcasting against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def _project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the eps ball around ``x`` and then onto the [0, 1] box.

    Clipping to the box after the ball keeps the point inside the ball, because for ``x`` in [0, 1] the box
    clip never increases any coordinate's distance to ``x``; so the result satisfies both constraints.
    """
    if norm == "Linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        factor = torch.clamp(eps / (_per_sample_norm(delta) + _TINY), max=1.0)
        x_adv = x + delta * factor
    return x_adv.clamp_(0.0, 1.0)


def _random_start(x: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # Uniform direction, radius uniform in [0, eps] (as in torchattacks / robustness library).
        delta = torch.randn_like(x)
        delta = delta / (_per_sample_norm(delta) + _TINY)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = delta * radius * eps
    return _project(x + delta, x, eps, norm)


def _wide(t: Tensor) -> Tensor:
    """float16 / bfloat16 (autocast) logits to float32; float32 and float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _attack_loss(logits: Tensor, y: Tensor | None, loss: str, target_probs: Tensor | None) -> Tensor:
    """Summed (not averaged) loss in float32: the per-sample gradient does not shrink with the batch size,
    which matters in bf16 where a 1/N factor can push small gradients to zero."""
    logits = _wide(logits)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")


def _pgd_from(
    x: Tensor,
    x_start: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
) -> Tensor:
    """The PGD ascent loop on a scalar ``objective(x_adv)`` from a given (already projected) start point.

    Shared by Madry PGD, the TRADES inner maximisation and the paper's adaptive attack, so that with the same
    objective they take bit-identical steps.
    """
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        with torch.no_grad():
            if norm == "Linf":
                x_adv = x_adv + step_size * grad.sign()
            else:
                grad = grad.to(x_adv.dtype)
                x_adv = x_adv + step_size * grad / (_per_sample_norm(grad) + _TINY)
            x_adv = _project(x_adv, x, eps, norm)
    return x_adv.detach()


def pgd_perturb(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "Linf",
    random_start: bool = True,
    loss: Literal["ce", "kl"] = "ce",
    target_logits: Tensor | None = None,
) -> Tensor:
    """Madry et al. (2018) PGD: ``steps`` ascent steps on the loss, each projected onto the eps ball and the
    [0, 1] box, so the returned point is always a valid image inside the threat model.

    Args:
        model: the classifier; its train/eval mode is left as the caller set it (use eval mode so that
            BatchNorm is neither updated nor batch-dependent during the attack; see :func:`eval_mode`).
        x: clean images in [0, 1], shape ``(N, ...)``.
        y: integer labels ``(N,)`` (used by ``loss="ce"``; ignored by ``"kl"``).
        eps: radius of the threat model (Linf or L2 ball).
        step_size: Linf: step along ``sign(grad)``; L2: step along ``grad / ||grad||_2``.
        steps: number of ascent steps (>= 1).
        norm: ``"Linf"`` or ``"L2"``.
        random_start: start from a uniform point in the ball (Linf) / a uniform direction with uniform
            radius (L2) instead of from ``x``.
        loss: ``"ce"`` maximises the cross-entropy to ``y``; ``"kl"`` maximises
            ``KL(softmax(target_logits) || softmax(model(x_adv)))`` (TRADES inner problem).
        target_logits: reference logits for ``"kl"``; by default ``model(x)`` without gradient.

    Returns:
        Detached adversarial images, same shape and dtype as ``x``.

    Works under ``torch.autocast`` (the loss is computed in float32) and also when called from inside
    ``torch.no_grad()`` / ``torch.inference_mode()`` (e.g. a Lightning validation step): gradients are
    re-enabled locally. Model parameters never receive ``.grad``.
    """
    eps, step_size, steps = _check_pgd_args(eps, step_size, steps, norm)
    if loss not in PGD_LOSSES:
        raise ConfigurationError(
            f"loss must be one of {PGD_LOSSES}, got {loss!r}; use 'ce' (Madry) or 'kl' (TRADES)."
        )
    with torch.inference_mode(False), torch.enable_grad():
        # Cloning outside inference mode turns a Lightning-validation inference tensor into a normal one.
        x = x.detach().clone()
        y = y.detach().clone()
        _check_box(x)
        target_probs = None
        if loss == "kl":
            target_probs = _target_probs(model, x, target_logits)
        x_start = _random_start(x, eps, norm) if random_start else x.clone()
        return _pgd_from(
            x,
            x_start,
            lambda x_adv: _attack_loss(model(x_adv), y, loss, target_probs),
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
        )


def _target_probs(model: nn.Module, x: Tensor, target_logits: Tensor | None) -> Tensor:
    if target_logits is None:
        with torch.no_grad():
            target_logits = model(x)
    return F.softmax(_wide(target_logits.detach().clone()), dim=1)


def trades_adversarial(
    model: nn.Module,
    x: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: Norm = "Linf",
    target_logits: Tensor | None = None,
) -> Tensor:
    """TRADES inner maximisation (Zhang et al., 2019): start at ``x + 0.001 * randn`` (projected), then
    ``steps`` PGD steps on ``KL(softmax(model(x)) || softmax(model(x_adv)))``.

    Leaves the model's mode alone: call it in eval mode (as the reference implementation does), e.g. inside
    :func:`eval_mode`. ``target_logits`` defaults to ``model(x)`` computed here without gradient, i.e. in the
    mode the caller chose.
    """
    eps, step_size, steps = _check_pgd_args(eps, step_size, steps, norm)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        _check_box(x)
        target_probs = _target_probs(model, x, target_logits)
        x_start = _project(x + 0.001 * torch.randn_like(x), x, eps, norm)
        return _pgd_from(
            x,
            x_start,
            lambda x_adv: _attack_loss(model(x_adv), None, "kl", target_probs),
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
        )


def check_beta(beta: float) -> float:
    beta = float(beta)
    if not (beta >= 0.0) or math.isinf(beta):
        raise ConfigurationError(
            f"TRADES beta must be a finite number >= 0, got {beta}; the usual value is 6.0."
        )
    return beta


def trades_objective(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES outer loss ``CE(clean, y) + beta * KL(softmax(clean) || softmax(adv))``.

    Both terms are batch means (KL with ``batchmean``: summed over classes, averaged over samples, which is
    the reference implementation's ``sum / batch_size``). Computed in at least float32 (bf16 / fp16 logits
    from autocast are upcast); the gradient flows through both the clean and the adversarial logits, as in
    the paper.
    """
    beta = check_beta(beta)
    clean = _wide(clean_logits)
    adv = _wide(adv_logits)
    natural = F.cross_entropy(clean, y)
    robust = F.kl_div(F.log_softmax(adv, dim=1), F.softmax(clean, dim=1), reduction="batchmean")
    return natural + beta * robust


def trades_loss(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    step_size: float,
    steps: int,
    beta: float,
    norm: Norm = "Linf",
) -> tuple[Tensor, Tensor, Tensor]:
    """One TRADES training loss, with the mode handling of the reference implementation done here.

    The adversarial example is generated with the model in eval mode (:func:`trades_adversarial` inside
    :func:`eval_mode`); the clean and adversarial logits of the loss are then computed in the mode the model
    had on entry (train mode during training), so BatchNorm statistics are updated by the loss forward only.

    Returns:
        ``(loss, clean_logits, adv_logits)``; the logits are the ones the loss was computed from (with graph),
        handy for logging clean / adversarial training accuracy without another forward pass.
    """
    beta = check_beta(beta)
    with eval_mode(model):
        x_adv = trades_adversarial(model, x, eps=eps, step_size=step_size, steps=steps, norm=norm)
    clean_logits = model(x)
    adv_logits = model(x_adv)
    return trades_objective(clean_logits, adv_logits, y, beta), clean_logits, adv_logits
