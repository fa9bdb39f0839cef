"""How a checkpoint says which network it was saved from, and how that is rebuilt, safely.

Two forms of record, one per way a model reaches the package:

* a **registry name**, ``{"name": "small_cnn", "kwargs": {...}}`` (``--model.backbone``): rebuilt
  automatically from :mod:`meansparse_pl.models`;
* a **network class**, ``{"class_path": "mymodels.SmallCNN", "init_args": {...}}`` (``--network``), kept as
  text: loading never imports a class path named inside a file on its own. The caller passes the model, or on
  the command line the ``--network`` options, which :func:`network_options` spells out copy-pasteably.

A file cannot make the loader allocate more than the tensors it holds: the recorded architecture is first
built on the ``meta`` device (no memory), and its size is compared with the file's tensors before anything is
allocated (:func:`build_registry_model`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from meansparse_pl.errors import RECREATE_FILE, CheckpointError, MeanSparseError
from meansparse_pl.models import create_model

# Operators, published buffers and fx constants make a sparsified state dict differ a little from the bare
# architecture's: allowed on top of the file's own bytes before a recorded architecture is called too large.
ALLOCATION_SLACK = 1.02
ALLOCATION_SLACK_BYTES = 1 << 20


def _is_plain(value: Any) -> bool:
    """JSON-like data only: what a record of keyword arguments may hold."""
    if value is None or isinstance(value, bool | int | float | str):
        return True
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return False


def check_architecture(record: Any, where: str) -> dict[str, Any] | None:
    """The architecture record of a checkpoint, checked field by field (one CheckpointError otherwise)."""
    if record is None:
        return None
    if not isinstance(record, Mapping):
        raise CheckpointError(
            f"{where}: the architecture record is a {type(record).__name__}, not a dictionary; {RECREATE_FILE}."
        )
    if "name" in record:
        name, options = record["name"], record.get("kwargs") or {}
        if not isinstance(name, str) or not isinstance(options, Mapping) or not _is_plain(options):
            raise CheckpointError(
                f"{where}: the architecture record holds a bad name or keyword arguments; {RECREATE_FILE}."
            )
        return {"name": name, "kwargs": dict(options)}
    if "class_path" in record:
        path, options = record["class_path"], record.get("init_args") or {}
        if not isinstance(path, str) or not isinstance(options, Mapping) or not _is_plain(options):
            raise CheckpointError(
                f"{where}: the network record holds a bad class path or init arguments; {RECREATE_FILE}."
            )
        return {"class_path": path, "init_args": dict(options)}
    raise CheckpointError(
        f"{where}: the architecture record names neither a registry model nor a network class."
    )


def network_record(network: nn.Module, init_args: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The record of a network given as a class (``--network``): its class path and init arguments, as text."""
    cls = type(network)
    arguments = {k: v for k, v in (init_args or {}).items() if _is_plain(v)}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": arguments}


def network_options(record: Mapping[str, Any]) -> str:
    """The ``--network`` command-line options that rebuild a network record, ready to copy."""
    options = [f"--network {record['class_path']}"]
    for key, value in record.get("init_args", {}).items():
        text = value if isinstance(value, str) else json.dumps(value)
        options.append(f"--network.init_args.{key} {text if ' ' not in str(text) else repr(text)}")
    return " ".join(options)


def _bytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values() if isinstance(t, torch.Tensor))


def build_registry_model(
    record: Mapping[str, Any], state: Mapping[str, torch.Tensor], where: str
) -> nn.Module:
    """Build a registry model for a checkpoint whose tensors are ``state``: first on the meta device, refused
    when it would need more memory than the file's tensors (a corrupt or hostile record), then for real."""
    name, options = record["name"], record["kwargs"]
    try:
        with torch.device("meta"):
            skeleton = create_model(name, **options)
    except MeanSparseError as error:
        raise CheckpointError(
            f"{where}: the recorded architecture cannot be built ({str(error).rstrip('.')}); {RECREATE_FILE}."
        ) from None
    except Exception as error:  # a constructor refusing its recorded arguments (TypeError, ValueError, ...)
        raise CheckpointError(
            f"{where}: the recorded architecture {name!r} cannot be built from its keyword arguments "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); {RECREATE_FILE}."
        ) from None
    needed, held = _bytes(skeleton.state_dict()), _bytes(state)
    if needed > held * ALLOCATION_SLACK + ALLOCATION_SLACK_BYTES:
        raise CheckpointError(
            f"{where}: the recorded architecture {name!r} with {dict(options)} needs {_size(needed)} of weights but "
            f"the file holds {_size(held)}, so it does not describe these weights; {RECREATE_FILE}."
        )
    mismatched = [
        k
        for k, t in skeleton.state_dict().items()
        if k in state and isinstance(state[k], torch.Tensor) and tuple(state[k].shape) != tuple(t.shape)
    ]
    if mismatched:
        key = mismatched[0]
        raise CheckpointError(
            f"{where}: weights do not fit the recorded architecture ({len(mismatched)} of another shape, first {key}: "
            f"file {tuple(state[key].shape)}, architecture {tuple(skeleton.state_dict()[key].shape)}); {RECREATE_FILE}."
        )
    return create_model(name, **options)


def _size(n: int) -> str:
    if n <= 0:
        return "0 B"
    unit = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**unit:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"
