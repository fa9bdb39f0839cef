"""Run calibration and a sharded evaluation with N CPU processes (gloo) and save what rank 0 sees.

Used by tests/test_distributed.py: the results with 2 and 3 processes must equal those with 1, on a data set
whose size is not divisible by the number of processes (Lightning pads training shards; predict must not),
with random-start PGD; an evaluation of fewer batches than processes; and a calibration on rank 0 alone after
the others moved on (``distributed=False``: no collective, so no hang).
Usage: python ddp_calibrate_evaluate.py DEVICES OUTPUT.pt
"""

from __future__ import annotations

import sys

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from meansparse_pl import ThreatModel, calibrate, operators, set_alpha, sparsify
from meansparse_pl.calibration import CalibrationModule
from meansparse_pl.evaluation import EvaluationTask, run_tasks
from meansparse_pl.sharding import whole_batches_of

NUM_SAMPLES = 37  # odd: 2 processes get 19 and 18 samples, a padding sampler would repeat one


def data_and_model() -> tuple[TensorDataset, nn.Module]:
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(NUM_SAMPLES, 3, 8, 8, generator=generator)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 64, 16),
        nn.GELU(),
        nn.Linear(16, 5),
    ).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.2, 0.2)
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5
    return TensorDataset(x, y), model


def main(devices: int, output: str) -> None:
    dataset, model = data_and_model()
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=devices,
        strategy="ddp" if devices > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    sparse = sparsify(model, dataset[0][0][None])
    calibration = CalibrationModule(sparse)
    shard = whole_batches_of(DataLoader(dataset, batch_size=5), trainer.world_size, trainer.global_rank)
    trainer.predict(calibration, dataloaders=shard, return_predictions=False)
    calibration.finish_without_batches(trainer)
    set_alpha(sparse, 0.3)
    threat = ThreatModel("Linf", 0.05)
    tasks = [
        EvaluationTask("clean", "clean", threat),
        EvaluationTask("pgd", "pgd", threat, options={"steps": 3, "random_start": True}),
        EvaluationTask("base/clean", "clean", threat, alpha=0.0),
    ]
    results = run_tasks(sparse, dataset, tasks, batch_size=4, trainer=trainer)
    # two samples in one batch: the other processes evaluate nothing, and still take part in the merge
    few = run_tasks(sparse, Subset(dataset, [3, 5]), tasks[:2], batch_size=4, trainer=trainer)
    # the Trainer-less API on every process of the group (distributed=None: the group is initialised)
    without_trainer = run_tasks(sparse, dataset, tasks[1:2], batch_size=4)
    alone = None
    if trainer.is_global_zero:  # one process alone: no collective may be entered
        copy = sparsify(model, dataset[0][0][None])
        calibrate(copy, DataLoader(dataset, batch_size=5), progress=False, distributed=False)
        alone = [op.mean.clone() for op in operators(copy)]
    trainer.strategy.barrier("rank_zero_calibrated")
    if trainer.is_global_zero:
        torch.save(
            {
                "images": calibration.images,
                "mean": [op.mean.clone() for op in operators(sparse)],
                "var": [op.var.clone() for op in operators(sparse)],
                "count": [float(op.count) for op in operators(sparse)],
                "results": results,
                "few": few,
                "without_trainer": without_trainer,
                "alone": alone,
            },
            output,
        )


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2])
