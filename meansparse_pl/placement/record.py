"""The placement record: which sites got an operator, and the configuration that rebuilds them.

A :class:`Placement` travels with every sparsified model (``model.meansparse_placement``) and every
checkpoint. Its on-disk form (:meth:`Placement.to_dict`) is the flat dictionary checkpoints have always held;
:meth:`Placement.from_dict` checks every field's type before anything is built from it, because it comes from
a file.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from meansparse_pl.config import PlacementConfig
from meansparse_pl.errors import RECREATE_FILE, CheckpointError, ConfigurationError, PlacementError

SITE_KINDS: tuple[str, ...] = ("activation", "residual_add", "after_module", "published")


@dataclass(frozen=True)
class Site:
    """One call site: where it is, what it calls, and the layout of its input."""

    index: int  # position among all sites of the placement's rule, in forward order
    module_path: str  # the activation module, or the module whose forward makes the functional call
    call: str  # "nn.ReLU", "F.relu", "Tensor.relu", ...
    input_shape: tuple[int, ...]  # from the probe forward (batch dim included)
    channel_dim: int
    num_channels: int
    operator_name: str = ""  # attribute name of the inserted operator, "" before insertion
    # what the operator is attached to: the input of an activation call (the paper's rule), the output of a
    # residual sum or of a named module (published presets), or a swapped published module. The default
    # keeps records written before site kinds existed loadable.
    kind: str = "activation"
    # the activation the operator applies itself, when placement fused the two
    fused_activation: str = ""

    @property
    def label(self) -> str:
        """The operator's ``site_name``: used in error messages and by ``describe`` to find the operator."""
        return f"site {self.index} ({self.call} in {self.module_path or 'model'})"


@dataclass
class Placement:
    """Everything needed to rebuild the same operators on a fresh instance of the architecture.

    ``config`` is the placement configuration with ``strategy`` set to the strategy actually used (``fx``,
    ``hooks`` or ``published``), so ``sparsify_like`` rebuilds exactly these sites.
    """

    config: PlacementConfig
    input_shape: tuple[int, ...]  # example input shape without the batch dim
    sites: list[Site] = field(default_factory=list)

    @property
    def strategy(self) -> str:
        return self.config.strategy

    def to_dict(self) -> dict[str, Any]:
        """The flat checkpoint form (the same keys since the first release)."""
        c = self.config
        return {
            "strategy": c.strategy,
            "input_shape": tuple(self.input_shape),
            "include": c.include,
            "exclude": c.exclude,
            "site_indices": c.sites,
            "channel_dims": c.channel_dims,
            "leaf_modules": list(c.leaf_modules) or None,
            "centre": c.centre,
            "sites": [asdict(s) for s in self.sites],
            # strategy 'published' takes its sites from the published modules, not from a preset
            "preset": "published" if c.strategy == "published" else c.preset,
            "fuse_activations": c.fuse_activations,
        }

    @classmethod
    def from_dict(cls, data: Any) -> Placement:
        """Rebuild a record from a file, refusing any field of the wrong type with one CheckpointError."""
        if not isinstance(data, dict):
            raise CheckpointError(
                f"the placement record is a {type(data).__name__}, not a dictionary; {RECREATE_FILE}."
            )
        strategy = data.get("strategy")
        try:
            config = PlacementConfig(
                include=data.get("include"),
                exclude=data.get("exclude"),
                sites=data.get("site_indices"),
                centre=data.get("centre", "channel_mean"),
                # records written before presets existed load with the paper's rule
                preset="activations" if strategy == "published" else data.get("preset", "activations"),
                channel_dims=data.get("channel_dims"),
                # records written before activation fusion load with the default, which gives the same values
                fuse_activations=data.get("fuse_activations", True),
                strategy=strategy,
                leaf_modules=data.get("leaf_modules") or [],
            )
        except ConfigurationError as error:
            raise CheckpointError(
                f"the placement record is invalid ({str(error).rstrip('.')}); {RECREATE_FILE}."
            ) from None
        if strategy == "auto":
            raise CheckpointError(
                f"the placement record names no concrete strategy (fx, hooks or published); {RECREATE_FILE}."
            )
        input_shape = _shape("input_shape", data.get("input_shape"))
        sites = data.get("sites", [])
        if not isinstance(sites, list):
            raise CheckpointError(
                f"the placement record's sites are a {type(sites).__name__}, not a list; {RECREATE_FILE}."
            )
        return cls(config, input_shape, [_site(i, s) for i, s in enumerate(sites)])


def _shape(name: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list | tuple) or not value or not all(_is_int(v) and v >= 1 for v in value):
        raise CheckpointError(
            f"the placement record's {name} must be a list of positive sizes, got {value!r}."
        )
    return tuple(int(v) for v in value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_SITE_FIELDS: dict[str, type | tuple[type, ...]] = {
    "index": int,
    "module_path": str,
    "call": str,
    "channel_dim": int,
    "num_channels": int,
    "operator_name": str,
    "kind": str,
    "fused_activation": str,
}


def _site(position: int, data: Any) -> Site:
    where = f"the placement record's site {position}"
    if not isinstance(data, dict):
        raise CheckpointError(f"{where} is a {type(data).__name__}, not a dictionary; {RECREATE_FILE}.")
    unknown = sorted(set(data) - set(_SITE_FIELDS) - {"input_shape"})
    missing = sorted(
        {"index", "module_path", "call", "input_shape", "channel_dim", "num_channels"} - set(data)
    )
    if unknown or missing:
        raise CheckpointError(f"{where} has unknown fields {unknown} or lacks {missing}; {RECREATE_FILE}.")
    for name, kind in _SITE_FIELDS.items():
        if name in data and (not isinstance(data[name], kind) or isinstance(data[name], bool)):
            raise CheckpointError(
                f"{where}: {name} must be a {kind.__name__}, got {data[name]!r}; {RECREATE_FILE}."
            )  # type: ignore[union-attr]
    if data.get("kind", "activation") not in SITE_KINDS:
        raise CheckpointError(f"{where}: unknown site kind {data['kind']!r}; {RECREATE_FILE}.")
    if data["num_channels"] < 1:
        raise CheckpointError(
            f"{where}: num_channels must be >= 1, got {data['num_channels']}; {RECREATE_FILE}."
        )
    return Site(**{**data, "input_shape": _shape(f"site {position} input_shape", data["input_shape"])})


def placement_of(model: nn.Module) -> Placement:
    """The placement record of a sparsified model."""
    placement = getattr(model, "meansparse_placement", None)
    if placement is None:
        raise PlacementError("the model was not sparsified by meansparse_pl.sparsify (no placement record).")
    return placement
