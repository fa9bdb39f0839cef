"""RobustBench architectures by name: ``create_model("robustbench", model_name=..., dataset=..., threat_model=...)``.

The architecture comes from RobustBench's model-zoo entry (random weights); the weights are loaded afterwards,
offline and safely, by :mod:`meansparse_pl.robustbench`. The zoo is imported only when a RobustBench model is
built, so the package works without robustbench installed.

Importing the PyPI ``robustbench`` 1.1.1 package needs modules a torch-pinned environment may lack: it imports
``autoattack`` (the GitHub name of what PyPI ships as ``pyautoattack``), ``pkg_resources`` (gone from
``setuptools`` >= 81), and, for downloads, the leaderboard and one exotic model, ``requests``, ``gdown``,
``pandas``, ``geotorch`` and ``torchdiffeq``. :func:`import_model_zoo` provides them *only while robustbench is
being imported* (an alias of ``pyautoattack``, a two-line ``pkg_resources.resource_filename``, and placeholder
modules that raise a clear ImportError when used) and removes them from ``sys.modules`` again, so nothing
outside the adapter sees them and nothing in site-packages changes. Real installed modules are always preferred.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models._registry import register_model

__all__ = [
    "build_architecture",
    "import_model_zoo",
    "import_environment",
    "importable",
    "make_traceable",
    "model_entry",
    "normalise_dataset",
    "normalise_threat_model",
]

# modules robustbench's package import pulls in only for downloading, the leaderboard (pandas) and the SODEF
# model (geotorch, torchdiffeq); a placeholder is installed for each one that is missing
OPTIONAL_MODULES = ("requests", "gdown", "pandas", "geotorch", "torchdiffeq")


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


# ------------------------------------------------------------------------------------ contained import
class PlaceholderModule(types.ModuleType):
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


def importable(name: str) -> bool:
    if name in sys.modules:
        return True
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def import_environment() -> Iterator[list[str]]:
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
        if not importable("autoattack") and importable("pyautoattack"):
            package = importlib.import_module("pyautoattack")
            provide("autoattack", package)
            for sub in ("autoattack", "autopgd_base", "checks", "fab_pt", "other_utils", "square", "state"):
                try:
                    provide(f"autoattack.{sub}", importlib.import_module(f"pyautoattack.{sub}"))
                except ImportError:
                    continue
        if not importable("pkg_resources"):
            provide("pkg_resources", _pkg_resources_shim())
        for name in OPTIONAL_MODULES:
            if not importable(name):
                provide(name, PlaceholderModule(name))
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
    if not importable("robustbench"):
        raise ConfigurationError(
            "RobustBench models need the robustbench package: pip install 'robustbench==1.1.1' (with timm); "
            "see docs/published_models.md."
        )
    if not importable("timm"):
        raise ConfigurationError("robustbench's model zoo needs timm: pip install 'timm==1.0.9'.")
    before = set(sys.modules)
    with import_environment():
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
