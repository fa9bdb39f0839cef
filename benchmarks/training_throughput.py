"""PGD adversarial-training throughput: the LightningModule under a Trainer vs a plain PyTorch loop.

Both paths do the same work on the same batches: PGD-``attack_steps`` in eval mode (``pgd_perturb`` inside
``eval_mode``), cross-entropy on the adversarial batch in train mode, backward, SGD step (the paper's
lr 0.1, momentum 0.9, weight decay 5e-4), and a running count of correct predictions. The Lightning path
is ``Trainer.fit`` with logging, checkpointing, progress bar and model summary off (what a throughput run
would use); the plain path is a ``for`` loop over the same ``DataLoader``. Each repeat starts both from the
same initial weights; the two are interleaved (alternating which goes first) so that drift in machine load
hits both alike, and the medians over repeats are reported. Only the ``--steps`` batches after
``--warmup`` batches are timed (from the start of the first timed batch to the end of the last optimiser
step), so one-off costs such as Trainer setup are excluded on both sides.

    python benchmarks/training_throughput.py --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import time
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meansparse_pl.attacks import pgd_perturb
from meansparse_pl.config import ThreatModel
from meansparse_pl.modes import eval_mode
from meansparse_pl.module import AdversarialClassifier


class _BatchTimer(pl.Callback):
    """Wall time from the start of batch ``warmup`` to the end of batch ``warmup + steps - 1``."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.steps = warmup, steps
        self.start = self.end = 0.0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        if idx == self.warmup:
            self.start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if idx == self.warmup + self.steps - 1:
            self.end = time.perf_counter()


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def make_module(args: argparse.Namespace) -> AdversarialClassifier:
    return AdversarialClassifier(
        backbone=args.model,
        in_channels=1,
        normalization=((0.2860,), (0.3530,)),
        objective="pgd",
        threat=ThreatModel("Linf", 0.1),
        step_size=0.025,
        attack_steps=args.attack_steps,
        optimizer="sgd",
        lr=0.1,
        momentum=0.9,
        weight_decay=5e-4,
    )


def run_lightning(module: AdversarialClassifier, loader: DataLoader, args: argparse.Namespace) -> float:
    timer = _BatchTimer(args.warmup, args.steps)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=args.warmup + args.steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
    )
    trainer.fit(module, train_dataloaders=loader)
    return args.steps * args.batch_size / (timer.end - timer.start)


def run_plain(model: nn.Module, loader: DataLoader, args: argparse.Namespace) -> float:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    model.train()
    correct = torch.zeros((), dtype=torch.long)
    start = 0.0
    for idx, (x, y) in enumerate(loader):
        if idx == args.warmup:
            start = time.perf_counter()
        with eval_mode(model):
            x_adv = pgd_perturb(
                model, x, y, eps=0.1, step_size=0.025, steps=args.attack_steps, norm="Linf", random_start=True
            )
        logits = model(x_adv)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        correct += (logits.detach().argmax(1) == y).sum()
        if idx == args.warmup + args.steps - 1:
            break
    return args.steps * args.batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn", help="backbone name (28x28 grey input)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--attack-steps", type=int, default=10, help="PGD steps per training batch")
    parser.add_argument("--warmup", type=int, default=2, help="untimed batches per run")
    parser.add_argument("--steps", type=int, default=6, help="timed batches per run")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    # Keep the output to the numbers: no per-run "fit stopped" info lines or the no-validation warning.
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*val_dataloader.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    pl.seed_everything(0, verbose=False)
    n = args.batch_size * (args.warmup + args.steps)
    data = TensorDataset(torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    loader = DataLoader(data, batch_size=args.batch_size, shuffle=False, num_workers=0)
    init_state = make_module(args).state_dict()

    lightning_ips: list[float] = []
    plain_ips: list[float] = []
    for repeat in range(args.repeats):
        order = ("lightning", "plain") if repeat % 2 == 0 else ("plain", "lightning")
        for which in order:
            module = make_module(args)
            module.load_state_dict(init_state)
            torch.manual_seed(repeat)  # same random starts for both paths within a repeat
            if which == "lightning":
                lightning_ips.append(run_lightning(module, loader, args))
            else:
                plain_ips.append(run_plain(module.model, loader, args))
        print(
            f"repeat {repeat}: lightning {lightning_ips[-1]:.1f} img/s, plain {plain_ips[-1]:.1f} img/s",
            flush=True,
        )

    # Each repeat's two runs are adjacent in time, so their ratio is far less exposed to load drift on a
    # shared machine than the ratio of the two medians; both are reported.
    paired = [a / b for a, b in zip(lightning_ips, plain_ips, strict=True)]
    result = {
        "model": args.model,
        "batch_size": args.batch_size,
        "attack_steps": args.attack_steps,
        "timed_batches": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "lightning_images_per_s": lightning_ips,
        "plain_images_per_s": plain_ips,
        "lightning_median": statistics.median(lightning_ips),
        "plain_median": statistics.median(plain_ips),
        "ratio_of_medians": statistics.median(lightning_ips) / statistics.median(plain_ips),
        "median_paired_ratio": statistics.median(paired),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "machine": f"{_cpu_model()}, {os.cpu_count()} logical CPUs",
        "load_average_1min_at_end": os.getloadavg()[0],
    }
    print(
        f"median: lightning {result['lightning_median']:.1f} img/s, plain {result['plain_median']:.1f} img/s, "
        f"ratio of medians {result['ratio_of_medians']:.3f}, median paired ratio {result['median_paired_ratio']:.3f}"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
