"""Per-sample robustness evaluation, sharded by Lightning, resumable, with the worst case over attacks.

Every attack yields, per test sample, whether the model is still correct. Results are keyed by the
sample's index in the data set, so

* the per-sample worst case over all attacks ("best known") is a logical AND by index;
* each process takes whole batches of the one-process order (:mod:`meansparse_pl.sharding`), so every batch,
  and every attack's random start on it, is the one a single process would see: a verdict never depends on the
  number of processes; torchmetrics ``CatMetric`` gathers the (index, correct) rows once at the end, so each
  sample counts exactly once;
* a state file records every finished (attack, batch); an interrupted run skips what is done and, since each
  batch's attack is seeded from the seed and the batch's first index, reaches the same numbers.
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from torchmetrics import CatMetric
from tqdm.auto import tqdm

from meansparse_pl import preemption
from meansparse_pl.attacks import run_attack
from meansparse_pl.calibration import expected_input_shape
from meansparse_pl.errors import ConfigurationError, DataFormatError, Interrupted
from meansparse_pl.evaluation_state import EvaluationTask, ResumeState, fingerprint_of
from meansparse_pl.inputs import (
    InputProblems,
    check_finite_logits,
    check_images,
    check_labels,
    logits_of,
    parameter_dtype,
    sample_pair,
)
from meansparse_pl.io import batch_digest
from meansparse_pl.modes import eval_mode
from meansparse_pl.ops import alphas_of, operators, set_alpha, temporary_alpha
from meansparse_pl.sharding import merge_across_processes, process_group_size_and_rank, whole_batch_loader


class IndexedDataset(Dataset):
    """Yields ``(image, label, index)`` so that results can be keyed by sample, not by batch position."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, int]:
        image, label = sample_pair(self.dataset[index], index)
        return image, torch.as_tensor(label), index


def indexed_loader(
    dataset: Dataset, batch_size: int, num_workers: int = 0, world_size: int = 1, rank: int = 0
) -> DataLoader:
    """This process's whole batches of ``(image, label, index)`` (see :mod:`meansparse_pl.sharding`)."""
    return whole_batch_loader(IndexedDataset(dataset), batch_size, world_size, rank, num_workers=num_workers)


class EvaluationModule(pl.LightningModule):
    """Runs every task on each predict batch; ``trainer.predict`` provides devices, sharding and progress."""

    def __init__(
        self,
        model: nn.Module,
        tasks: Sequence[EvaluationTask],
        *,
        seed: int = 0,
        attack_batch_size: int = 256,
        state_path: str | os.PathLike | None = None,
        fingerprint: str = "",
        sync: bool = False,
        rank: int = 0,
    ) -> None:
        super().__init__()
        if not tasks:
            raise ConfigurationError("nothing to evaluate: give at least one attack.")
        keys = [t.key for t in tasks]
        if len(set(keys)) != len(keys):
            raise ConfigurationError(f"evaluation task keys must be unique, got {keys}.")
        for position, task in enumerate(tasks):
            missing = [k for k in task.after if k not in keys[:position]]
            if missing:
                raise ConfigurationError(
                    f"task {task.key} attacks the survivors of {missing}, which do not come before it; order "
                    "a cascade after the tasks it follows."
                )
        self.model = model
        self.tasks = list(tasks)
        self.seed = seed
        self.attack_batch_size = attack_batch_size
        self.state_path = state_path
        self.fingerprint = fingerprint
        self.rank = rank
        # filled once, in gathered(), with flat float64 rows [index, correct, index, correct, ...]: one gather
        # per task, and a process without rows gathers torchmetrics' empty placeholder of the same rank and dtype
        self.rows = nn.ModuleDict(
            {
                self._metric_name(t.key): CatMetric(sync_on_compute=sync).set_dtype(torch.float64)
                for t in self.tasks
            }
        )
        self.state: ResumeState | None = None
        self.initial_alphas: list[float] | None = None
        self.seen: list[int] = []  # the sample indices this process evaluated
        self.attacked = 0  # attacks run on a batch (not taken from the resume state)
        self.problems = InputProblems(sync_on_compute=sync)  # every batch's input check, read once at the end
        self.num_classes: int | None = None  # read from the model's output on the first batch
        self.input_dtype = torch.float32
        self._digests: list[str | None] = []  # content digests of the batches moved to the device, in order
        # fewer batches than processes: a process without a batch still takes part in the merge (gathered)
        self.allow_zero_length_dataloader_with_multiple_devices = True

    @staticmethod
    def _metric_name(key: str) -> str:
        return hashlib.md5(key.encode()).hexdigest()[:12]  # ModuleDict keys may not contain "." or "/"

    def on_predict_start(self) -> None:
        self.initial_alphas = alphas_of(self.model) if operators(self.model) else None
        self.model.eval()
        self.state = ResumeState(self.state_path, self.fingerprint, self.rank)
        if self.state.restarted:
            rank_zero_info(
                f"evaluate: {self.state.path} holds a finished run with other settings; evaluating afresh"
            )
        self.seen = []
        self.attacked = 0
        self.num_classes = None
        self.input_dtype = parameter_dtype(self.model)  # what float64 images are converted to
        self._digests = []
        self.problems.reset()
        for metric in self.rows.values():
            metric.reset()

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # the sample indices stay on the host: reading them back from a GPU would be a sync per batch; the
        # content digest of a resumable run is taken here too, while the batch is still on the host
        images, labels, indices = batch
        if self.state_path is not None and isinstance(images, Tensor) and isinstance(labels, Tensor):
            self._digests.append(batch_digest(images, labels))
        else:
            self._digests.append(None)
        images = images.to(device, non_blocking=True) if isinstance(images, Tensor) else images
        return images, labels.to(device, non_blocking=True), indices

    def _checked(self, images: Any, labels: Tensor, batch_idx: int) -> Tensor:
        """The input contract (:mod:`meansparse_pl.inputs`): the first batch in full, with one forward pass
        to read the model's class count; every batch cheaply, read once at the end (:meth:`gathered`)."""
        dtype = self.input_dtype
        if self.num_classes is None:
            where = f"evaluation batch {batch_idx}"
            images = check_images(
                images, where=where, input_shape=expected_input_shape(self.model), dtype=dtype
            )
            with torch.no_grad():
                logits = logits_of(self.model(images[:2]), min(2, images.shape[0]), where=where)
            check_finite_logits(logits, where=where)
            self.num_classes = int(logits.shape[1])
            check_labels(labels, self.num_classes, images.shape[0], where=where)
        elif images.dtype == torch.float64 and dtype != torch.float64:
            images = images.to(dtype)
        self.problems.update(images, labels, self.num_classes, batch=batch_idx)
        return images

    def predict_step(self, batch: Any, batch_idx: int) -> None:
        images, labels, indices = batch
        images = self._checked(images, labels, batch_idx)
        index_list = [int(i) for i in indices.tolist()]
        self.seen += index_list
        assert self.state is not None
        digest = self._digests[batch_idx] if batch_idx < len(self._digests) else None
        if not self.state.same_batch(index_list, digest):
            rank_zero_info(
                f"evaluate: the batch from sample {index_list[0]} holds other images or labels than the saved "
                f"state {self.state.path} recorded; attacking it again"
            )
        # verdicts are kept as Python lists on the host: the bookkeeping (cascade survivors, resume state,
        # progress lines) never reads a device tensor; each attack costs one copy of its verdicts
        batch_verdicts: dict[str, list[bool]] = {}
        for task in self._with_progress(batch_idx):
            if self.state.done(task.key, index_list):
                correct = [self.state.results[task.key][i] for i in index_list]
            else:
                started = time.perf_counter()
                try:
                    correct = self._attack(task, images, labels, index_list, batch_verdicts)
                except DataFormatError as error:  # the attack's own input check: say which batch
                    raise type(error)(f"evaluation batch {batch_idx}: {error}") from None
                self.attacked += 1
                self.state.record(task.key, index_list, correct)
                self.state.save()  # after every attack: an interruption loses at most one attack on one batch
                # one batch can hold many minutes of attacks (AutoAttack on CPU): say what finished, so the
                # predict bar is not the only sign of progress
                rank_zero_info(
                    f"evaluate: {task.key} on {len(index_list)} samples (batch {batch_idx + 1}): "
                    f"{100.0 * sum(correct) / len(correct):.2f}% in {time.perf_counter() - started:.0f} s"
                )
                self._stop_if_requested()
            batch_verdicts[task.key] = correct

    def _with_progress(self, batch_idx: int) -> Iterable[EvaluationTask]:
        """The tasks of one batch, with a bar that moves per attack under the Trainer's batch bar (one batch can
        hold an hour of AutoAttack on a CPU); none where the Trainer shows no progress bar, or off rank 0."""
        shown = self.rank == 0 and self.trainer.progress_bar_callback is not None
        return tqdm(
            self.tasks, desc=f"batch {batch_idx + 1}: attacks", unit="attack", leave=False, disable=not shown
        )

    def _attack(
        self,
        task: EvaluationTask,
        images: Tensor,
        labels: Tensor,
        index_list: list[int],
        earlier: dict[str, list[bool]],
    ) -> list[bool]:
        """One task on one batch: the samples still correct under every task it follows (a cascade), under the
        task's alpha, seeded from the batch's first sample (a resumed run repeats exactly the same attack)."""
        alpha = task.alpha if task.alpha is not None else self.initial_alphas
        if alpha is not None:
            set_alpha(self.model, alpha)
        attacked = [i for i in range(len(index_list)) if all(earlier[key][i] for key in task.after)]
        correct = [False] * len(index_list)
        if not attacked:
            return correct
        inputs, targets = images, labels
        if len(attacked) < len(index_list):
            rows = torch.tensor(attacked).to(images.device, non_blocking=True)
            inputs, targets = images.index_select(0, rows), labels.index_select(0, rows)
        torch.manual_seed(self.seed + index_list[0])
        with torch.enable_grad():
            verdicts = run_attack(
                task.attack,
                self.model,
                inputs,
                targets,
                eps=task.threat.eps,
                norm=task.threat.norm,
                seed=self.seed + index_list[0],
                batch_size=self.attack_batch_size,
                **task.options,
            )
        for position, verdict in zip(attacked, verdicts.tolist(), strict=True):  # the one copy to the host
            correct[position] = bool(verdict)
        return correct

    def _stop_if_requested(self) -> None:
        """A stop asked for by SIGTERM / SIGUSR1 (or Lightning's own SIGTERM flag) after an attack whose result is
        saved: one line says how to resume."""
        where = self.state.path if self.state is not None else None
        if where is not None:
            hint = f"its results so far are saved in {where}; run the same command again to resume"
        else:
            hint = "resume is off, so nothing was kept; run again with resume on to keep progress"
        if self.trainer.received_sigterm and preemption.requested() is None:
            raise Interrupted(f"the evaluation stopped on SIGTERM; {hint}", signal.SIGTERM)
        preemption.stop_if_requested(lambda name: f"the evaluation stopped on {name}; {hint}")

    def gathered(self) -> dict[str, dict[int, bool]]:
        """Per task, index -> correct, over all processes: every process enters each task's gather (one that
        evaluated nothing with zero rows), so none waits for another that skipped it."""
        with warnings.catch_warnings():  # a process without a batch still takes part in the merge
            warnings.filterwarnings("ignore", message=".*was called before the ``update`` method.*")
            self.problems.verify("evaluation", self.num_classes)
        out: dict[str, dict[int, bool]] = {}
        for task in self.tasks:
            metric = self.rows[self._metric_name(task.key)]
            mine = self.state.results.get(task.key, {}) if self.state is not None else {}
            rows = torch.tensor([[float(i), float(mine[i])] for i in self.seen], dtype=torch.float64)
            metric.update(rows.reshape(-1).to(self.device))
            rows = metric.compute().reshape(-1, 2).cpu()
            out[task.key] = {int(i): bool(c) for i, c in rows.tolist()}
        return out


def single_device_trainer(model: nn.Module, progress: bool = True) -> pl.Trainer:
    """A one-device Trainer for evaluating ``model`` where it is: its GPU for a model on a GPU (under DDP, each
    rank's own), else Lightning's choice; with or without a progress bar."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    where: dict[str, Any] = {"accelerator": "auto", "devices": 1}
    if device.type == "cuda":
        where = {"accelerator": "gpu", "devices": [device.index or 0]}
    return pl.Trainer(
        **where,
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
    )


def run_tasks(
    model: nn.Module,
    dataset: Dataset,
    tasks: Sequence[EvaluationTask],
    *,
    batch_size: int = 128,
    seed: int = 0,
    state_path: str | os.PathLike | None = None,
    trainer: pl.Trainer | None = None,
    num_workers: int = 0,
    distributed: bool | None = None,
) -> dict[str, dict[int, bool]]:
    """Evaluate every task on every sample of ``dataset``; returns key -> {sample index: correct}.

    Where it runs: with a ``trainer`` of several processes, across those (Lightning's devices and strategy);
    with a one-device ``trainer``, in this process alone; without one, on the model's device, and across every
    process of an initialised process group when ``distributed`` says so (``None``: when one of several
    processes is initialised, so every process must make this call; ``False``: this process alone, no
    collective). Each process takes whole batches of the one-process order, so the verdicts are the same for
    any number of processes, and every process gets all of them. Restores the model's alpha and train/eval
    mode afterwards.
    """
    trainer, world_size, rank, sync = _where_to_run(model, trainer, distributed)
    _check_runnable(trainer, dataset)
    fingerprint = fingerprint_of(model, tasks, dataset, seed, str(trainer.precision))
    ResumeState(state_path, fingerprint, rank)  # another run's state is refused before anything runs
    module = EvaluationModule(
        model,
        tasks,
        seed=seed,
        attack_batch_size=batch_size,
        state_path=state_path,
        fingerprint=fingerprint,
        sync=sync,
        rank=rank,
    )
    loader = indexed_loader(dataset, batch_size, num_workers, world_size, rank)
    with temporary_alpha(model), eval_mode(model):
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        results = module.gathered()
    if module.state is not None and module.state.path is not None:
        if module.seen and module.attacked == 0:
            rank_zero_info(
                f"evaluate: every result was in {module.state.path} for the same model, images, labels and "
                "settings; nothing was attacked again (delete the state file to recompute)"
            )
        module.state.save(finished=True)
    _check_complete(results, len(dataset))  # type: ignore[arg-type]
    return results


def _where_to_run(
    model: nn.Module, trainer: pl.Trainer | None, distributed: bool | None
) -> tuple[pl.Trainer, int, int, bool]:
    """The Trainer that runs the evaluation, the number of processes, this one's rank, and whether the verdicts
    are merged across processes (see :func:`run_tasks`)."""
    if trainer is not None and trainer.world_size > 1:
        return trainer, trainer.world_size, trainer.global_rank, True
    sync = merge_across_processes(distributed) if trainer is None else bool(distributed)
    world_size, rank = process_group_size_and_rank() if sync else (1, 0)
    if trainer is None:
        trainer = single_device_trainer(model, progress=rank == 0)
    return trainer, world_size, rank, sync


def _check_runnable(trainer: pl.Trainer, dataset: Dataset) -> None:
    """One line for a Trainer that cannot give input gradients or would evaluate part of the samples, or for no
    samples at all."""
    if getattr(trainer.predict_loop, "inference_mode", False):
        raise ConfigurationError("evaluation needs gradients: build the Trainer with inference_mode=False.")
    limit = trainer.limit_predict_batches  # an int counts batches, a float is a fraction
    if limit is not None and not (isinstance(limit, float) and limit == 1.0):
        raise ConfigurationError(
            f"trainer.limit_predict_batches is {trainer.limit_predict_batches}, so only part of the samples would "
            "be evaluated; leave it at 1.0 and choose the samples with limit_samples instead."
        )
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ConfigurationError("the evaluation data set is empty.")


def _check_complete(results: dict[str, dict[int, bool]], expected: int) -> None:
    for key, per_sample in results.items():
        if len(per_sample) != expected:
            raise ConfigurationError(
                f"{key}: {len(per_sample)} of {expected} samples were evaluated; the trainer's "
                "limit_predict_batches cuts the evaluation short. Leave it at 1.0 and choose the samples with "
                "limit_samples instead."
            )


def accuracy(per_sample: dict[int, bool]) -> float:
    return 100.0 * sum(per_sample.values()) / max(len(per_sample), 1)
