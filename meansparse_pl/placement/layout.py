"""The channel axis of a site and the probe input: rules shared by every placement strategy."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from meansparse_pl.errors import MeanSparseError, PlacementError
from meansparse_pl.modes import eval_mode


def infer_channel_dim_from_shape(shape: Sequence[int]) -> int:
    if len(shape) <= 2:
        return 1
    if len(shape) == 3:
        return -1  # (N, L, C) token features
    # 4-D and more: square spatial dims at the end -> (N, C, H, W); square dims after N -> (N, H, W, C)
    if shape[-1] == shape[-2]:
        return 1
    if shape[1] == shape[2]:
        return -1
    return 1


def override_channel_dim(path: str, overrides: dict[str, int] | None) -> int | None:
    for pattern, dim in (overrides or {}).items():
        if fnmatch.fnmatchcase(path, pattern):
            return dim
    return None


def prepare_input(model: nn.Module, example_input: torch.Tensor | Sequence[int]) -> torch.Tensor:
    if not isinstance(example_input, torch.Tensor):
        example_input = torch.zeros(1, *[int(s) for s in example_input])
    try:
        reference = next(model.parameters())
        example_input = example_input.to(device=reference.device, dtype=reference.dtype)
    except StopIteration:
        pass
    return example_input


@contextlib.contextmanager
def probing(model: nn.Module, example_input: torch.Tensor) -> Iterator[None]:
    """Eval mode and no gradients for a probe forward; a forward that fails (an input of the wrong shape, a
    model of another architecture) is one PlacementError naming the shape, not the framework's traceback."""
    try:
        with eval_mode(model), torch.no_grad():
            yield
    except MeanSparseError:
        raise
    except Exception as error:
        detail = (str(error).strip().splitlines() or [""])[0][:300]
        raise PlacementError(
            f"a forward pass of the model on an example input of shape {tuple(example_input.shape)} failed "
            f"({type(error).__name__}: {detail}); give an example of the input the model takes (for a checkpoint: "
            "the architecture it was saved from)."
        ) from None
