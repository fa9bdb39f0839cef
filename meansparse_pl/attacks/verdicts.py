"""The per-sample worst case over attacks ("best known" robust accuracy), and the paired comparison of two
settings on the same samples: the one place their rules live.

A sample counts as robust only if every attack failed on it: a logical AND of the attacks' per-sample
verdicts. The verdicts are either bool tensors (one attack run on ``x, y``) or ``{sample index: correct}``
dictionaries (results keyed by the sample's index in a data set, as the sharded evaluation returns them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import torch
from torch import Tensor

from meansparse_pl.errors import ConfigurationError

Verdicts = TypeVar("Verdicts", Tensor, dict[int, bool])
PerSample = dict[int, bool]  # sample index -> correct


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


def paired_comparison(a: PerSample, b: PerSample) -> tuple[float, int, int]:
    """Accuracy of ``a`` minus that of ``b`` (points) on their common samples, the samples on which they
    disagree, and the number of common samples."""
    common = a.keys() & b.keys()
    n = len(common)
    gap = 100.0 * (sum(a[i] for i in common) - sum(b[i] for i in common)) / max(n, 1)
    return gap, sum(a[i] != b[i] for i in common), n


def paired_gap(a: PerSample, b: PerSample) -> tuple[float, float]:
    """Accuracy of ``a`` minus that of ``b`` and the difference's standard error, in points.

    Paired over the same samples: two settings that differ on ``d`` of ``n`` samples have an accuracy difference
    with a standard error of about ``100 * sqrt(d) / n`` points (McNemar's test statistic).
    """
    gap, discordant, n = paired_comparison(a, b)
    return gap, 100.0 * math.sqrt(discordant) / max(n, 1)


def encode_verdicts(per_sample: PerSample) -> dict[str, Any]:
    """A compact JSON form of per-sample verdicts: the sorted indices and one "1"/"0" character per sample."""
    indices = sorted(per_sample)
    return {"indices": indices, "correct": "".join("1" if per_sample[i] else "0" for i in indices)}


def decode_verdicts(data: dict[str, Any]) -> PerSample:
    """The verdicts :func:`encode_verdicts` wrote."""
    return {int(i): c == "1" for i, c in zip(data["indices"], data["correct"], strict=True)}
