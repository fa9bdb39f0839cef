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
from typing import IO, Any, Protocol, runtime_checkable

import torch

from meansparse_pl.errors import CheckpointError, OutputError


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Write through ``write(file)`` into a temporary file beside ``path``, fsync, then rename over it.

    A path that is a directory, or a place that cannot be written, is one OutputError before anything is
    written; a write that fails part-way (a full disk) is one OutputError naming the path, with the earlier
    file, if any, left as it was."""
    return atomic_write_files({path: write})[0]


def atomic_write_files(files: Mapping[str | os.PathLike, Callable[[IO[bytes]], None]]) -> list[Path]:
    """Write several files as one: every file into its temporary file first, and only when all of them are
    complete, each renamed over its final name. A failure (a full disk) leaves every earlier file as it was, so a
    report never ends up as a new ``.md`` beside an old ``.json``."""
    written: list[tuple[Path, str]] = []
    try:
        for target, write in files.items():
            path = Path(target)
            written.append((path, _write_temporary(path, write)))
        for path, tmp in written:
            os.replace(tmp, path)
    except BaseException:
        for _, tmp in written:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        raise
    return [path for path, _ in written]


TEMPORARY_SUFFIX = ".tmp"


def _write_temporary(path: Path, write: Callable[[IO[bytes]], None]) -> str:
    """``write`` into a new, fsynced temporary file beside ``path`` (``.<name>.<random>.tmp``); its name."""
    if path.is_dir():
        raise OutputError(
            f"{path} is a directory; give a file name inside it, e.g. {path / 'meansparse.pt'}."
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMPORARY_SUFFIX, dir=path.parent)
    except OSError as error:
        raise OutputError(
            f"cannot write {path} ({error.strerror or type(error).__name__}); choose a location you can write to."
        ) from None
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
    except (OSError, RuntimeError) as error:  # torch.save reports a failed write as a RuntimeError
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        reason = (
            error.strerror if isinstance(error, OSError) and error.strerror else "the write failed part-way"
        )
        kept = f"the earlier {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
        raise OutputError(
            f"cannot write {path} ({reason}: a full disk?); free space on its device or choose another location, "
            f"and run again ({kept})."
        ) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp


def remove_leftover_temporaries(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Delete the temporary files an atomic write killed mid-way (SIGKILL, power loss) left in ``folder``
    (only those of ``name`` when given). Call it only while holding the folder's lock: a live writer's file
    looks the same."""
    pattern = f".{name}.*{TEMPORARY_SUFFIX}" if name is not None else f".*{TEMPORARY_SUFFIX}"
    removed = []
    for leftover in Path(folder).glob(pattern):
        with contextlib.suppress(OSError):
            leftover.unlink()
            removed.append(leftover)
    return removed


@runtime_checkable
class Result(Protocol):
    """What every result of the package provides (:class:`~meansparse_pl.report.RobustnessReport`,
    :class:`~meansparse_pl.comparison.ModelComparison`, :class:`~meansparse_pl.alpha_search.AlphaSearchResult`):
    a Markdown table, a JSON form that reads back, a plot (``ax`` given: drawn there; else a standalone
    ``Figure``; pyplot never touched) and the numbers as logger rows (one row per step)."""

    def table(self) -> str: ...

    def to_json(self) -> dict[str, Any]: ...

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Any: ...

    def plot(self, ax: Any = None) -> Any: ...

    def metrics(self) -> list[dict[str, float]]: ...


def write_result(folder: str | os.PathLike, stem: str, result: Result) -> list[Path]:
    """A result's ``<stem>.md`` / ``.json`` / ``.png`` in ``folder``, written as one: the one writer of every
    subcommand and callback."""
    return write_report(folder, stem, result, result.plot())


def write_report(folder: str | os.PathLike, stem: str, result: Any, figure: Any | None = None) -> list[Path]:
    """``<stem>.md`` (``result.table()``), ``<stem>.json`` (``result.to_json()``) and, with a matplotlib
    ``figure``, ``<stem>.png`` in ``folder``, written as one (:func:`atomic_write_files`)."""
    folder = Path(folder)
    files: dict[Path, Callable[[IO[bytes]], None]] = {
        folder / f"{stem}.md": _text_writer(result.table() + "\n"),
        folder / f"{stem}.json": _text_writer(json.dumps(result.to_json(), indent=2, sort_keys=False) + "\n"),
    }
    if figure is not None:
        files[folder / f"{stem}.png"] = lambda handle: figure.savefig(handle, format="png", dpi=120)
    return atomic_write_files(files)


def _text_writer(text: str) -> Callable[[IO[bytes]], None]:
    data = text.encode("utf-8")
    return lambda handle: handle.write(data)  # type: ignore[return-value]


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


def file_version(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """What identifies one version of a file (inode, size, modification time in ns); None if there is none. An
    atomic rewrite (a new file renamed over the old one) always changes it."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return None
    return info.st_ino, info.st_size, info.st_mtime_ns


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
        _write_owner(fd, path, owner)
        break
    else:
        raise OutputError(f"cannot take the lock {path}; delete it if no run is using {folder}.")
    # this run holds the folder (or its output): temporary files there are a killed run's leftovers
    remove_leftover_temporaries(
        folder, None if lock_name == LOCK_NAME else lock_name[1:].removesuffix(".lock")
    )
    try:
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            if path.read_text() == owner:
                path.unlink()


def _write_owner(fd: int, path: Path, owner: str) -> None:
    """The new lock file's content; a lock that cannot be written (a full disk) is removed and refused."""
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(owner)
    except OSError as error:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        raise OutputError(
            f"cannot write the lock {path} ({error.strerror}: a full disk?); free space on its device or choose "
            "another output folder."
        ) from None


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


def batch_digest(*tensors: torch.Tensor | None) -> str:
    """A short hash identifying a batch's content (images, labels), for resume checks: each tensor's dtype,
    shape, per-sample float64 sums and every 61st value. It reads each element once (one vectorised sum), so
    identifying the data costs far less than the attacks or the forward pass it guards."""
    digest = hashlib.blake2b(digest_size=16)
    for tensor in tensors:
        if tensor is None:
            digest.update(b"none")
            continue
        flat = tensor.detach().reshape(tensor.shape[0] if tensor.dim() else 1, -1)
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(flat.sum(dim=1, dtype=torch.float64).cpu().numpy().tobytes())
        digest.update(flat.reshape(-1)[::61].to(torch.float64).cpu().numpy().tobytes())
    return digest.hexdigest()
