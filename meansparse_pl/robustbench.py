"""Load RobustBench models offline, from a local directory in RobustBench's layout.

``robustbench.utils.load_model`` downloads missing files and reads them with ``torch.load`` in its unsafe
(pickle-executing) mode. This adapter does neither: it builds the architecture from RobustBench's model-zoo
entry (random weights), reads ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` with
``torch.load(weights_only=True)``, applies RobustBench's state-dict conventions itself, and loads the
weights. A missing file is a :class:`~meansparse_pl.errors.DataNotFoundError` that says where the file must
be and how to get it.

Importing the PyPI ``robustbench`` 1.1.1 package needs modules a torch-pinned environment may lack: it
imports ``autoattack`` (the GitHub name of what PyPI ships as ``pyautoattack``), ``pkg_resources`` (gone from
``setuptools`` >= 81), and, for downloads, the leaderboard and one exotic model, ``requests``, ``gdown``,
``pandas``, ``geotorch`` and ``torchdiffeq``. :func:`import_model_zoo` provides them *only while robustbench
is being imported* (an alias of ``pyautoattack``, a two-line ``pkg_resources.resource_filename``, and
placeholder modules that raise a clear ImportError when used) and removes them from ``sys.modules`` again,
so nothing outside the adapter sees them and nothing in site-packages changes. Real installed modules are
always preferred.

The registry name ``robustbench`` (``create_model("robustbench", model_name=..., dataset=...,
threat_model=...)``) builds an architecture, so checkpoints of converted RobustBench models record how to
rebuild themselves.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.checkpoint import safe_load
from meansparse_pl.errors import CheckpointError, ConfigurationError, DataNotFoundError
from meansparse_pl.models._registry import register_model

__all__ = [
    "build_architecture",
    "checkpoint_path",
    "import_model_zoo",
    "load_model",
    "load_weights",
    "make_traceable",
    "model_entry",
    "normalise_dataset",
    "normalise_threat_model",
    "robustbench_state_dict",
]

# modules robustbench's package import pulls in only for downloading, the leaderboard (pandas) and the SODEF
# model (geotorch, torchdiffeq); a placeholder is installed for each one that is missing
_OPTIONAL_MODULES = ("requests", "gdown", "pandas", "geotorch", "torchdiffeq")
# state-dict keys robustbench itself tolerates as missing (input normalisation that lives outside the file)
_BENIGN_MISSING = {"normalize.mean", "normalize.std", "mu", "sigma", "mean", "std"}
# ImageNet models robustbench loads without adding the 'model.' prefix (no normalisation wrapper)
_IMAGENET_NO_PREFIX = {
    "Singh2023Revisiting_ConvNeXt-T-ConvStem",
    "Singh2023Revisiting_ViT-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-S-ConvStem",
    "Singh2023Revisiting_ConvNeXt-B-ConvStem",
    "Singh2023Revisiting_ConvNeXt-L-ConvStem",
    "Peng2023Robust",
    "Chen2024Data_WRN_50_2",
    "Xu2024MIMIR_Swin-B",
    "Xu2024MIMIR_Swin-L",
}
# ImageNet Swin checkpoints saved with an older timm; robustbench converts them with timm's filter
_OLD_TIMM_SWIN = {
    "Liu2023Comprehensive_Swin-B",
    "Liu2023Comprehensive_Swin-L",
    "Mo2022When_Swin-B",
    "RodriguezMunoz2024Characterizing_Swin-B",
    "RodriguezMunoz2024Characterizing_Swin-L",
}


# ----------------------------------------------------------------------------------------- names
def normalise_dataset(dataset: str) -> str:
    """RobustBench's dataset value (``cifar10``, ``cifar100``, ``imagenet``) from common spellings."""
    key = str(dataset).lower().replace("-", "").replace("_", "")
    if key not in ("cifar10", "cifar100", "imagenet"):
        raise ConfigurationError(
            f"unknown RobustBench dataset {dataset!r}; use cifar10, cifar100 or imagenet."
        )
    return key


def normalise_threat_model(threat_model: str) -> str:
    """RobustBench's threat-model value (``Linf``, ``L2``, ``corruptions``) from common spellings."""
    values = {"linf": "Linf", "l2": "L2", "corruptions": "corruptions"}
    key = str(threat_model).lower()
    if key not in values:
        raise ConfigurationError(
            f"unknown RobustBench threat model {threat_model!r}; use Linf, L2 or corruptions."
        )
    return values[key]


def checkpoint_path(model_dir: str | os.PathLike, name: str, dataset: str, threat_model: str) -> Path:
    """Where RobustBench keeps a model: ``<model_dir>/<dataset>/<threat_model>/<name>.pt``."""
    return Path(model_dir) / normalise_dataset(dataset) / normalise_threat_model(threat_model) / f"{name}.pt"


# ------------------------------------------------------------------------------------ contained import
class _PlaceholderModule(types.ModuleType):
    """Stands in for a module robustbench imports but this adapter never uses; any use says so."""

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        return _Unavailable(f"{self.__name__}.{attribute}")


class _Unavailable:
    """A name from a placeholder module: importing it works, using it raises a clear ImportError."""

    def __init__(self, name: str) -> None:
        self._name = name

    def _fail(self) -> ImportError:
        module = self._name.split(".")[0]
        return ImportError(
            f"{self._name} is not available: '{module}' is not installed, and meansparse_pl's offline "
            "RobustBench adapter does not need it (it never downloads or benchmarks)."
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._fail()

    def __getattr__(self, attribute: str) -> Any:
        if attribute.startswith("__"):
            raise AttributeError(attribute)
        raise self._fail()


def _pkg_resources_shim() -> types.ModuleType:
    """The one function robustbench uses from ``pkg_resources``: a file next to a module or package."""
    module = types.ModuleType("pkg_resources")

    def resource_filename(package_or_requirement: str, resource_name: str) -> str:
        spec = importlib.util.find_spec(package_or_requirement)
        if spec is None or spec.origin is None:
            raise ImportError(f"cannot locate {package_or_requirement!r}")
        return str(Path(spec.origin).parent / resource_name)

    module.resource_filename = resource_filename  # type: ignore[attr-defined]
    return module


def _importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _robustbench_import_environment() -> Iterator[list[str]]:
    """Provide missing import-time dependencies of robustbench while the block runs, then remove them.

    Yields the names it installed. Only names absent from ``sys.modules`` and not importable are added, and
    exactly those are removed afterwards (robustbench's own modules stay imported: they hold references to
    what they imported, and nothing else can reach the placeholders by name).
    """
    added: list[str] = []

    def provide(name: str, module: types.ModuleType) -> None:
        sys.modules[name] = module
        added.append(name)

    try:
        if not _importable("autoattack") and _importable("pyautoattack"):
            package = importlib.import_module("pyautoattack")
            provide("autoattack", package)
            for sub in ("autoattack", "autopgd_base", "checks", "fab_pt", "other_utils", "square", "state"):
                try:
                    provide(f"autoattack.{sub}", importlib.import_module(f"pyautoattack.{sub}"))
                except ImportError:
                    continue
        if not _importable("pkg_resources"):
            provide("pkg_resources", _pkg_resources_shim())
        for name in _OPTIONAL_MODULES:
            if not _importable(name):
                provide(name, _PlaceholderModule(name))
        yield added
    finally:
        for name in added:
            sys.modules.pop(name, None)


def import_model_zoo() -> types.ModuleType:
    """``robustbench.model_zoo`` (imported once, inside the contained environment), or a clear error."""
    zoo = sys.modules.get("robustbench.model_zoo") or _import_model_zoo_contained()
    _require_release_model_zoo(zoo)
    return zoo


def _import_model_zoo_contained() -> types.ModuleType:
    if not _importable("robustbench"):
        raise ConfigurationError(
            "RobustBench models need the robustbench package: pip install 'robustbench==1.1.1' (with timm); "
            "see docs/published_models.md."
        )
    if not _importable("timm"):
        raise ConfigurationError("robustbench's model zoo needs timm: pip install 'timm==1.0.9'.")
    before = set(sys.modules)
    with _robustbench_import_environment():
        try:
            return importlib.import_module("robustbench.model_zoo")
        except Exception as error:
            # leave no half-imported robustbench behind: the next attempt starts clean
            for name in set(sys.modules) - before:
                if name == "robustbench" or name.startswith("robustbench."):
                    sys.modules.pop(name, None)
            raise ConfigurationError(
                f"importing robustbench failed ({type(error).__name__}: {error}); robustbench 1.1.1 is the "
                "supported version."
            ) from error


# a model only robustbench 1.1.1's zoo has: older copies of the package (torchattacks 3.5.1 bundles one) lack it
_RELEASE_SENTINEL = ("cifar10", "Linf", "Amini2024MeanSparse_S-WRN-94-16")


def _require_release_model_zoo(zoo: types.ModuleType) -> None:
    """Refuse an older robustbench model zoo under the 1.1.1 name (a silent "no such model" otherwise)."""
    enums = importlib.import_module("robustbench.model_zoo.enums")
    dataset, threat_model, name = _RELEASE_SENTINEL
    if name not in zoo.model_dicts[enums.BenchmarkDataset(dataset)][enums.ThreatModel(threat_model)]:
        raise ConfigurationError(
            "the installed robustbench files are an older copy (torchattacks 3.5.1 ships one that overwrites "
            "robustbench 1.1.1's); reinstall: pip install --no-deps --force-reinstall 'robustbench==1.1.1'"
        )


def model_entry(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> dict[str, Any]:
    """RobustBench's model-zoo entry (``{'model': factory, 'gdrive_id': ..., ...}``) for ``name``."""
    zoo = import_model_zoo()
    enums = importlib.import_module("robustbench.model_zoo.enums")
    dataset_, threat_ = normalise_dataset(dataset), normalise_threat_model(threat_model)
    models = zoo.model_dicts[enums.BenchmarkDataset(dataset_)][enums.ThreatModel(threat_)]
    if name not in models:
        close = difflib.get_close_matches(name, list(models), n=3)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ConfigurationError(f"RobustBench has no {dataset_}/{threat_} model {name!r}{hint}")
    return models[name]


# ----------------------------------------------------------------------------------------- building
def _normalized_wrn_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """RobustArch ``NormalizedWideResNet.forward`` without its ``if x.is_cuda`` branch (torch.fx cannot trace
    a branch on a tensor property); mean / std are buffers instead, so ``.to(device)`` moves them. Same ops
    in the same order as the original CPU branch, so the logits are identical."""
    if self.padding > 0:
        x = F.pad(x, (self.padding,) * 4)
    out = (x - self.mean) / self.std
    out = self.init_conv(out)
    out = self.layer(out)
    out = self.batchnorm(out)
    if hasattr(self, "meansparse_end"):  # the published MeanSparse version
        out = self.meansparse_end(out)
    out = self.relu(out)
    out = F.avg_pool2d(out, 8)
    out = out.view(-1, self.num_channels)
    return self.logits(out)


_TRACEABLE_CLASSES: dict[type, type] = {}


def make_traceable(model: nn.Module) -> nn.Module:
    """Turn RobustArch's ``NormalizedWideResNet`` (Peng2023Robust, CIFAR-10) into an fx-traceable subclass
    with the same state-dict keys; other models are returned unchanged."""
    cls = type(model)
    if cls.__name__ != "NormalizedWideResNet" or not hasattr(model, "mean_cuda"):
        return model
    for name in ("mean", "std"):
        value = getattr(model, name)
        if name not in model._buffers:
            delattr(model, name)
            model.register_buffer(name, value, persistent=False)
    if cls not in _TRACEABLE_CLASSES:
        _TRACEABLE_CLASSES[cls] = type(
            f"Traceable{cls.__name__}", (cls,), {"forward": _normalized_wrn_forward}
        )
    model.__class__ = _TRACEABLE_CLASSES[cls]
    return model


def build_architecture(name: str, dataset: str = "cifar10", threat_model: str = "Linf") -> nn.Module:
    """RobustBench's architecture for ``name`` with random weights, in eval mode, fx-traceable."""
    entry = model_entry(name, dataset, threat_model)
    if isinstance(entry.get("gdrive_id"), list):
        raise ConfigurationError(
            f"{name} is an ensemble of several checkpoints; the offline adapter loads one."
        )
    return make_traceable(entry["model"]()).eval()


@register_model("robustbench", normalizes_input=True)
def _robustbench_factory(
    *,
    num_classes: int = 10,
    in_channels: int = 3,
    activation: str = "relu",
    model_name: str,
    dataset: str = "cifar10",
    threat_model: str = "Linf",
) -> nn.Module:
    """Registry entry: the architecture of a RobustBench model (the zoo entry fixes classes, activation and
    input normalisation, so ``num_classes`` / ``in_channels`` / ``activation`` are not used, and
    ``create_model`` adds no normalisation of its own)."""
    return build_architecture(model_name, dataset, threat_model)


# ---------------------------------------------------------------------------------------- weights
def _strip(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in state.items()}


def robustbench_state_dict(
    payload: Mapping[str, Any], name: str, dataset: str, model: nn.Module | None = None
) -> dict[str, torch.Tensor]:
    """The state dict RobustBench's ``load_model`` would load from ``payload`` (a loaded ``.pt`` file).

    Conventions, as in robustbench 1.1.1: the weights may sit under ``state_dict`` (or ``model_state_dict``;
    ``last`` for two models); the prefixes ``module.`` (DataParallel) and ``model.`` are removed; ImageNet
    Swin checkpoints of older timm versions are converted with timm's ``checkpoint_filter_fn``; and ImageNet
    models, which RobustBench wraps as ``Sequential(normalize, model)``, get ``model.`` back.
    """
    state: Any = payload
    if "Kireev2021Effectiveness" in name or name == "Andriushchenko2020Understanding":
        state = state.get("last", state)
    for key in ("state_dict", "model_state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"the {name} checkpoint holds no state dict of tensors.")
    state = _strip(_strip(state, "module."), "model.")
    if normalise_dataset(dataset) == "imagenet":
        if name in _OLD_TIMM_SWIN and model is not None and hasattr(model, "model"):
            from timm.models.swin_transformer import checkpoint_filter_fn

            with contextlib.suppress(Exception):  # robustbench ignores a failing conversion too
                state = checkpoint_filter_fn(state, model.model)
        if name not in _IMAGENET_NO_PREFIX:
            state = {f"model.{k}": v for k, v in state.items()}
    return dict(state)


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``load_state_dict`` strictly, tolerating only what robustbench tolerates: missing input-normalisation
    buffers (``normalize.mean`` / ``std``, ``mu`` / ``sigma``) that live outside some checkpoints."""
    try:
        model.load_state_dict(state, strict=True)
        return
    except RuntimeError:
        pass
    result = model.load_state_dict(state, strict=False) if _only_benign_missing(model, state) else None
    if result is None:
        own = set(model.state_dict())
        missing = sorted(own - set(state))
        unexpected = sorted(set(state) - own)
        mismatched = sorted(
            k for k in own & set(state) if tuple(model.state_dict()[k].shape) != tuple(state[k].shape)
        )
        detail = (
            f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}" if unexpected else ""
        ) or f"shape mismatch at {mismatched[:3]}"
        raise CheckpointError(f"{path}: the weights do not fit the RobustBench architecture ({detail}).")


def _only_benign_missing(model: nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = model.state_dict()
    missing = set(own) - set(state)
    unexpected = set(state) - set(own)
    shapes_fit = all(tuple(own[k].shape) == tuple(v.shape) for k, v in state.items() if k in own)
    return not unexpected and shapes_fit and all(k.split(".", 1)[-1] in _BENIGN_MISSING for k in missing)


def load_robustbench_weights(
    model: nn.Module,
    path: str | os.PathLike,
    name: str,
    dataset: str = "cifar10",
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """Load a RobustBench checkpoint file into ``model`` (RobustBench's conventions, weights_only)."""
    payload = safe_load(path, map_location)
    load_weights(model, robustbench_state_dict(payload, name, dataset, model), path)
    return model


def load_model(
    name: str,
    model_dir: str | os.PathLike = "models",
    dataset: str = "cifar10",
    threat_model: str = "Linf",
    *,
    weights: str | os.PathLike | None = None,
    map_location: str | torch.device = "cpu",
) -> nn.Module:
    """A RobustBench model with its weights, offline, in eval mode.

    ``weights`` reads the weights from that file instead of the RobustBench layout (e.g. a published
    checkpoint of the same architecture kept elsewhere); the same conventions apply.

    Raises:
        DataNotFoundError: the checkpoint is not at ``<model_dir>/<dataset>/<threat_model>/<name>.pt``.
        CheckpointError: the file is unsafe to load, corrupt, or does not fit the architecture.
        ConfigurationError: unknown model, dataset or threat model; robustbench not installed.
    """
    entry = model_entry(name, dataset, threat_model)
    path = Path(weights) if weights is not None else checkpoint_path(model_dir, name, dataset, threat_model)
    if weights is not None and not path.is_file():
        raise DataNotFoundError(f"no weights file at {path}.")
    if not path.is_file():
        gdrive = entry.get("gdrive_id")
        raise DataNotFoundError(
            f"RobustBench model {name} is not at {path}: the offline adapter never downloads. Put the file "
            f"there (RobustBench layout <model_dir>/<dataset>/<threat_model>/<name>.pt), e.g. by running "
            f"robustbench.utils.load_model({name!r}, model_dir=..., dataset={normalise_dataset(dataset)!r}, "
            f"threat_model={normalise_threat_model(threat_model)!r}) once on a machine with network access"
            + (f" (Google Drive id {gdrive})." if isinstance(gdrive, str) else ".")
        )
    model = build_architecture(name, dataset, threat_model)
    return load_robustbench_weights(model, path, name, dataset, map_location).eval()
