"""Data modules as a user's broken pipeline makes them, and stops as a scheduler makes them, for the
command-line cases of tests/test_bad_data.py: real Fashion-MNIST with one corruption applied to every split
(``--data custom_data.CorruptedFashionMNIST``) and a callback that signals its own process (this folder is on
the import path of the tests)."""

from __future__ import annotations

import math
import os
import signal as signal_module

import torch
from lightning.pytorch import Callback
from torch.utils.data import Dataset

from meansparse_pl.data import FashionMNISTDataModule

CORRUPTIONS = ("none", "nan", "scale_255", "label_10", "label_-1", "invert", "float64")


class Corrupted(Dataset):
    """``dataset`` with ``corruption`` applied to each sample (NaN and bad labels: to every 7th sample, from the
    fourth on, so the first batch may be clean)."""

    def __init__(self, dataset: Dataset, corruption: str) -> None:
        self.dataset = dataset
        self.corruption = corruption

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image, label = self.dataset[index]
        marked = index % 7 == 3
        if self.corruption == "nan" and marked:
            image = image.clone()
            image[0, 0, 0] = math.nan
        elif self.corruption == "scale_255":
            image = image * 255
        elif self.corruption == "label_10" and marked:
            label = torch.tensor(10)
        elif self.corruption == "label_-1" and marked:
            label = torch.tensor(-1)
        elif self.corruption == "invert":
            image = 1 - image
        elif self.corruption == "float64":
            image = image.double()
        return image, label


class CorruptedFashionMNIST(FashionMNISTDataModule):
    """Fashion-MNIST whose every split has one corruption (see :class:`Corrupted`)."""

    def __init__(self, corruption: str = "none", **kwargs) -> None:
        if corruption not in CORRUPTIONS:
            raise ValueError(f"corruption must be one of {CORRUPTIONS}")
        super().__init__(**kwargs)
        self.corruption = corruption

    def _build(self):
        return tuple(Corrupted(split, self.corruption) for split in super()._build())


class SignalAtStep(Callback):
    """Sends ``signal`` (a real one) to this process after training step ``step``: a stop as SLURM or Ctrl-C
    makes one, at a known point of the run."""

    def __init__(self, step: int = 3, signal: str = "SIGTERM") -> None:
        self.step = step
        self.signal = signal

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), getattr(signal_module, self.signal))
