"""Files: atomic writes (a crash or Ctrl-C mid-write never leaves a half-written report or checkpoint) and safe
loading (``weights_only=True``: no pickled code is ever executed)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from meansparse_pl.errors import CheckpointError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))


def atomic_write_json(path: str | os.PathLike, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda handle: torch.save(obj, handle))


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with every failure turned into one clear CheckpointError.

    No pickled code is ever executed: a file that needs arbitrary Python objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint file at {path}; check the path (a directory or a typo?).")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as error:
        text = str(error)
        if "GLOBAL" not in text and "global" not in text:  # not a refused object: the bytes are not a pickle
            raise CheckpointError(
                f"{path} is corrupt or truncated, or not a torch checkpoint (safe loading cannot parse it); "
                "refusing to load it unsafely: re-create it with torch.save of tensors / state dicts."
            ) from error
        refused = next((line.strip() for line in text.splitlines() if "GLOBAL" in line), "")
        raise CheckpointError(
            f"{path} needs arbitrary Python objects to load ({refused[:120]}); refusing it for safety: save "
            "plain tensors / state dicts, or convert it in a trusted environment."
        ) from error
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({type(error).__name__}); re-download or re-create it."
        ) from error
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary.")
    return payload


def load_error_detail(error: RuntimeError) -> str:
    """The informative line of ``load_state_dict``'s error (the first names the class, the second what failed)."""
    lines = str(error).splitlines()
    return (lines[1] if len(lines) > 1 else lines[0]).strip()
