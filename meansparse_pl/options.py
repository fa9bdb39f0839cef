"""The command line's boundary check: every option of a MeanSparse subcommand that can be checked without data
or a model (attack names and options, threat model, alphas, batch sizes, limits, paths), right after parsing, so
a bad value is one line before anything is loaded. ``cli.py`` runs it once; the subcommands and the runners they
call take the checked values (their config objects check themselves on construction when built from Python).

Adding a subcommand: one entry in :data:`CHECKS`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from meansparse_pl.alpha_search import check_alphas
from meansparse_pl.attacks import COMPOSITE_ATTACKS, check_attack_config
from meansparse_pl.config import (
    AttackConfig,
    ComparedModel,
    DiagnosticsConfig,
    PlacementConfig,
    ThreatModel,
    check_alpha,
    check_distinct,
    check_not_both,
    check_number,
    check_optional_positive_int,
    check_positive_int,
)
from meansparse_pl.errors import ConfigurationError, DataNotFoundError
from meansparse_pl.placement import get_preset

Options = Mapping[str, Any]


def _as(cls: type, value: Any) -> Any:
    """A config object from the value LightningCLI parsed: the object itself, or its fields (a Namespace or a
    dict), checked by the object's own constructor."""
    if value is None or isinstance(value, cls):
        return value
    fields = value.as_dict() if hasattr(value, "as_dict") else dict(value)
    return cls(**fields)


def _existing_file(name: str, value: Any) -> None:
    if value is None:
        return
    path = Path(value)
    if not path.is_file():
        raise DataNotFoundError(f"no {name} file at {path}; check the path (a directory or a typo?).")


def _writable_file(name: str, value: Any) -> None:
    if value is not None and Path(value).is_dir():
        raise ConfigurationError(f"{name} {value} is a directory; give a file name inside it.")


def _common(get: Callable[..., Any]) -> None:
    """What every MeanSparse subcommand shares: diagnostics, batch size, sample limit."""
    _as(DiagnosticsConfig, get("diagnostics"))
    check_positive_int("batch_size", get("batch_size", 1), "the number of images per attacked batch")
    check_optional_positive_int("limit_samples", get("limit_samples"), "or null for every sample")


def _postprocess(get: Callable[..., Any]) -> None:
    check_alpha(get("alpha", 0.0))
    placement = _as(PlacementConfig, get("placement"))
    if placement is not None and placement.strategy != "published":
        get_preset(placement.preset)
    check_not_both("postprocess", "checkpoint", get("checkpoint"), "weights", get("weights"))
    _existing_file("weights", get("weights") if get("weights") is not None else get("checkpoint"))
    _writable_file("output", get("output"))
    output_dir = get("output_dir")
    if output_dir is not None and Path(output_dir).is_file():
        raise ConfigurationError(
            f"output_dir {output_dir} is a file; give a folder (meansparse.pt is written in it)."
        )


def _alpha_search(get: Callable[..., Any]) -> None:
    _existing_file("checkpoint", get("checkpoint"))
    _as(ThreatModel, get("threat"))
    check_alphas(get("alphas", [0.0]))
    check_number("max_clean_drop", get("max_clean_drop", 0.5), minimum=0.0, hint="in points")
    attacks = _as(AttackConfig, get("attacks"))
    if attacks is not None:
        check_attack_config(attacks)


def _evaluate(get: Callable[..., Any]) -> None:
    """evaluate, diagnose and compare: an evaluation's attacks, radii and alpha."""
    _existing_file("checkpoint", get("checkpoint"))
    threat = _as(ThreatModel, get("threat")) or ThreatModel()
    attacks = _as(AttackConfig, get("attacks"))
    if attacks is not None:
        check_attack_config(attacks, COMPOSITE_ATTACKS)
    check_distinct("eps", [threat.eps, *(threat.with_eps(eps).eps for eps in get("extra_eps") or [])])
    if get("large_eps") is not None:
        threat.with_eps(get("large_eps"))
    if get("alpha") is not None:
        check_alpha(get("alpha"))
    site = get("histogram_site")
    if site is not None and (isinstance(site, bool) or not isinstance(site, int) or site < 0):
        raise ConfigurationError(f"histogram_site must be an operator site index >= 0, got {site!r}.")


def _compare(get: Callable[..., Any]) -> None:
    entries = [_as(ComparedModel, m) for m in get("models") or []]
    if len(entries) < 2:
        raise ConfigurationError(
            "compare needs at least two models (a control and one to compare with it), each as "
            "{label: ..., checkpoint: ...}."
        )
    labels = [m.label for m in entries]
    if len(set(labels)) != len(labels):
        raise ConfigurationError(f"compared model labels must be unique, got {labels}.")
    if get("control") not in labels:
        raise ConfigurationError(
            f"control {get('control')!r} is not one of the compared models' labels {labels}; name the "
            "equal-budget control's label."
        )
    for m in entries:
        _existing_file(f"{m.label} checkpoint", m.checkpoint)
    _evaluate(get)


#: each MeanSparse subcommand's checks (after the ones every subcommand shares)
CHECKS: dict[str, Callable[[Callable[..., Any]], None]] = {
    "postprocess": _postprocess,
    "alpha_search": _alpha_search,
    "evaluate": _evaluate,
    "diagnose": _evaluate,
    "compare": _compare,
}


def check_options(subcommand: str, options: Options) -> None:
    """Every check of ``subcommand``'s own options that needs no data and no model (Lightning's own subcommands
    have none here); the first problem raises one :class:`~meansparse_pl.errors.ConfigurationError` line."""
    check = CHECKS.get(subcommand)
    if check is not None:
        _common(options.get)
        check(options.get)
