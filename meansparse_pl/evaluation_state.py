"""What a resumable evaluation is and remembers: its tasks (:class:`EvaluationTask`), the fingerprint of a run
(:func:`fingerprint_of`) and the per-sample results saved after every attack (:class:`ResumeState`), which
are reused only for the same run and, batch by batch, the same images and labels."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.config import ThreatModel
from meansparse_pl.errors import CheckpointError, ConfigurationError
from meansparse_pl.io import atomic_torch_save, state_digest
from meansparse_pl.ops import MeanSparse, operators


@dataclass(frozen=True)
class EvaluationTask:
    """One thing to measure on every sample: an attack (or ``clean``) under one model setting.

    ``key`` names the result (e.g. ``"alpha=0.2/apgd-ce"``); ``alpha`` is set on every operator before the
    attack runs, so several settings of the same model share one data pass.
    """

    key: str
    attack: str
    threat: ThreatModel
    options: dict[str, Any] = field(default_factory=dict)
    # one alpha for every operator, one per operator (in the order of ``operators``), or None: the operators'
    # alphas as they were when the run started
    alpha: float | tuple[float, ...] | None = None
    # a cascade step: attack only the samples every one of these tasks (earlier in the list) found correct; the
    # others are already broken and count as not robust
    after: tuple[str, ...] = ()


class ResumeState:
    """Finished per-sample results of one run, saved atomically after every attack (one file per process).

    Results are reused only for the same run: the same fingerprint (weights, tasks, samples, seed, precision,
    device kind) and, batch by batch, the same images and labels (a digest of each batch is saved with its
    results; a batch whose content changed is attacked again). A finished run's state says so: a re-run with
    other settings starts afresh, while an interrupted run's state for other settings is refused (its progress
    is not thrown away silently)."""

    FORMAT = 2

    def __init__(self, path: str | os.PathLike | None, fingerprint: str, rank: int = 0) -> None:
        self.path = None if path is None else Path(f"{path}.rank{rank}")
        self.fingerprint = fingerprint
        self.results: dict[str, dict[int, bool]] = {}
        self.batches: dict[int, str] = {}  # first sample index of a batch -> digest of its images and labels
        self.finished = False
        self.restarted = False  # a finished state of other settings was found and replaced
        if self.path is not None and self.path.exists():
            self._load(self.path)

    def _load(self, path: Path) -> None:
        try:
            saved = torch.load(path, weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"evaluation state {path} is unreadable ({type(error).__name__}); delete it to restart."
            ) from error
        results = saved.get("results") if isinstance(saved, dict) else None
        batches = saved.get("batches", {}) if isinstance(saved, dict) else None
        if (
            not isinstance(results, dict)
            or not all(
                isinstance(k, str) and isinstance(v, dict) and all(isinstance(i, int) for i in v)
                for k, v in results.items()
            )
            or not isinstance(batches, dict)
            or not all(isinstance(i, int) and isinstance(d, str) for i, d in batches.items())
        ):
            raise CheckpointError(f"evaluation state {path} is not a state file of this package; delete it.")
        if saved.get("fingerprint") != self.fingerprint:
            if saved.get("finished") is True:  # its numbers are in the reports already: start afresh
                self.restarted = True
                return
            raise ConfigurationError(
                f"evaluation state {path} belongs to a different run (model, data, precision, device or attack "
                "settings changed) that was interrupted; run it with its own settings to finish it, or delete it "
                "(or choose another output) to start afresh."
            )
        self.results = {k: {int(i): bool(c) for i, c in v.items()} for k, v in results.items()}
        self.batches = {int(i): str(d) for i, d in batches.items()}
        self.finished = saved.get("finished") is True

    def same_batch(self, indices: Sequence[int], digest: str | None) -> bool:
        """Record the content digest of the batch of ``indices``; a batch whose saved digest differs loses its
        saved results (they belong to other images), and False says so."""
        if digest is None or not indices:
            return True
        first = int(indices[0])
        saved = self.batches.get(first)
        self.batches[first] = digest
        if saved is None or saved == digest:
            return True
        for per_sample in self.results.values():
            for i in indices:
                per_sample.pop(int(i), None)
        self.finished = False
        return False

    def done(self, key: str, indices: Sequence[int]) -> bool:
        finished = self.results.get(key, {})
        return all(int(i) in finished for i in indices)

    def record(self, key: str, indices: Sequence[int], correct: Sequence[bool]) -> None:
        target = self.results.setdefault(key, {})
        for i, c in zip(indices, correct, strict=True):
            target[int(i)] = bool(c)

    def save(self, finished: bool = False) -> None:
        self.finished = finished
        if self.path is not None:
            atomic_torch_save(
                {
                    "format": self.FORMAT,
                    "fingerprint": self.fingerprint,
                    "results": self.results,
                    "batches": self.batches,
                    "finished": finished,
                },
                self.path,
            )


def _selected_indices(dataset: Dataset) -> list[int] | None:
    """The samples of the underlying data set that a (possibly nested) ``Subset`` selects, in its order."""
    indices: list[int] | None = None
    while isinstance(dataset, Subset):
        outer = [int(i) for i in dataset.indices]
        indices = outer if indices is None else [outer[i] for i in indices]
        dataset = dataset.dataset
    return indices


def fingerprint_of(
    model: nn.Module,
    tasks: Sequence[EvaluationTask],
    dataset: Dataset,
    seed: int,
    precision: str = "32-true",
) -> str:
    """Hash of everything that changes the numbers: weights and buffers (with their dtypes), tasks, which
    samples in which order (for subsets), data size, seed, the Trainer's precision and the device kind (the
    images themselves are checked batch by batch, see :class:`ResumeState`).

    The operators' alpha buffers (found by module type, so a parameter that happens to be called ``alpha``,
    like ``PSSiLU.alpha``, still counts as a weight) are part of each task instead: a task that sets alpha
    records its value, a task that keeps the model's records the model's values."""
    operator_alphas = {
        f"{name}.alpha" if name else "alpha" for name, m in model.named_modules() if isinstance(m, MeanSparse)
    }
    model_alphas = [op.alpha_value for op in operators(model)]
    state = model.state_dict()
    digest = state_digest(state, skip=operator_alphas)
    spec = [
        (
            t.key,
            t.attack,
            t.threat.eps,
            t.threat.norm,
            sorted(t.options.items()),
            model_alphas if t.alpha is None else t.alpha,
            *([list(t.after)] if t.after else []),  # a cascade step depends on the tasks before it
        )
        for t in tasks
    ]
    num_samples = len(dataset)  # type: ignore[arg-type]
    where = sorted({(str(t.dtype), t.device.type) for t in state.values()})
    digest.update(
        json.dumps(
            [spec, num_samples, seed, _selected_indices(dataset), precision, where], default=str
        ).encode()
    )
    return digest.hexdigest()[:16]
