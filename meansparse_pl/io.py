"""Files: atomic writes (a crash or Ctrl-C mid-write never leaves a half-written report or checkpoint) and safe
loading (``weights_only=True``: no pickled code is ever executed)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import socket
import tempfile
import zipfile
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

import torch

from meansparse_pl.errors import CheckpointError, OutputError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename over it.

    A path that is a directory, or a place that cannot be written, is one OutputError before anything is
    written."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(
            f"{path} is a directory; give a file name inside it, e.g. {path / 'meansparse.pt'}."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise OutputError(
            f"cannot write {path} ({error.strerror or type(error).__name__}); choose a location you can write to."
        ) from None
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
        raise CheckpointError(
            f"{path} holds a {type(payload).__name__}, not a checkpoint dictionary; give a file written by "
            "save_checkpoint, a state dict or a Lightning checkpoint."
        )
    return payload


def load_error_detail(error: RuntimeError) -> str:
    """The informative line of ``load_state_dict``'s error (the first names the class, the second what failed)."""
    lines = str(error).splitlines()
    return (lines[1] if len(lines) > 1 else lines[0]).strip()


LOCK_NAME = ".meansparse.lock"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, lock_name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold ``folder`` (or, with ``lock_name``, one output inside it) for one run: a second run writing there is
    refused (one OutputError) before it writes anything. The lock is a file created atomically (``O_EXCL``)
    holding the owner's host and process id; a lock left by a process of this host that no longer runs is taken
    over."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{folder} is a file; give a folder as the output directory.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OutputError(
            f"cannot create {folder} ({error.strerror}); choose a folder you can write to."
        ) from None
    path = folder / lock_name
    owner = f"{socket.gethostname()} {os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _lock_holder(path)
            if holder is not None and not _stale(holder):
                host, pid = holder
                raise OutputError(
                    f"{folder} is in use by another run (process {pid} on {host}); wait for it to finish, or choose "
                    f"another output folder (a lock left by a crashed run: delete {path})."
                ) from None
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # a stale or unreadable lock: taken over
            continue
        except OSError as error:
            raise OutputError(
                f"cannot write in {folder} ({error.strerror}); choose a folder you can write to."
            ) from None
        with os.fdopen(fd, "w") as handle:
            handle.write(owner)
        break
    else:
        raise OutputError(f"cannot take the lock {path}; delete it if no run is using {folder}.")
    try:
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == owner:
                path.unlink()


def _lock_holder(path: Path) -> tuple[str, int] | None:
    try:
        host, pid = path.read_text().split()
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _stale(holder: tuple[str, int]) -> bool:
    """Whether the lock's owner is a process of this host that no longer runs."""
    host, pid = holder
    if host != socket.gethostname():
        return False  # another machine's process: it cannot be checked from here
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def state_digest(state: Mapping[str, torch.Tensor], skip: Collection[str] = ()) -> hashlib._Hash:
    """A running sha256 over a state dict's names, shapes, sums and first values (not every byte: identifying a
    model for a resume check must not cost a pass over gigabytes of weights)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        if name in skip:
            continue
        flat = tensor.detach().reshape(-1).to(torch.float64)
        digest.update(f"{name}{tuple(tensor.shape)}{flat.sum().item():.10e}".encode())
        digest.update(flat[:256].cpu().numpy().tobytes())
    return digest
