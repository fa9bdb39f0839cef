"""CIFAR-10 and CIFAR-100 from torchvision's on-disk format (``cifar-10-batches-py/``, ``cifar-100-python/``), read
without executing pickled code."""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from meansparse_pl.data.base import (
    ImageClassificationDataModule,
    TensorImageDataset,
    common_args,
    document_common_args,
)
from meansparse_pl.errors import DataFormatError, DataNotFoundError


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays and nothing else.

    The CIFAR "python version" batches are pickles of plain dicts of lists, strings and one uint8 array.
    ``pickle.load`` would execute any callable a (tampered) file names; this one refuses every global except
    the few numpy uses to rebuild an array, so a malicious data file fails to load instead of running code.
    """

    _ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("_codecs", "encode"),  # how Python 3 writes bytes in a protocol-2 pickle
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def _load_cifar_batch(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as handle, warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # numpy.core alias in the original files
            batch = _ArrayOnlyUnpickler(io.BufferedReader(handle), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as error:
        raise DataFormatError(
            f"{path} is not a CIFAR python batch ({error}); delete it and get it again"
        ) from None
    if not isinstance(batch, dict):
        raise DataFormatError(
            f"{path} is not a CIFAR python batch: it holds a {type(batch).__name__}, not a dict"
        )
    return batch


def _cifar_arrays(
    paths: Sequence[Path], label_key: str, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    for path in paths:
        batch = _load_cifar_batch(path)
        if "data" not in batch or label_key not in batch:
            raise DataFormatError(f"{path} lacks the 'data' / {label_key!r} entries of a CIFAR batch")
        data = np.asarray(batch["data"])
        batch_labels = np.asarray(batch[label_key], dtype=np.int64)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise DataFormatError(
                f"{path}: 'data' must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
            )
        if batch_labels.shape != (data.shape[0],):
            raise DataFormatError(f"{path}: {data.shape[0]} images but {batch_labels.shape[0]} labels")
        if batch_labels.size and (batch_labels.min() < 0 or batch_labels.max() >= num_classes):
            raise DataFormatError(f"{path}: labels outside [0, {num_classes})")
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    return torch.from_numpy(np.concatenate(images)), torch.from_numpy(np.concatenate(labels))


# ---- CIFAR ---------------------------------------------------------------------------------------------


class _CIFARDataModule(ImageClassificationDataModule):
    """CIFAR in torchvision's on-disk layout, read without torchvision's md5 check.

    torchvision's ``CIFAR10`` verifies every batch file against the official md5 sums and then calls
    ``pickle.load``, which would execute any code a tampered file names. We read the same files with an
    unpickler that can only rebuild numpy arrays and validate shapes and label ranges instead of md5 sums
    (which also lets tests use small files in the exact format). ``download=True`` still uses torchvision,
    which checks the md5 of what it downloads.
    """

    folder: str = ""
    train_files: tuple[str, ...] = ()
    test_files: tuple[str, ...] = ()
    label_key: str = ""

    def _files(self) -> tuple[list[Path], list[Path]]:
        root = self.data_dir / self.folder
        return [root / name for name in self.train_files], [root / name for name in self.test_files]

    def _missing(self) -> list[Path]:
        train, test = self._files()
        return [path for path in train + test if not path.is_file()]

    def _torchvision_class(self) -> type:
        raise NotImplementedError

    def _download(self) -> None:
        if self._missing():
            dataset_class = self._torchvision_class()
            dataset_class(str(self.data_dir), train=True, download=True)
            dataset_class(str(self.data_dir), train=False, download=True)

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        if self._missing() and self.download:
            self._download()
        missing = self._missing()
        if missing:
            raise DataNotFoundError(
                f"{self.dataset_name} not found: looked in {self.data_dir / self.folder} for "
                f"{', '.join(self.train_files + self.test_files)} (missing: {', '.join(p.name for p in missing)}); "
                f"set data_dir to the folder that contains {self.folder}/ or set download: true"
            )
        train_paths, test_paths = self._files()
        train_images, train_labels = _cifar_arrays(train_paths, self.label_key, self.num_classes)
        test_images, test_labels = _cifar_arrays(test_paths, self.label_key, self.num_classes)
        train_transform = None
        if self.augment:
            train_transform = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])
        return (
            TensorImageDataset(train_images, train_labels, train_transform),
            TensorImageDataset(train_images, train_labels),
            TensorImageDataset(test_images, test_labels),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, 32, 32)


class CIFAR10DataModule(_CIFARDataModule):
    """CIFAR-10: 32x32 colour images of 10 classes, 50000 train / 10000 test (``cifar-10-batches-py/``)."""

    dataset_name = "CIFAR-10"
    folder = "cifar-10-batches-py"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_files = ("test_batch",)
    label_key = "labels"

    @document_common_args
    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        calibration_subset: int | None = None,
        augment: bool = True,
        download: bool = False,
    ) -> None:
        """CIFAR-10 data module.

        Args:
            data_dir: Folder that contains ``cifar-10-batches-py/`` (torchvision's ``root``).
            augment: Random 32x32 crop of the 4-pixel padded image plus horizontal flip for training.
            download: Download with torchvision (md5-checked) into ``data_dir`` when the files are missing.
        """
        super().__init__(**common_args(locals()))
        self.save_hyperparameters()

    def _torchvision_class(self) -> type:
        from torchvision.datasets import CIFAR10

        return CIFAR10

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Per-channel mean / std over all training pixels (the often-quoted 0.2023/0.1994/0.2010 "std" is
        # the mean of per-image standard deviations, not the dataset std).
        return ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


class CIFAR100DataModule(_CIFARDataModule):
    """CIFAR-100: 32x32 colour images of 100 fine classes, 50000 train / 10000 test (``cifar-100-python/``)."""

    dataset_name = "CIFAR-100"
    folder = "cifar-100-python"
    train_files = ("train",)
    test_files = ("test",)
    label_key = "fine_labels"

    @document_common_args
    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        calibration_subset: int | None = None,
        augment: bool = True,
        download: bool = False,
    ) -> None:
        """CIFAR-100 data module (fine labels).

        Args:
            data_dir: Folder that contains ``cifar-100-python/`` (torchvision's ``root``).
            augment: Random 32x32 crop of the 4-pixel padded image plus horizontal flip for training.
            download: Download with torchvision (md5-checked) into ``data_dir`` when the files are missing.
        """
        super().__init__(**common_args(locals()))
        self.save_hyperparameters()

    def _torchvision_class(self) -> type:
        from torchvision.datasets import CIFAR100

        return CIFAR100

    @property
    def num_classes(self) -> int:
        return 100

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
