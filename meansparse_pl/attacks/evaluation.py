"""Evaluation attacks behind one interface, each answering "is this sample still correct after the attack?".

Every attack returns a per-sample boolean tensor, so a caller can report each attack on its own and the
per-sample worst case over several of them ("best known" robust accuracy = logical AND across attacks),
which is the only honest number for a defence that masks gradients as MeanSparse does.

The AutoAttack family (APGD-CE / -DLR / -T, FAB-T, Square, standard AutoAttack) is pyautoattack's own code;
only the glue lives here. Two attacks are specific to MeanSparse:

* ``bpda-apgd-ce``: APGD-CE with every MeanSparse operator's backward replaced by the identity (BPDA,
  Athalye et al. 2018). The operator's exact gradient is zero inside its band, which starves gradient
  attacks; the straight-through gradient does not. The forward pass is identical, so the adversarial points
  found are judged with the real model.
* ``adaptive``: the paper's Adaptive-(p, q) PGD (Amini et al. 2024, eq. 8, appendix A.4), which maximises
  ``CE(f(x + d), y) - lambda * sum_i || m_i * (z_i - z_i^d) ||_p^q`` where ``z_i`` is the input of the i-th
  MeanSparse operator on the clean image, ``z_i^d`` on the perturbed one, and ``m_i`` marks the features of
  the clean image that lie inside the operator's band (the ones MeanSparse overwrites).

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
import logging
import math
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from pyautoattack import AutoAttack
from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted
from pyautoattack.fab_pt import FABAttack_PT
from pyautoattack.square import SquareAttack
from torch import Tensor, nn
from tqdm.auto import tqdm

from meansparse_pl.attacks.training import (
    _check_box,
    _pgd_from,
    _project,
    _random_start,
    check_eps,
    check_norm,
    eval_mode,
    pgd_perturb,
)
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.operator import MeanSparse, backward_mode, operators

_LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def _frozen_parameters(model: nn.Module) -> Iterator[None]:
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def _model_device(model: nn.Module, x: Tensor) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return x.device


@contextlib.contextmanager
def _evaluation_context(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Eval mode, frozen parameters, gradients enabled (even inside a Lightning validation step running in
    inference mode) and the caller's RNG state preserved."""
    cuda_devices = [device] if device.type == "cuda" else []
    with (
        torch.random.fork_rng(devices=cuda_devices),
        torch.inference_mode(False),
        torch.enable_grad(),
        eval_mode(model),
        _frozen_parameters(model),
    ):
        yield


def _seed_everything(seed: int, device: torch.device) -> None:
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


@torch.no_grad()
def _judge(model: nn.Module, x: Tensor, x_adv: Tensor, y: Tensor, eps: float, norm: str) -> Tensor:
    """Correct clean AND correct at the adversarial point projected onto the threat model."""
    x_adv = _project(x_adv.detach().to(x.dtype), x, eps, norm)
    clean_ok = model(x).argmax(dim=1) == y
    adv_ok = model(x_adv).argmax(dim=1) == y
    return clean_ok & adv_ok


def _n_target_classes(requested: int, n_classes: int) -> int:
    # pyautoattack indexes the sorted logits with -target_class for target_class in 2..n_target_classes+1, so
    # more targets than n_classes - 1 is an IndexError; AutoAttack's standard 9 assumes 10+ classes.
    return max(1, min(int(requested), n_classes - 1))


def _require_classes(name: str, n_classes: int, minimum: int) -> None:
    if n_classes < minimum:
        raise ConfigurationError(
            f"attack {name!r} needs a model with at least {minimum} classes (its DLR loss uses the top "
            f"{minimum} logits), this one has {n_classes}; use 'apgd-ce', 'fab-t', 'square' or 'pgd' instead."
        )


def _require_image_batch(name: str, x: Tensor, norm: str) -> None:
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


def _make_apgd(
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
        eot_iter=1,
        rho=rho,
        verbose=False,
        device=device,
    )


def _make_apgd_t(
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
) -> APGDAttack_targeted:
    return APGDAttack_targeted(
        model,
        n_iter=n_iter,
        norm=norm,
        n_restarts=n_restarts,
        eps=eps,
        seed=seed,
        eot_iter=1,
        rho=rho,
        n_target_classes=n_target_classes,
        verbose=False,
        device=device,
    )


# ------------------------------------------------------------------------------------ attack registry
@dataclass(frozen=True)
class _Context:
    """What every per-batch attack function receives besides the batch itself."""

    model: nn.Module
    eps: float
    norm: str
    seed: int
    device: torch.device
    n_classes: int
    options: dict[str, Any]


# A per-batch attack: (context, x, y) -> bool tensor "still correct".
BatchAttack = Callable[[_Context, Tensor, Tensor], Tensor]


@dataclass(frozen=True)
class _Spec:
    run: BatchAttack
    defaults: dict[str, Any] = field(default_factory=dict)
    min_classes: int = 2
    needs_images: bool = False
    whole_set: bool = False  # the attack does its own batching (AutoAttack)


def _clean(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    with torch.no_grad():
        return ctx.model(x).argmax(dim=1) == y


def _pgd(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    opts = ctx.options
    step_size = opts["step_size"] if opts["step_size"] is not None else ctx.eps / 8
    correct = _judge(ctx.model, x, x, y, ctx.eps, ctx.norm)
    _seed_everything(ctx.seed, ctx.device)
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
        )
        correct &= _judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)
    return correct


def _apgd(loss: str, straight_through: bool = False) -> BatchAttack:
    def run(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
        o = ctx.options
        attack = _make_apgd(
            ctx.model,
            loss=loss,
            eps=ctx.eps,
            norm=ctx.norm,
            seed=ctx.seed,
            device=ctx.device,
            n_iter=o["n_iter"],
            n_restarts=o["n_restarts"],
            rho=o["rho"],
        )
        # Only the gradient changes; the adversarial point is judged below with the real (exact) model.
        # Without BPDA the operators keep whatever backward the caller gave them.
        with backward_mode(ctx.model, "straight_through") if straight_through else contextlib.nullcontext():
            x_adv = attack.perturb(x, y)
        return _judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)

    return run


def _apgd_ce_dlr(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    return _apgd("ce")(ctx, x, y) & _apgd("dlr")(ctx, x, y)


def _apgd_t(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    attack = _make_apgd_t(
        ctx.model,
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=o["n_restarts"],
        rho=o["rho"],
        n_target_classes=_n_target_classes(o["n_target_classes"], ctx.n_classes),
    )
    return _judge(ctx.model, x, attack.perturb(x, y), y, ctx.eps, ctx.norm)


def _fab_t(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
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
        n_target_classes=_n_target_classes(o["n_target_classes"], ctx.n_classes),
    )
    return _judge(ctx.model, x, attack.perturb(x, y), y, ctx.eps, ctx.norm)


def _square(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
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
    return _judge(ctx.model, x, x_adv, y, ctx.eps, ctx.norm)


def _autoattack(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    """Standard AutoAttack over the whole set (pyautoattack batches it and attacks only the samples still
    robust after the previous attack); the iteration counts can be lowered for tests."""
    o = ctx.options
    adversary = AutoAttack(
        ctx.model, norm=ctx.norm, eps=ctx.eps, seed=ctx.seed, version="standard", device=ctx.device
    )
    n_targets = _n_target_classes(o["n_target_classes"], ctx.n_classes)
    adversary.apgd = _make_apgd(
        ctx.model,
        loss="ce",
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=1,
        rho=0.75,
    )
    adversary.apgd_targeted = _make_apgd_t(
        ctx.model,
        eps=ctx.eps,
        norm=ctx.norm,
        seed=ctx.seed,
        device=ctx.device,
        n_iter=o["n_iter"],
        n_restarts=1,
        n_target_classes=n_targets,
        rho=0.75,
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
        correct[start : start + bs] = _judge(ctx.model, xb, ab, yb, ctx.eps, ctx.norm).to(x.device)
    return correct


# ------------------------------------------------------------------------------ adaptive (p, q) attack
def band_mask(op: MeanSparse, z: Tensor) -> Tensor:
    """Where ``op`` overwrites its input ``z``: ``|z - centre| <= alpha * sigma`` per channel (paper A.4).

    Empty when alpha is 0 (the operator is then the identity). Uses the operator's own centre (channel mean,
    zero or global mean) and threshold, so the mask matches what the operator does.
    """
    if float(op.alpha) == 0.0:
        return torch.zeros_like(z, dtype=torch.bool)
    centre, threshold = op._centre_and_threshold(z)
    return (z - centre).abs() <= threshold


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


def _adaptive(ctx: _Context, x: Tensor, y: Tensor) -> Tensor:
    o = ctx.options
    step_size = o["step_size"] if o["step_size"] is not None else ctx.eps / 8
    lambda_, p, q = o["lambda_"], o["p"], o["q"]
    model = ctx.model
    correct = _judge(model, x, x, y, ctx.eps, ctx.norm)
    bpda = backward_mode(model, "straight_through") if o["straight_through"] else contextlib.nullcontext()
    with _OperatorInputs(model) as recorder, bpda:
        with torch.no_grad():
            _, recorded = recorder.capture(lambda: model(x))
            clean = [(band_mask(op, z), z.detach()) for op, z in recorded]

        def objective(x_adv: Tensor) -> Tensor:
            logits, recorded_adv = recorder.capture(lambda: model(x_adv))
            ce = F.cross_entropy(logits.float(), y, reduction="sum")
            penalty = adaptive_penalty(clean, [z for _, z in recorded_adv], p, q)
            return ce - lambda_ * penalty

        _seed_everything(ctx.seed, ctx.device)
        for _ in range(o["n_restarts"]):
            if not bool(correct.any()):
                break
            start = _random_start(x, ctx.eps, ctx.norm) if o["random_start"] else x.clone()
            x_adv = _pgd_from(
                x, start, objective, eps=ctx.eps, step_size=step_size, steps=o["steps"], norm=ctx.norm
            )
            correct &= _judge(model, x, x_adv, y, ctx.eps, ctx.norm)
    return correct


# ----------------------------------------------------------------------------------------- registry
_APGD_DEFAULTS = {"n_iter": 100, "n_restarts": 1, "rho": 0.75}
_PGD_DEFAULTS = {"steps": 50, "step_size": None, "n_restarts": 1, "random_start": True}

_REGISTRY: dict[str, _Spec] = {
    "clean": _Spec(_clean),
    "pgd": _Spec(_pgd, dict(_PGD_DEFAULTS)),
    "apgd-ce": _Spec(_apgd("ce"), dict(_APGD_DEFAULTS)),
    "apgd-dlr": _Spec(_apgd("dlr"), dict(_APGD_DEFAULTS), min_classes=3),
    "apgd-ce+dlr": _Spec(_apgd_ce_dlr, dict(_APGD_DEFAULTS), min_classes=3),
    "apgd-t": _Spec(_apgd_t, {**_APGD_DEFAULTS, "n_target_classes": 9}, min_classes=4),
    "fab-t": _Spec(_fab_t, {"n_iter": 100, "n_restarts": 1, "n_target_classes": 9}),
    "square": _Spec(_square, {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8}, needs_images=True),
    "autoattack": _Spec(
        _autoattack,
        {"n_iter": 100, "n_queries": 5000, "n_target_classes": 9},
        min_classes=4,
        needs_images=True,
        whole_set=True,
    ),
    "bpda-apgd-ce": _Spec(_apgd("ce", straight_through=True), dict(_APGD_DEFAULTS)),
    "adaptive": _Spec(
        _adaptive, {**_PGD_DEFAULTS, "p": 1.0, "q": 1.0, "lambda_": 1.0, "straight_through": False}
    ),
}

ATTACK_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def attack_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts and their defaults (``step_size=None`` means ``eps / 8``)."""
    return dict(_spec(name).defaults)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise ConfigurationError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}.")
    return _REGISTRY[name]


def _positive_int(name: str, attack: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value or value < 1:
        raise ConfigurationError(f"attack {attack!r}: option {name} must be an integer >= 1, got {value!r}.")
    return int(value)


def _resolve_options(name: str, spec: _Spec, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(spec.defaults) or "none"
        raise ConfigurationError(
            f"attack {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}."
        )
    resolved = {**spec.defaults, **options}
    for key in ("n_iter", "n_restarts", "n_queries", "steps", "n_target_classes"):
        if key in resolved:
            resolved[key] = _positive_int(key, name, resolved[key])
    step = resolved.get("step_size")
    if step is not None and (not (float(step) > 0) or math.isinf(float(step))):
        raise ConfigurationError(
            f"attack {name!r}: step_size must be a finite number > 0 (or None for eps/8)."
        )
    if "p" in resolved and not float(resolved["p"]) >= 1.0:
        raise ConfigurationError(
            f"attack {name!r}: p must be >= 1 (a norm), got {resolved['p']}; the paper uses 1 or 2."
        )
    if "q" in resolved and not float(resolved["q"]) >= 1.0:
        raise ConfigurationError(
            f"attack {name!r}: q must be >= 1 (smaller powers have an infinite gradient at zero), got {resolved['q']}."
        )
    if "lambda_" in resolved and not (
        float(resolved["lambda_"]) >= 0 and math.isfinite(float(resolved["lambda_"]))
    ):
        raise ConfigurationError(
            f"attack {name!r}: lambda_ must be a finite number >= 0, got {resolved['lambda_']}."
        )
    return resolved


def run_attack(
    name: str,
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    norm: str = "Linf",
    seed: int = 0,
    batch_size: int = 256,
    progress: bool | None = None,
    **options: Any,
) -> Tensor:
    """Run evaluation attack ``name`` and return, per sample, whether the model is still correct.

    Args:
        name: one of :data:`ATTACK_NAMES`.
        model: classifier taking [0, 1] images; attacked in eval mode on the device of its parameters.
        x, y: images in [0, 1] ``(N, ...)`` and integer labels ``(N,)``, on any device.
        eps: threat-model radius; norm: ``"Linf"`` or ``"L2"``.
        seed: seed of every random choice (restarts, Square's squares); the caller's RNG state is restored.
        batch_size: samples per attacked batch.
        progress: tqdm bar over batches; ``None`` shows it only on a terminal.
        **options: attack-specific knobs, see :func:`attack_options` (e.g. ``n_iter``, ``n_restarts``,
            ``n_queries``, ``steps``, ``step_size``, ``p``, ``q``, ``lambda_``). Defaults are the standard
            settings (APGD 100 iterations, Square 5000 queries, PGD-50 / adaptive with step eps/8 as in A.4).

    Returns:
        Bool tensor ``(N,)`` on ``x``'s device: True where the sample is correctly classified both clean and
        at the attack's adversarial point. Combine attacks with ``&`` for the per-sample worst case.
    """
    spec = _spec(name)
    eps = check_eps(eps)
    norm = check_norm(norm)
    opts = _resolve_options(name, spec, options)
    batch_size = _positive_int("batch_size", name, batch_size)
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ConfigurationError(
            f"x and y must hold the same number of samples with y of shape (N,), got x {tuple(x.shape)} and y "
            f"{tuple(y.shape)}."
        )
    if spec.needs_images:
        _require_image_batch(name, x, norm)
    if name in ("bpda-apgd-ce", "adaptive") and not operators(model):
        _LOG.warning("%s: the model has no MeanSparse operators, so it reduces to %s.", name,
                     "apgd-ce" if name == "bpda-apgd-ce" else "pgd")  # fmt: skip
    device = _model_device(model, x)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with _evaluation_context(model, device):
        # Allocated here, outside any caller's inference mode, so that it can be filled in place.
        result = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        x = x.detach().clone()
        y = y.detach().clone().long()
        _check_box(x)
        with torch.no_grad():
            n_classes = int(model(x[:1].to(device)).shape[-1])
        _require_classes(name, n_classes, spec.min_classes)
        if spec.whole_set:
            ctx = _Context(model, eps, norm, seed, device, n_classes, {**opts, "batch_size": batch_size})
            return spec.run(ctx, x, y).to(result.device)
        ctx = _Context(model, eps, norm, seed, device, n_classes, opts)
        starts = range(0, x.shape[0], batch_size)
        for start in tqdm(
            starts,
            desc=name,
            unit="batch",
            disable=(not progress) if progress is not None else None,
            leave=False,
        ):
            xb = x[start : start + batch_size].to(device)
            yb = y[start : start + batch_size].to(device)
            result[start : start + batch_size] = spec.run(ctx, xb, yb).to(result.device)
    return result


def worst_case(results: dict[str, Tensor] | list[Tensor]) -> Tensor:
    """Per-sample worst case over attacks ("best known" attack): correct only if correct under every one."""
    tensors = list(results.values()) if isinstance(results, dict) else list(results)
    if not tensors:
        raise ConfigurationError("worst_case needs at least one attack result; run at least one attack.")
    out = tensors[0].clone()
    for t in tensors[1:]:
        if t.shape != out.shape:
            raise ConfigurationError(
                f"attack results cover different samples (shapes {tuple(out.shape)} and {tuple(t.shape)}); "
                "run every attack on the same x, y."
            )
        out &= t.to(out.device)
    return out
