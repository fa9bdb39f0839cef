"""TRADES (Zhang et al., 2019): the inner maximisation of the KL divergence and the outer objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from meansparse_pl.attacks.pgd import (
    attack_loss,
    check_box,
    check_pgd_args,
    pgd_ascent,
    project,
    softmax_targets,
    wide,
)
from meansparse_pl.config import Norm, check_number
from meansparse_pl.modes import eval_mode


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
    eps, step_size, steps = check_pgd_args(eps, step_size, steps, norm)
    with torch.inference_mode(False), torch.enable_grad():
        x = x.detach().clone()
        check_box(x)
        target_probs = softmax_targets(model, x, target_logits)
        x_start = project(x + 0.001 * torch.randn_like(x), x, eps, norm)
        return pgd_ascent(
            x,
            x_start,
            lambda x_adv: attack_loss(model(x_adv), None, "kl", target_probs),
            eps=eps,
            step_size=step_size,
            steps=steps,
            norm=norm,
        )


def check_beta(beta: float) -> float:
    return check_number("TRADES beta", beta, minimum=0.0, hint="the usual value is 6.0")


def trades_objective(clean_logits: Tensor, adv_logits: Tensor, y: Tensor, beta: float) -> Tensor:
    """TRADES outer loss ``CE(clean, y) + beta * KL(softmax(clean) || softmax(adv))``.

    Both terms are batch means (KL with ``batchmean``: summed over classes, averaged over samples, which is
    the reference implementation's ``sum / batch_size``). Computed in at least float32 (bf16 / fp16 logits
    from autocast are upcast); the gradient flows through both the clean and the adversarial logits, as in
    the paper.
    """
    beta = check_beta(beta)
    clean = wide(clean_logits)
    adv = wide(adv_logits)
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
