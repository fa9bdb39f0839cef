"""Preemption: SIGTERM (what SLURM and Kubernetes send before a kill) and SIGUSR1 (SLURM's warning signal) ask
a long run to stop at its next safe point, with its progress saved, instead of killing it mid-write.

``cli.py`` watches for the two signals while a subcommand runs (:func:`watching`). The long loops (the
evaluation attacks, the statistics pass) call :func:`stop_if_requested` after each unit of work whose result
they have just saved; it raises :class:`~meansparse_pl.errors.Interrupted` with a message that says how to
resume, and the CLI prints that one line and exits with ``128 + signal``. Lightning's own signal connector,
installed while ``Trainer.predict`` runs, composes with these handlers (its ``received_sigterm`` flag is set
too), and every earlier handler is restored afterwards.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

from meansparse_pl.errors import Interrupted

SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGUSR1)
_received: list[int] = []  # the signals received while watching, in order
_watching = [0]  # nesting depth of watching()


@contextlib.contextmanager
def watching() -> Iterator[None]:
    """Within the block, SIGTERM and SIGUSR1 ask for a stop instead of ending the process at once (only from
    the main thread, where Python delivers signals; elsewhere the block does nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {number: signal.getsignal(number) for number in SIGNALS}

    def request_stop(number: int, frame: object) -> None:
        _received.append(number)

    for number in SIGNALS:
        signal.signal(number, request_stop)
    _watching[0] += 1
    try:
        yield
    finally:
        _watching[0] -= 1
        for number, handler in previous.items():
            signal.signal(number, handler)
        if not _watching[0]:
            _received.clear()


def requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _received[0] if _received else None


def stop_if_requested(resume_hint: Callable[[str], str]) -> None:
    """Raise :class:`Interrupted` if a stop was requested; ``resume_hint(signal_name)`` is its one-line message
    (call this only right after the work done so far was saved)."""
    number = requested()
    if number is not None:
        raise Interrupted(resume_hint(signal.Signals(number).name), number)
