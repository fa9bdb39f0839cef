"""The channel axis of a site and the probe input: rules shared by every placement strategy."""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from meansparse_pl.errors import MeanSparseError, PlacementError
from meansparse_pl.modes import eval_mode


def infer_channel_dim_from_shape(shape: Sequence[int], guess: bool = True) -> int | None:
    """The channel axis a shape suggests: (N, C) and (N, L, C) tokens by rank; 4-D and more by the square
    spatial dims, (N, C, H, W) or (N, H, W, C). Without a square pair the shape says nothing: channels-first is
    the guess, or None when ``guess`` is False."""
    if len(shape) <= 2:
        return 1
    if len(shape) == 3:
        return -1  # (N, L, C) token features
    if shape[-1] == shape[-2]:
        return 1
    if shape[1] == shape[2]:
        return -1
    return 1 if guess else None


# the layout and width of the layers whose output a channel axis is read from
_CHANNELS_FIRST = (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm, nn.GroupNorm)
_CHANNELS_LAST = (nn.Linear, nn.LayerNorm)


def producer_layout(module: nn.Module) -> tuple[int, int] | None:
    """``(channel axis of its output, channel count)`` of a conv / norm / linear layer, else None."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return 1, int(module.out_channels)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return 1, int(module.num_features)
    if isinstance(module, nn.GroupNorm):
        return 1, int(module.num_channels)
    if isinstance(module, nn.Linear):
        return -1, int(module.out_features)
    if isinstance(module, nn.LayerNorm):
        return -1, int(module.normalized_shape[-1])
    return None


def axis_of_width(shape: Sequence[int], width: int, path: str) -> int | None:
    """After a reshape between the producer and the site: the one axis (past the batch axis) whose size is the
    producer's channel count; None if none is; an error naming ``channel_dims`` if several are."""
    axes = [axis for axis in range(1, len(shape)) if shape[axis] == width]
    if len(axes) > 1:
        raise PlacementError(
            f"{path or 'a site'}: the input {tuple(shape)} has {len(axes)} axes of the producing layer's width "
            f"{width}, so its channel axis cannot be read from the data flow; give it with channel_dims="
            f"{{{path!r}: <axis>}}."
        )
    if not axes:
        return None
    return -1 if axes[0] == len(shape) - 1 else axes[0]


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
