"""Count the operations that would make the host wait for an accelerator, on any device, CPU included.

On CUDA, ``torch.cuda.set_sync_debug_mode`` reports synchronising calls; on a CPU nothing synchronises, so a
per-batch ``.item()`` that costs a GPU pipeline stall each time goes unnoticed there. :class:`HostSyncCounter`
sees the same calls at the dispatcher: reading a tensor's value on the host (``item()``, ``float()``,
``int()``, ``bool()``, ``if tensor:``, i.e. ``aten::_local_scalar_dense`` / ``is_nonzero``) and the operations
whose output size depends on the data (``nonzero``, boolean-mask indexing, ``masked_select``, ``unique``),
which on a GPU must wait for the values. Copies to the host (``.cpu()``, ``.tolist()`` of device tensors) are
not visible on a CPU tensor; ``benchmarks/gpu_check.py`` counts them on CUDA.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCING_OPS = frozenset(
    {
        "aten::_local_scalar_dense",
        "aten::is_nonzero",
        "aten::item",
        "aten::equal",
        "aten::nonzero",
        "aten::nonzero_static",
        "aten::masked_select",
        "aten::_unique2",
        "aten::unique_dim",
        "aten::unique_consecutive",
    }
)


class HostSyncCounter(TorchDispatchMode):
    """``with HostSyncCounter() as syncs: ...`` then ``syncs.total`` / ``syncs.by_op``.

    Boolean-mask indexing (``x[mask]``) dispatches ``aten::index`` with a bool index, counted too.
    """

    def __init__(self) -> None:
        super().__init__()
        self.by_op: Counter[str] = Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        name = func._schema.name
        if name in SYNCING_OPS:
            self.by_op[name] += 1
        elif name == "aten::index" and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else [])
        ):
            self.by_op["aten::index(bool mask)"] += 1
        return func(*args, **(kwargs or {}))
