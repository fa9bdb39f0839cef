"""Configuration objects and the one vocabulary of argument checks, shared by every entry point.

Each concept has one definition here, passed whole through the Python API, the callbacks and LightningCLI
(jsonargparse reads dataclasses): :class:`PlacementConfig` (where operators go), :class:`ThreatModel` (norm
and radius), :class:`AttackConfig` (which attacks, with which options) and :class:`ComparedModel` (one entry of
a comparison). The ``check_*`` functions are the
single place where each rule lives; every message names the problem and the fix in one line.

This module imports nothing else from the package: names that only a higher layer knows (attack names,
placement presets) are checked there, before any data or model is loaded.
"""

from __future__ import annotations

import logging
import math
import numbers
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from meansparse_pl.errors import ConfigurationError

Centre = Literal["channel_mean", "zero", "global_mean"]
CENTRES: tuple[str, ...] = ("channel_mean", "zero", "global_mean")
Strategy = Literal["auto", "fx", "hooks", "published"]
STRATEGIES: tuple[str, ...] = ("auto", "fx", "hooks", "published")
Norm = Literal["Linf", "L2"]
NORMS: tuple[str, ...] = ("Linf", "L2")
LINF_EPS_WARNING = 0.5  # a Linf radius above this on [0, 1] images is unusual enough to be a typo

_LOG = logging.getLogger(__name__)

#: until this release an option's old name is accepted, with one ``deprecated:`` line
OLD_NAMES_UNTIL = "meansparse_pl 0.3"


def deprecated(what: str) -> None:
    """One ``deprecated: <what> (the old name is accepted until ...).`` line on the log (stderr by default)."""
    _LOG.warning("deprecated: %s (the old name is accepted until %s).", what, OLD_NAMES_UNTIL)


def renamed(subcommand: str, old: str, old_value: Any, new: str, new_value: Any) -> Any:
    """The value of option ``--new``, or of its old name ``--old`` with one ``deprecated:`` line (both given: one
    error line)."""
    check_not_both(subcommand, old, old_value, new, new_value)
    if old_value is None:
        return new_value
    deprecated(f"{subcommand} --{old} is now --{new}")
    return old_value


def check_not_both(subcommand: str, old: str, old_value: Any, new: str, new_value: Any) -> None:
    """One error line when an option is given under its new name and its old name ``--old`` at once."""
    if old_value is not None and new_value is not None:
        raise ConfigurationError(f"{subcommand}: --{old} is the old name of --{new}; give --{new} only.")


# ------------------------------------------------------------------------------------------------ checks
def _is_real(value: Any) -> bool:
    """A real number: int, float, numpy or 0-d torch scalar; never a bool or a string."""
    if isinstance(value, bool | str | bytes):
        return False
    if isinstance(value, numbers.Real):
        return True
    return getattr(value, "ndim", None) == 0 and getattr(value, "dtype", None) is not None


def check_number(
    name: str,
    value: Any,
    *,
    minimum: float | None = None,
    strict: bool = False,
    maximum: float | None = None,
    hint: str = "",
) -> float:
    """A finite real number, optionally bounded below (``>`` when ``strict``) and above (``<=``)."""
    if not _is_real(value) or not math.isfinite(float(value)):
        raise ConfigurationError(
            f"{name} must be a finite number, got {value!r}{'; ' + hint if hint else ''}."
        )
    number = float(value)
    below = minimum is not None and (number <= minimum if strict else number < minimum)
    above = maximum is not None and number > maximum
    if below or above:
        bounds = []
        if minimum is not None:
            bounds.append(f"{'>' if strict else '>='} {minimum:g}")
        if maximum is not None:
            bounds.append(f"<= {maximum:g}")
        raise ConfigurationError(
            f"{name} must be {' and '.join(bounds)}, got {number:g}{'; ' + hint if hint else ''}."
        )
    return number


def check_positive_int(name: str, value: Any, hint: str = "") -> int:
    """An integer >= 1 (an integral float such as 10.0 is accepted; bools and strings are not)."""
    if not _is_real(value) or not math.isfinite(float(value)) or int(value) != value or value < 1:
        raise ConfigurationError(
            f"{name} must be an integer >= 1, got {value!r}{'; ' + hint if hint else ''}."
        )
    return int(value)


def check_optional_positive_int(name: str, value: Any, hint: str = "") -> int | None:
    return None if value is None else check_positive_int(name, value, hint)


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}; got {value!r}.")
    return value


def check_alpha(alpha: Any) -> float:
    """One alpha: a finite number >= 0 (the single place where this rule lives)."""
    if not _is_real(alpha) or not (float(alpha) >= 0.0) or math.isinf(float(alpha)):
        raise ConfigurationError(
            f"alpha must be a finite number >= 0, got {alpha!r}; use 0 to switch MeanSparse off."
        )
    return float(alpha)


def check_distinct(name: str, values: Sequence[float]) -> list[float]:
    """``values`` sorted and without repeats, refusing two that print the same (``f"{v:g}"``, the form the
    reports and result keys use), since no report could tell them apart."""
    unique = sorted(set(values))
    for low, high in zip(unique, unique[1:], strict=False):
        if f"{low:g}" == f"{high:g}":
            raise ConfigurationError(
                f"{name} {low!r} and {high!r} are the same to 6 significant digits ({low:g}), so the reports "
                "could not tell them apart; keep one of them."
            )
    return unique


def check_norm(norm: Any) -> str:
    if norm not in NORMS:
        raise ConfigurationError(f"norm must be one of {NORMS}, got {norm!r}; use 'Linf' or 'L2'.")
    return norm


def check_eps(eps: Any, norm: str) -> float:
    """An attack radius on [0, 1] images: finite and > 0; for Linf at most 1 (a radius of 1 already allows
    every image), and a warning above :data:`LINF_EPS_WARNING`."""
    eps = check_number("eps", eps, minimum=0.0, strict=True, hint="e.g. eps=8/255 for Linf")
    if norm == "Linf" and eps > 1.0:
        raise ConfigurationError(
            f"a Linf eps of {eps:g} is larger than the [0, 1] pixel range (any image is reachable at 1); "
            "give the radius in [0, 1] pixel units, e.g. 8/255 = 0.0314."
        )
    if norm == "Linf" and eps > LINF_EPS_WARNING:
        warnings.warn(
            f"Linf eps {eps:g} is above the usual range (<= {LINF_EPS_WARNING:g} on [0, 1] images); is it in "
            "pixel units (e.g. 8/255, not 8)?",
            UserWarning,
            stacklevel=3,
        )
    return eps


def _pattern_list(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if (
        isinstance(value, str)
        or not isinstance(value, Sequence)
        or not all(isinstance(v, str) for v in value)
    ):
        raise ConfigurationError(f"{name} must be a list of fnmatch patterns (strings), got {value!r}.")
    return list(value)


# ----------------------------------------------------------------------------------------- placement
@dataclass(frozen=True)
class PlacementConfig:
    """Where MeanSparse operators go: the one placement configuration of ``sparsify``, ``sparsify_like``,
    ``convert_published``, :class:`~meansparse_pl.callbacks.MeanSparseCallback` and ``cli.py postprocess``.

    Args:
        include: fnmatch patterns of site module paths to sparsify (default: every site of the preset).
        exclude: fnmatch patterns of site module paths to leave out (e.g. ``["*.se.*"]`` for
            squeeze-and-excitation blocks, as the paper does for RaWideResNet).
        sites: keep only these site indices (as listed by ``find_sites``; the paper's A.9 ablations).
        centre: band centre: ``channel_mean`` (paper), ``zero`` or ``global_mean`` (paper A.7).
        preset: site rule: ``activations`` (the paper's "before every activation"), or the published models'
            ``published_wrn`` / ``published_convnext`` / ``published_swin`` (also after residual sums and MLP
            outputs; fx only).
        channel_dims: fnmatch pattern -> channel axis, overriding the automatic layout detection.
        fuse_activations: an operator in front of a ReLU / ReLU6 / LeakyReLU applies it itself, so inference
            computes both in one pass (same values and state dict; switch off to keep hooks on activation
            modules added after placement).
        strategy: ``auto`` (torch.fx, else hooks), ``fx``, ``hooks``, or ``published`` (swap the published
            MeanSparse modules a model already contains).
        leaf_modules: fnmatch patterns of submodules torch.fx should not trace into.
    """

    include: list[str] | None = None
    exclude: list[str] | None = None
    sites: list[int] | None = None
    centre: Centre = "channel_mean"
    preset: str = "activations"
    channel_dims: dict[str, int] | None = None
    fuse_activations: bool = True
    strategy: Strategy = "auto"
    leaf_modules: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "include", _pattern_list("include", self.include))
        set_(self, "exclude", _pattern_list("exclude", self.exclude))
        set_(self, "leaf_modules", _pattern_list("leaf_modules", self.leaf_modules) or [])
        if self.sites is not None:
            if isinstance(self.sites, str) or not isinstance(self.sites, Sequence):
                raise ConfigurationError(f"sites must be a list of site indices, got {self.sites!r}.")
            bad = [s for s in self.sites if isinstance(s, bool) or not isinstance(s, int) or s < 0]
            if bad:
                raise ConfigurationError(f"sites must be integers >= 0 (site indices), got {bad}.")
            set_(self, "sites", list(self.sites))
        check_choice("centre", self.centre, CENTRES)
        check_choice("strategy", self.strategy, STRATEGIES)
        if not isinstance(self.preset, str) or not self.preset:
            raise ConfigurationError(f"preset must be a preset name, got {self.preset!r}.")
        if not isinstance(self.fuse_activations, bool):
            raise ConfigurationError(
                f"fuse_activations must be true or false, got {self.fuse_activations!r}."
            )
        if self.channel_dims is not None:
            if not isinstance(self.channel_dims, Mapping) or not all(
                isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
                for k, v in self.channel_dims.items()
            ):
                raise ConfigurationError(
                    f"channel_dims must map fnmatch patterns to an axis, e.g. {{'*.mlp.act': -1}}, got "
                    f"{self.channel_dims!r}."
                )
            set_(self, "channel_dims", dict(self.channel_dims))


def placement_config(config: PlacementConfig | None = None, **options: Any) -> PlacementConfig:
    """``config`` (default: ``PlacementConfig()``) with ``options`` replacing fields; unknown names are one
    clear error listing the valid ones."""
    if config is None:
        config = PlacementConfig()
    elif not isinstance(config, PlacementConfig):
        raise ConfigurationError(f"expected a PlacementConfig, got {type(config).__name__}.")
    if not options:
        return config
    fields = PlacementConfig.__dataclass_fields__
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigurationError(
            f"unknown placement option(s) {', '.join(unknown)}; PlacementConfig takes: {', '.join(fields)}."
        )
    return PlacementConfig(**{**{name: getattr(config, name) for name in fields}, **options})


# --------------------------------------------------------------------------------------- threat model
@dataclass(frozen=True)
class ThreatModel:
    """The threat model of every attack, validated once here (see :func:`check_eps`).

    Args:
        norm: Linf or L2.
        eps: The radius in [0, 1] pixel units (e.g. 8/255 = 0.0314 for Linf on CIFAR-10).
    """

    norm: Norm = "Linf"
    eps: float = 8 / 255

    def __post_init__(self) -> None:
        check_norm(self.norm)
        object.__setattr__(self, "eps", check_eps(self.eps, self.norm))

    def with_eps(self, eps: float) -> ThreatModel:
        return ThreatModel(self.norm, eps)


# --------------------------------------------------------------------------------------------- attacks
@dataclass(frozen=True)
class AttackConfig:
    """Which attacks run and with which options: one vocabulary for ``alpha_search``, ``evaluate`` and the
    Python API. Attack names and per-attack options are checked against the attack registry
    (:func:`meansparse_pl.attacks.check_attack_config`) before anything is loaded.

    Args:
        names: The attacks, e.g. [clean, autoattack, apgd-ce, apgd-ce+dlr, bpda-apgd-ce].
        n_iter: Iterations of every attack that takes n_iter (the APGD family, FAB, AutoAttack); None keeps
            each attack's standard setting (100).
        n_restarts: Restarts of every attack that takes n_restarts; None keeps each attack's default.
        eot_iter: Gradients averaged per step by every gradient attack (Expectation over Transformation), for a
            model whose forward pass is random (the diagnostics say when: e.g. 20); None keeps 1.
        options: Per attack name, options that override the two above, e.g. {"pgd": {"steps": 50}}.
        cascade: Attacks for the best-known column only, run in this order on the samples that every earlier
            attack failed to break (a cheaper worst case: each one skips what is already broken), e.g.
            [transfer-base, apgd-t, fab-t, square]; the columns of names stay full.
    """

    names: list[str] = field(default_factory=lambda: ["clean", "apgd-ce"])
    n_iter: int | None = None
    n_restarts: int | None = None
    eot_iter: int | None = None
    options: dict[str, dict[str, Any]] = field(default_factory=dict)
    cascade: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = self.names
        if isinstance(names, str) or not isinstance(names, Sequence) or not names:
            raise ConfigurationError(f"attack names must be a non-empty list, got {names!r}.")
        if not all(isinstance(n, str) for n in names):
            raise ConfigurationError(f"attack names must be strings, got {names!r}.")
        if len(set(names)) != len(names):
            raise ConfigurationError(f"attack names must be unique, got {list(names)}.")
        object.__setattr__(self, "names", list(names))
        object.__setattr__(self, "n_iter", check_optional_positive_int("n_iter", self.n_iter))
        object.__setattr__(self, "n_restarts", check_optional_positive_int("n_restarts", self.n_restarts))
        object.__setattr__(self, "eot_iter", check_optional_positive_int("eot_iter", self.eot_iter))
        options = self.options or {}
        if not isinstance(options, Mapping) or not all(
            isinstance(k, str) and isinstance(v, Mapping) for k, v in options.items()
        ):
            raise ConfigurationError(
                f"attack options must map an attack name to its options, e.g. {{'pgd': {{'steps': 50}}}}, got "
                f"{self.options!r}."
            )
        object.__setattr__(self, "options", {k: dict(v) for k, v in options.items()})
        cascade = self.cascade or []
        if (
            isinstance(cascade, str)
            or not isinstance(cascade, Sequence)
            or not all(isinstance(n, str) for n in cascade)
        ):
            raise ConfigurationError(
                f"the attack cascade must be a list of attack names, got {self.cascade!r}."
            )
        repeated = sorted(set(cascade) & set(self.names)) or sorted(
            {n for n in cascade if list(cascade).count(n) > 1}
        )
        if repeated:
            raise ConfigurationError(
                f"attack(s) {', '.join(repeated)} appear twice in names and cascade; run each attack once."
            )
        object.__setattr__(self, "cascade", list(cascade))


@dataclass(frozen=True)
class ComparedModel:
    """One model of a comparison: a label for the report, its checkpoint, and optionally one alpha for every
    operator (0: the base network, the operators switched off; None: the checkpoint's own alphas)."""

    label: str
    checkpoint: str
    alpha: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.label, str) or not self.label.strip() or "/" in self.label:
            raise ConfigurationError(
                f"a compared model needs a non-empty label without '/', got {self.label!r}; e.g. 'control'."
            )
        if not isinstance(self.checkpoint, str) or not self.checkpoint:
            raise ConfigurationError(
                f"{self.label}: checkpoint must be a file path, got {self.checkpoint!r}."
            )
        if self.alpha is not None:
            object.__setattr__(self, "alpha", check_alpha(self.alpha))


# ----------------------------------------------------------------------------------------- diagnostics
@dataclass(frozen=True)
class DiagnosticsConfig:
    """The attack-failure diagnostics that run with every ``evaluate``, ``compare`` and ``diagnose``
    (:mod:`meansparse_pl.diagnostics`).

    Args:
        subset: Samples of the seeded subset the model-probing indicators run on (gradients, randomness, loss
            trace, stronger attacks, large eps); the per-sample indicators use every evaluated sample.
        forwards: Forward passes of the randomness check (AutoAttack's check uses 5).
        large_eps: Radius of the unconstrained check, where robust accuracy must be about zero; null: 0.5 for
            Linf and 0.5 * sqrt(input size) for L2 (both reach the mid-grey image from any image).
        significance: Level of the one-sided binomial test that decides whether a count of samples is beyond
            what an indicator's tolerated rate allows on the samples measured.
        expensive: Also run the stronger attacks (twice the iterations, one more restart) and the large-eps
            attack on the subset.
    """

    subset: int = 100
    forwards: int = 5
    large_eps: float | None = None
    significance: float = 0.01
    expensive: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "subset", check_positive_int("diagnostics.subset", self.subset))
        forwards = check_positive_int("diagnostics.forwards", self.forwards)
        if forwards < 2:
            raise ConfigurationError(
                f"diagnostics.forwards must be at least 2 (repeated forwards are compared), got {forwards}."
            )
        object.__setattr__(self, "forwards", forwards)
        if self.large_eps is not None:
            object.__setattr__(
                self,
                "large_eps",
                check_number("diagnostics.large_eps", self.large_eps, minimum=0.0, strict=True),
            )
        significance = check_number("diagnostics.significance", self.significance, minimum=0.0, strict=True)
        if significance >= 0.5:
            raise ConfigurationError(
                f"diagnostics.significance is a test level in (0, 0.5), e.g. 0.01; got {significance}."
            )
        object.__setattr__(self, "significance", significance)
        if not isinstance(self.expensive, bool):
            raise ConfigurationError(f"diagnostics.expensive must be true or false, got {self.expensive!r}.")
