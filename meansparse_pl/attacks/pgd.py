"""PGD: the projected-gradient ascent every gradient attack of the package shares, and Madry et al.'s PGD.

Written for speed and for mixed precision, since it runs inside every training step: the input and the
perturbation stay in the input's dtype (float32), the model may run under ``torch.autocast`` (bf16), and the
loss is always computed in float32 so that its gradient does not underflow. Gradients are taken with
``torch.autograd.grad`` with respect to the input only, so nothing is ever accumulated into the model's
``.grad`` fields and the optimiser step of the caller is not disturbed.

Train / eval mode: :func:`pgd_perturb` never changes the model's mode; the caller picks it. The LightningModule
of this package generates adversarial examples in **eval** mode (BatchNorm uses its running statistics and is
not updated by the attack's forward passes, see :func:`meansparse_pl.modes.eval_mode`) and computes the
training loss in **train** mode.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.config import Norm, ThreatModel, check_number, check_positive_int
from meansparse_pl.errors import ConfigurationError, PixelRangeError
from meansparse_pl.inputs import range_problem

PGD_LOSSES: tuple[str, ...] = ("ce", "kl")

# Guards the L2 normalisation of a zero gradient / zero perturbation (e.g. a sample whose loss is flat).
_TINY = 1e-12


def check_pgd_args(eps: float, step_size: float, steps: int, norm: str) -> tuple[float, float, int]:
    eps = ThreatModel(norm, eps).eps  # type: ignore[arg-type]
    step_size = check_number(
        "step_size",
        step_size,
        minimum=0.0,
        strict=True,
        hint="a common choice is eps/4 (Linf, eps=8/255: 2/255)",
    )
    steps = check_positive_int("steps", steps, "use e.g. steps=10 for PGD-10")
    return eps, step_size, steps


def check_box(x: Tensor) -> None:
    # The ball/box projection below is exact only for inputs inside [0, 1]; anything else means the data
    # pipeline normalised the images before the model (the model must do its own normalisation), or gave 0-255
    # pixels. One reduction and one host read per call (each read is a device sync on a GPU); NaN fails it too.
    if x.numel() and not bool(((x >= 0) & (x <= 1)).all()):
        finite = x[torch.isfinite(x)]
        low, high = (float(finite.min()), float(finite.max())) if finite.numel() else (0.0, 1.0)
        problem = range_problem(low, high, int((~torch.isfinite(x)).sum()))
        raise PixelRangeError(f"attack inputs must lie in [0, 1]: {problem}.")


def per_sample_norm(t: Tensor) -> Tensor:
    """L2 norm of each sample, shaped for broadcasting against ``t``."""
    return t.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: Tensor, x: Tensor, eps: float, norm: str) -> Tensor:
    """Project onto the eps ball around ``x`` and then onto the [0, 1] box.

    Clipping to the box after the ball keeps the point inside the ball, because for ``x`` in [0, 1] the box
    clip never increases any coordinate's distance to ``x``; so the result satisfies both constraints.
    """
    if norm == "Linf":
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
    else:
        delta = x_adv - x
        factor = torch.clamp(eps / (per_sample_norm(delta) + _TINY), max=1.0)
        x_adv = x + delta * factor
    return x_adv.clamp_(0.0, 1.0)


def random_point_in_ball(x: Tensor, eps: float, norm: str) -> Tensor:
    if norm == "Linf":
        delta = torch.empty_like(x).uniform_(-eps, eps)
    else:
        # Uniform direction, radius uniform in [0, eps] (as in torchattacks / robustness library).
        delta = torch.randn_like(x)
        delta = delta / (per_sample_norm(delta) + _TINY)
        radius = torch.rand(x.shape[0], *([1] * (x.dim() - 1)), device=x.device, dtype=x.dtype)
        delta = delta * radius * eps
    return project(x + delta, x, eps, norm)


def wide(t: Tensor) -> Tensor:
    """float16 / bfloat16 (autocast) logits to float32; float32 and float64 stay as they are."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def attack_loss(logits: Tensor, y: Tensor | None, loss: str, target_probs: Tensor | None) -> Tensor:
    """Summed (not averaged) loss in float32: the per-sample gradient does not shrink with the batch size,
    which matters in bf16 where a 1/N factor can push small gradients to zero."""
    logits = wide(logits)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="sum")
    return F.kl_div(F.log_softmax(logits, dim=1), target_probs, reduction="sum")


def pgd_ascent(
    x: Tensor,
    x_start: Tensor,
    objective: Callable[[Tensor], Tensor],
    *,
    eps: float,
    step_size: float,
    steps: int,
    norm: str,
    eot_iter: int = 1,
) -> Tensor:
    """The PGD ascent loop on a scalar ``objective(x_adv)`` from a given (already projected) start point.

    Shared by Madry PGD, the TRADES inner maximisation and the paper's adaptive attack, so that with the same
    objective they take bit-identical steps. ``eot_iter`` > 1 averages the gradient over that many evaluations
    of the objective (Expectation over Transformation), for a model whose forward pass is random.
    """
    x_adv = x_start.detach()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(objective(x_adv), x_adv)
        for _ in range(eot_iter - 1):
            grad = grad + torch.autograd.grad(objective(x_adv), x_adv)[0]
        if eot_iter > 1:
            grad = grad / eot_iter
        with torch.no_grad():
            if norm == "Linf":
                x_adv = x_adv + step_size * grad.sign()
            else:
                grad = grad.to(x_adv.dtype)
                x_adv = x_adv + step_size * grad / (per_sample_norm(grad) + _TINY)
            x_adv = project(x_adv, x, eps, norm)
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
    eot_iter: int = 1,
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
        eot_iter: gradients averaged per step (Expectation over Transformation, for a random model).

    Returns:
        Detached adversarial images, same shape and dtype as ``x``.

    Works under ``torch.autocast`` (the loss is computed in float32) and also when called from inside
    ``torch.no_grad()`` / ``torch.inference_mode()`` (e.g. a Lightning validation step): gradients are
    re-enabled locally. Model parameters never receive ``.grad``.
    """
    eps, step_size, steps = check_pgd_args(eps, step_size, steps, norm)
    if loss not in PGD_LOSSES:
        raise ConfigurationError(
            f"loss must be one of {PGD_LOSSES}, got {loss!r}; use 'ce' (Madry) or 'kl' (TRADES)."
        )
    with torch.inference_mode(False), torch.enable_grad():
        # Cloning outside inference mode turns a Lightning-validation inference tensor into a normal one.
        x = x.detach().clone()
        y = y.detach().clone()
        check_box(x)
        target_probs = None
        if loss == "kl":
            target_probs = softmax_targets(model, x, target_logits)
        x_start = random_point_in_ball(x, eps, norm) if random_start else x.clone()
        return pgd_ascent(
            x,
            x_start,
            lambda x_adv: attack_loss(model(x_adv), y, loss, target_probs),
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
            eot_iter=eot_iter,
        )


def softmax_targets(model: nn.Module, x: Tensor, target_logits: Tensor | None) -> Tensor:
    if target_logits is None:
        with torch.no_grad():
            target_logits = model(x)
    return F.softmax(wide(target_logits.detach().clone()), dim=1)
