"""Error types. Every error a user can cause derives from MeanSparseError, so the CLI can print its one-line
message instead of a traceback, and every message names the problem and the fix."""

from __future__ import annotations


class MeanSparseError(Exception):
    """Base class of every user-facing error in meansparse_pl."""


# the fix every "this file is damaged" message names
RECREATE_FILE = (
    "the file is corrupt or was not written by meansparse_pl: save the model again with save_checkpoint"
)


class ConfigurationError(MeanSparseError, ValueError):
    """A bad argument or configuration value (negative alpha, epsilon <= 0, unknown name, ...)."""


class UncalibratedOperatorError(MeanSparseError, RuntimeError):
    """A MeanSparse operator was used before its channel statistics were collected."""


class StatisticsError(MeanSparseError, ValueError):
    """Channel statistics that cannot be right: NaN / Inf, wrong shape, negative variance."""


class PlacementError(MeanSparseError, ValueError):
    """No activation found, a rule that matches nothing, or a model that cannot be traced."""


class CheckpointError(MeanSparseError, ValueError):
    """A corrupt, truncated, foreign or incompatible checkpoint file."""


class DataNotFoundError(MeanSparseError, FileNotFoundError):
    """A data set is not where it was looked for."""


class DataFormatError(MeanSparseError, ValueError):
    """A data file exists but is not in the expected format (bad magic number, truncated, wrong shape)."""


class PixelRangeError(DataFormatError, ConfigurationError):
    """Images outside [0, 1] or not finite: bad data, and usually a data pipeline's setting (Normalize in the
    transforms, 0-255 pixels), so it is both kinds of error."""


class OutputError(MeanSparseError, OSError):
    """A file or folder cannot be written where it was asked to go (a directory, no permission, another run)."""


class Interrupted(Exception):
    """A run stopped on request (SIGTERM / SIGUSR1) at a safe point, its progress saved: not an error of the
    user's input, so not a MeanSparseError. ``signal_number`` is the signal that asked for the stop."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number
