"""The one "eval mode, then put every module's own flag back" helper of the package."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode for the block, then restore every submodule's own train flag.

    Restoring per submodule (rather than calling ``model.train(was_training)``) keeps deliberately frozen
    parts, e.g. a BatchNorm kept in eval mode during fine-tuning, frozen, and a model that was partly in
    train mode stays exactly so.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag
