"""Evaluation attacks behind one interface, each answering "is this sample still correct after the attack?".

Every attack returns a per-sample boolean tensor, so a caller can report each attack on its own and the
per-sample worst case over several of them ("best known" robust accuracy, :func:`worst_case`), which is the only
honest number for a defence that masks gradients as MeanSparse does. The attacks themselves live in
:mod:`.autoattack` (pyautoattack's family, PGD, BPDA) and :mod:`.adaptive` (the paper's adaptive attack); the
common rules in :mod:`.common`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from meansparse_pl.attacks import autoattack as aa
from meansparse_pl.attacks.adaptive import adaptive
from meansparse_pl.attacks.common import (
    AttackContext,
    AttackSpec,
    evaluation_context,
    model_device,
    require_classes,
    require_image_batch,
)
from meansparse_pl.attacks.pgd import check_box
from meansparse_pl.attacks.verdicts import PerSample, worst_case
from meansparse_pl.config import AttackConfig, ThreatModel, check_number, check_positive_int
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.inputs import logits_of, parameter_dtype
from meansparse_pl.ops import backward_mode, operators
from meansparse_pl.ops.functions import DEFAULT_TEMPERATURE, check_backward_mode

_LOG = logging.getLogger(__name__)

# Every gradient attack takes `backward` (the operators' backward while it runs: exact, straight_through or
# surrogate; None keeps the model's) and the surrogate's `temperature`: one switch, not one attack per mode.
# Every gradient attack also takes `eot_iter`: gradients averaged per step (Expectation over Transformation), the
# answer to a model whose forward pass is random (the diagnostics' randomness indicator says when).
_BACKWARD = {"backward": None, "temperature": DEFAULT_TEMPERATURE, "eot_iter": 1}
_APGD_DEFAULTS = {"n_iter": 100, "n_restarts": 1, "rho": 0.75, **_BACKWARD}
_PGD_DEFAULTS = {"steps": 50, "step_size": None, "n_restarts": 1, "random_start": True, **_BACKWARD}

_REGISTRY: dict[str, AttackSpec] = {
    "clean": AttackSpec(aa.clean, family="clean"),
    "apgd-ce": AttackSpec(aa.apgd("ce"), dict(_APGD_DEFAULTS)),
    "apgd-dlr": AttackSpec(aa.apgd("dlr"), dict(_APGD_DEFAULTS), min_classes=3),
    # run as one attack by run_attack; in a report, the per-sample AND of its parts' columns
    "apgd-ce+dlr": AttackSpec(
        aa.apgd_ce_dlr, dict(_APGD_DEFAULTS), min_classes=3, parts=("apgd-ce", "apgd-dlr")
    ),
    "apgd-t": AttackSpec(aa.apgd_t, {**_APGD_DEFAULTS, "n_target_classes": 9}, min_classes=4),
    "pgd": AttackSpec(aa.pgd, dict(_PGD_DEFAULTS)),
    "fab-t": AttackSpec(
        aa.fab_t,
        {
            "n_iter": 100,
            "n_restarts": 1,
            "n_target_classes": 9,
            "backward": None,
            "temperature": DEFAULT_TEMPERATURE,
        },
    ),
    "square": AttackSpec(
        aa.square, {"n_queries": 5000, "n_restarts": 1, "p_init": 0.8}, needs_images=True, family="black_box"
    ),
    "autoattack": AttackSpec(
        aa.autoattack,
        {"n_iter": 100, "n_queries": 5000, "n_target_classes": 9, **_BACKWARD},
        min_classes=4,
        needs_images=True,
        whole_set=True,
        family="ensemble",
    ),
    # APGD-CE through the straight-through backward (BPDA) and through the smooth surrogate: presets of the switch
    "bpda-apgd-ce": AttackSpec(
        aa.apgd("ce"),
        {**_APGD_DEFAULTS, "backward": "straight_through"},
        family="adaptive",
        masking_words="BPDA-APGD-CE (straight-through backward)",
    ),
    "surrogate-apgd-ce": AttackSpec(
        aa.apgd("ce"),
        {**_APGD_DEFAULTS, "backward": "surrogate"},
        family="adaptive",
        masking_words="APGD-CE through the smooth surrogate backward",
    ),
    # APGD-CE on the base model (every alpha 0), judged on the MeanSparse model: a transfer attack
    "transfer-base": AttackSpec(
        aa.transfer_base,
        {"n_iter": 100, "n_restarts": 1, "rho": 0.75, "eot_iter": 1},
        family="transfer",
        masking_words="APGD-CE transferred from the base model",
    ),
    "adaptive": AttackSpec(
        adaptive, {**_PGD_DEFAULTS, "p": 1.0, "q": 1.0, "lambda_": 1.0}, family="adaptive"
    ),
}
# the attacks that reduce to another one on a model without operators
_REDUCES_WITHOUT_OPERATORS = {
    "bpda-apgd-ce": "apgd-ce",
    "surrogate-apgd-ce": "apgd-ce",
    "transfer-base": "apgd-ce",
    "adaptive": "pgd",
}

ATTACK_NAMES: tuple[str, ...] = tuple(_REGISTRY)

# Views of the attacks' facts, in the registry's order (derived here, written nowhere else)
#: combined columns -> the attacks whose per-sample verdicts they AND
COMPOSITE_ATTACKS: dict[str, tuple[str, ...]] = {n: s.parts for n, s in _REGISTRY.items() if s.parts}
#: white-box attacks on the model's own gradient (AutoAttack is left out: it includes Square)
EXACT_WHITE_BOX: tuple[str, ...] = tuple(
    n for n, s in _REGISTRY.items() if s.family == "exact" and not s.parts
)
#: every white-box attack: exact, adaptive and AutoAttack
WHITE_BOX_ATTACKS: tuple[str, ...] = tuple(
    n for n, s in _REGISTRY.items() if s.family in ("exact", "adaptive", "ensemble") and not s.parts
)
BLACK_BOX_ATTACKS: tuple[str, ...] = tuple(n for n, s in _REGISTRY.items() if s.family == "black_box")
BLACK_BOX_OR_TRANSFER: tuple[str, ...] = tuple(
    n for n, s in _REGISTRY.items() if s.family in ("black_box", "transfer")
)
#: attacks that see past the operators' masked gradient -> how a gradient-masking flag names each
MASKING_WORDS: dict[str, str] = {n: s.masking_words for n, s in _REGISTRY.items() if s.masking_words}
#: the columns of the per-sample worst case over every attack (the report says best_known, the search worst_case)
BEST_KNOWN_COLUMNS = ("best_known", "worst_case")


def column_verdicts(per_attack: Mapping[str, PerSample], column: str) -> PerSample:
    """The per-sample verdicts of one column of any result: an attack's own, a combined column's (its parts'
    ANDed) or the best known (every attack's ANDed): the one rule every report reads its columns by."""
    if column in BEST_KNOWN_COLUMNS:
        return worst_case(per_attack.values())
    if column in COMPOSITE_ATTACKS:
        return worst_case([per_attack[part] for part in COMPOSITE_ATTACKS[column]])
    return per_attack[column]


def attack_options(name: str) -> dict[str, Any]:
    """The options ``name`` accepts and their defaults (``step_size=None`` means ``eps / 8``)."""
    return dict(_spec(name).defaults)


def _spec(name: str) -> AttackSpec:
    if name not in _REGISTRY:
        raise ConfigurationError(f"unknown attack {name!r}; choose one of {', '.join(ATTACK_NAMES)}.")
    return _REGISTRY[name]


def _positive_int(name: str, attack: str, value: Any) -> int:
    return check_positive_int(f"attack {attack!r}: option {name}", value)


def _resolve_options(name: str, spec: AttackSpec, options: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(options) - set(spec.defaults))
    if unknown:
        accepted = ", ".join(spec.defaults) or "none"
        raise ConfigurationError(
            f"attack {name!r} does not take option(s) {', '.join(unknown)}; it accepts: {accepted}."
        )
    resolved = {**spec.defaults, **options}
    for key in ("n_iter", "n_restarts", "n_queries", "steps", "n_target_classes", "eot_iter"):
        if key in resolved:
            resolved[key] = _positive_int(key, name, resolved[key])
    where = f"attack {name!r}: "
    if resolved.get("step_size") is not None:
        check_number(
            where + "step_size", resolved["step_size"], minimum=0.0, strict=True, hint="or None for eps/8"
        )
    if "p" in resolved:
        check_number(where + "p", resolved["p"], minimum=1.0, hint="a norm; the paper uses 1 or 2")
    if "q" in resolved:
        check_number(
            where + "q", resolved["q"], minimum=1.0, hint="smaller powers have an infinite gradient at 0"
        )
    if "lambda_" in resolved:
        check_number(where + "lambda_", resolved["lambda_"], minimum=0.0)
    if resolved.get("backward") is not None:
        check_backward_mode(resolved["backward"])
    if "temperature" in resolved:
        check_number(
            where + "temperature", resolved["temperature"], minimum=0.0, strict=True, hint="e.g. 0.1"
        )
    return resolved


def options_for(config: AttackConfig, name: str) -> dict[str, Any]:
    """The options ``config`` gives attack ``name``: its ``n_iter`` / ``n_restarts`` / ``eot_iter`` where the
    attack takes them, then the attack's own entry of ``config.options``."""
    accepted = _spec(name).defaults
    shared = {"n_iter": config.n_iter, "n_restarts": config.n_restarts, "eot_iter": config.eot_iter}
    options = {key: value for key, value in shared.items() if value is not None and key in accepted}
    return {**options, **config.options.get(name, {})}


def check_attack_config(config: AttackConfig, composites: dict[str, tuple[str, ...]] | None = None) -> None:
    """Check every attack name and option of ``config`` against the registry (before any data is loaded).

    ``composites`` maps report columns that are computed from other attacks (e.g. ``apgd-ce+dlr``) to them;
    their options are checked on each part."""
    for name in [*config.names, *config.cascade]:
        for part in (composites or {}).get(name, (name,)):
            _resolve_options(part, _spec(part), options_for(config, part))
    if any(name in (composites or {}) for name in config.cascade):
        raise ConfigurationError(
            "a cascade runs single attacks; list the parts of a combined column instead."
        )
    running = {
        part for name in [*config.names, *config.cascade] for part in (composites or {}).get(name, (name,))
    }
    stray = sorted(set(config.options) - running)
    if stray:
        raise ConfigurationError(
            f"options are given for {', '.join(stray)}, which is not an attack that runs ({', '.join(sorted(running))}); "
            "add it to the names or remove its options (a combined column such as apgd-ce+dlr takes its parts')."
        )


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
    threat = ThreatModel(norm, eps)  # type: ignore[arg-type]
    eps, norm = threat.eps, threat.norm
    opts = _resolve_options(name, spec, options)
    batch_size = _positive_int("batch_size", name, batch_size)
    _check_inputs(name, spec, model, x, y, norm)
    device = model_device(model, x)
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device)
    with evaluation_context(model, device):
        # Allocated here, outside any caller's inference mode, so that it can be filled in place.
        result = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
        x, y = _detached_inputs(model, x, y)
        with torch.no_grad():
            n_classes = int(logits_of(model(x[:1].to(device)), 1, where=f"attack {name!r}").shape[-1])
        require_classes(name, n_classes, spec.min_classes)
        with _operator_backward(model, opts):
            if spec.whole_set:
                ctx = AttackContext(
                    model, eps, norm, seed, device, n_classes, {**opts, "batch_size": batch_size}
                )
                return spec.run(ctx, x, y).to(result.device)
            ctx = AttackContext(model, eps, norm, seed, device, n_classes, opts)
            batches = tqdm(
                range(0, x.shape[0], batch_size),
                desc=name,
                unit="batch",
                disable=(not progress) if progress is not None else None,
                leave=False,
            )
            for start in batches:
                xb = x[start : start + batch_size].to(device)
                yb = y[start : start + batch_size].to(device)
                result[start : start + batch_size] = spec.run(ctx, xb, yb).to(result.device)
    return result


def _operator_backward(model: nn.Module, opts: dict[str, Any]) -> contextlib.AbstractContextManager:
    """The operators' backward the attack asks for (``backward`` option), or nothing to switch."""
    mode = opts.get("backward")
    if mode is None or not operators(model):
        return contextlib.nullcontext()
    return backward_mode(model, mode, opts["temperature"])


def _detached_inputs(model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """Copies of the images (in the model's float dtype when they are float64) and the labels (long), checked to
    lie in the [0, 1] box."""
    x = x.detach().clone()
    dtype = parameter_dtype(model, default=x.dtype)
    if x.dtype == torch.float64 and dtype != torch.float64:  # float64 images for a float32 model
        x = x.to(dtype)
    check_box(x)
    return x, y.detach().clone().long()


def _check_inputs(name: str, spec: AttackSpec, model: nn.Module, x: Tensor, y: Tensor, norm: str) -> None:
    """One line for images and labels that do not pair up or that the attack cannot take; a warning when the
    attack reduces to another one on a model without operators."""
    if y.dim() != 1 or x.shape[0] != y.shape[0]:
        raise ConfigurationError(
            f"x and y must hold the same number of samples with y of shape (N,), got x {tuple(x.shape)} and y "
            f"{tuple(y.shape)}."
        )
    if spec.needs_images:
        require_image_batch(name, x, norm)
    if name in _REDUCES_WITHOUT_OPERATORS and not operators(model):
        _LOG.warning("%s: the model has no MeanSparse operators, so it reduces to %s.", name,
                     _REDUCES_WITHOUT_OPERATORS[name])  # fmt: skip
