"""``diagnose``: every indicator of attack failure for a model, its variants and, when given, an evaluation's
per-sample verdicts. ``evaluate``, ``compare`` and the ``diagnose`` subcommand call it; so can anyone, without a
Trainer.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from meansparse_pl.attacks import attack_options, options_for
from meansparse_pl.attacks.common import evaluation_context, model_device
from meansparse_pl.config import AttackConfig, DiagnosticsConfig, ThreatModel
from meansparse_pl.diagnostics.gradients import (
    gradient_indicators,
    labels_kept,
    operator_band_indicator,
    randomness_indicator,
)
from meansparse_pl.diagnostics.indicators import Diagnostics, Indicator, Probe
from meansparse_pl.diagnostics.optimisation import (
    default_large_eps,
    large_eps_indicators,
    optimisation_indicators,
)
from meansparse_pl.diagnostics.per_sample import VerdictBlocks, verdict_indicators
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.inputs import check_images, check_labels, logits_of, parameter_dtype, sample_pair
from meansparse_pl.ops import operators, set_alpha, temporary_alpha

# a variant's operator setting: one alpha, one per operator, or None for the model as it is
Setting = float | Sequence[float] | None


def seeded_subset(
    data: Dataset | DataLoader | tuple[Tensor, Tensor], size: int, seed: int
) -> tuple[Tensor, Tensor]:
    """Up to ``size`` samples of ``data`` in a seeded random order (the same samples for every variant and run)."""
    if isinstance(data, tuple):
        x, y = data
        order = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:size]
        return x[order], torch.as_tensor(y)[order]
    dataset = data.dataset if isinstance(data, DataLoader) else data
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "__getitem__"):
        raise ConfigurationError(
            f"diagnose takes a Dataset, a DataLoader or an (images, labels) pair, got {type(data).__name__}."
        )
    count = len(dataset)  # type: ignore[arg-type]
    if count == 0:
        raise ConfigurationError("the diagnostics data set is empty.")
    order = torch.randperm(count, generator=torch.Generator().manual_seed(seed))[:size].tolist()
    pairs = [sample_pair(dataset[i], i) for i in order]
    return torch.stack([torch.as_tensor(p[0]) for p in pairs]), torch.as_tensor([int(p[1]) for p in pairs])


def checked_subset(model: nn.Module, x: Tensor, y: Tensor, device: torch.device) -> tuple[Tensor, Tensor]:
    """The package's input contract on the subset (the evaluation's, once more for a standalone run)."""
    where = "diagnostics"
    x = check_images(x, where=where, dtype=parameter_dtype(model)).to(device)
    with torch.no_grad():
        num_classes = int(logits_of(model(x[:1]), 1, where=where).shape[1])
    return x, check_labels(y, num_classes, x.shape[0], where=where).long().to(device)


def probe_variant(probe: Probe, config: DiagnosticsConfig) -> list[Indicator]:
    """Every model-probing indicator of one variant (the model with its operators set as they are now)."""
    out = [randomness_indicator(probe, config.forwards)]
    correct = probe.restricted(labels_kept(probe))
    if correct.x.shape[0] == 0:
        return out
    out += gradient_indicators(correct)
    attack_checks, run = optimisation_indicators(correct, config.expensive)
    out += attack_checks
    band = operator_band_indicator(correct, run.x_adv)
    out += [band] if band is not None else []
    if config.expensive:
        large = config.large_eps if config.large_eps is not None else default_large_eps(probe.norm, probe.x)
        out += large_eps_indicators(correct, run.kept, large)
    return out


def with_causes(diagnostics: Diagnostics) -> Diagnostics:
    """Each ``adaptive_beats_exact`` entry with the cause the probes measured for its variant."""
    indicators = [
        Indicator(
            i.indicator,
            i.variant,
            i.eps,
            {**i.measured, "cause": diagnostics.masking_cause(i.variant)},
            i.fired,
            i.rule,
            i.advice,
        )
        if i.indicator == "adaptive_beats_exact"
        else i
        for i in diagnostics.indicators
    ]
    return Diagnostics(indicators, diagnostics.subset, diagnostics.seconds)


def diagnose(
    model: nn.Module,
    data: Dataset | DataLoader | tuple[Tensor, Tensor],
    *,
    threat: ThreatModel | None = None,
    attacks: AttackConfig | None = None,
    config: DiagnosticsConfig | None = None,
    variants: Mapping[str, Setting] | None = None,
    seed: int = 0,
    verdicts: VerdictBlocks | None = None,
) -> Diagnostics:
    """Indicators of attack failure for ``model`` on a seeded subset of ``data``.

    Args:
        model: a classifier taking [0, 1] images, with or without MeanSparse operators (left as they were).
        data: a Dataset, a DataLoader or an ``(images, labels)`` pair; ``config.subset`` samples are probed.
        threat: the threat model of the evaluation; attacks: its attack options (APGD-CE's ``n_iter``,
            ``n_restarts`` and ``eot_iter`` are the ones probed).
        config: subset size, forwards, large eps, test level (:class:`~meansparse_pl.config.DiagnosticsConfig`).
        variants: label -> operator setting (an alpha, one alpha per operator, or None for the model as it is),
            e.g. ``{"meansparse": None, "base": 0.0}``; default ``{"model": None}``.
        seed: the subset's order and the attacks' seeds.
        verdicts: an evaluation's per-sample verdicts, ``(variant, eps) -> attack -> sample -> correct``, for the
            per-sample indicators (black-box beats white-box, adaptive beats exact, monotone in eps).

    Returns:
        :class:`~meansparse_pl.diagnostics.Diagnostics`: one entry per indicator, variant and eps.
    """
    threat = threat if threat is not None else ThreatModel()
    attacks = attacks if attacks is not None else AttackConfig()
    config = config if config is not None else DiagnosticsConfig()
    if not isinstance(threat, ThreatModel) or not isinstance(attacks, AttackConfig):
        raise ConfigurationError("diagnose takes a ThreatModel as threat and an AttackConfig as attacks.")
    if not isinstance(config, DiagnosticsConfig):
        raise ConfigurationError(
            f"diagnose takes a DiagnosticsConfig as config, got {type(config).__name__}."
        )
    started = time.perf_counter()
    device = model_device(model, torch.zeros(()))
    options = {**attack_options("apgd-ce"), **options_for(attacks, "apgd-ce")}
    indicators: list[Indicator] = []
    with temporary_alpha(model), evaluation_context(model, device):  # eval mode before the first forward
        x, y = checked_subset(model, *seeded_subset(data, config.subset, seed), device)
        for variant, setting in (variants or {"model": None}).items():
            if setting is not None and operators(model):
                set_alpha(model, setting)  # type: ignore[arg-type]
            probe = Probe(model, x, y, variant, threat.eps, threat.norm, options, seed, config.significance)
            indicators += probe_variant(probe, config)
    indicators += verdict_indicators(verdicts or {}, config.significance)
    return with_causes(Diagnostics(indicators, x.shape[0], round(time.perf_counter() - started, 2)))


def alpha_variant(alpha: float) -> str:
    """The variant name of one alpha of a search (``alpha=0.15``), as its diagnostics and flags name it."""
    return f"alpha={alpha:g}"


def quick_diagnostics(
    model: nn.Module,
    data: Dataset | DataLoader,
    alphas: Sequence[float],
    *,
    eps: float = 0.0,
    subset: int = 64,
    seed: int = 0,
) -> Diagnostics:
    """The cheap probes (randomness, unavailable gradients, saturation, operator band; no attack) at each alpha
    on a seeded subset, variants labelled ``alpha=<a>``: what the alpha search reports and what its
    gradient-masking flags name as the cause."""
    started = time.perf_counter()
    config = DiagnosticsConfig(subset=subset)
    device = model_device(model, torch.zeros(()))
    found: list[Indicator] = []
    with temporary_alpha(model), evaluation_context(model, device):  # eval mode before the first forward
        x, y = checked_subset(model, *seeded_subset(data, subset, seed), device)
        for alpha in alphas:
            if operators(model):
                set_alpha(model, alpha)
            probe = Probe(model, x, y, alpha_variant(alpha), eps, significance=config.significance)
            found.append(randomness_indicator(probe, config.forwards))
            correct = probe.restricted(labels_kept(probe))
            if correct.x.shape[0] > 0:
                found += gradient_indicators(correct)
                band = operator_band_indicator(correct, None)
                found += [band] if band is not None else []
    return Diagnostics(found, x.shape[0], round(time.perf_counter() - started, 2))
