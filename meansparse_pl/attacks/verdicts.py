"""The per-sample worst case over attacks ("best known" robust accuracy): the one place its rule lives.

A sample counts as robust only if every attack failed on it: a logical AND of the attacks' per-sample
verdicts. The verdicts are either bool tensors (one attack run on ``x, y``) or ``{sample index: correct}``
dictionaries (results keyed by the sample's index in a data set, as the sharded evaluation returns them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypeVar

import torch
from torch import Tensor

from meansparse_pl.errors import ConfigurationError

Verdicts = TypeVar("Verdicts", Tensor, dict[int, bool])


def worst_case(results: Mapping[str, Verdicts] | Iterable[Verdicts]) -> Verdicts:
    """Correct only where correct under every attack; the result has the type of the inputs.

    Raises ConfigurationError when there is no result, or when the results cover different samples."""
    items = list(results.values()) if isinstance(results, Mapping) else list(results)
    if not items:
        raise ConfigurationError("the worst case needs at least one attack result; run at least one attack.")
    if all(isinstance(item, Tensor) for item in items):
        out = items[0].clone()
        for t in items[1:]:
            if t.shape != out.shape:
                raise ConfigurationError(
                    f"attack results cover different samples (shapes {tuple(out.shape)} and {tuple(t.shape)}); "
                    "run every attack on the same x, y."
                )
            out &= t.to(out.device)
        return out
    if not all(isinstance(item, dict) for item in items):
        raise ConfigurationError(
            "worst_case takes bool tensors or {sample index: correct} dictionaries, not a mix."
        )
    indices = list(items[0])
    if any(item.keys() != items[0].keys() for item in items[1:]):
        raise ConfigurationError("the worst case over attacks needs every attack run on the same samples.")
    merged = worst_case([torch.tensor([item[i] for i in indices], dtype=torch.bool) for item in items])
    return dict(zip(indices, merged.tolist(), strict=True))
