"""What every data module of the package shares: in-memory and file datasets, the split into training,
held-out validation, calibration and test, and the loaders.

Every module yields float images in [0, 1] of shape (N, C, H, W) and int64 labels; normalisation is NOT
applied here but inside the model (see :mod:`meansparse_pl.models`), because attacks perturb [0, 1] pixels.

Splits. The held-out validation split (``val_size`` images) is carved from the TRAINING set by a random
permutation seeded with ``seed``: the first ``val_size`` permuted indices are validation, the rest are
training. The test split is never used for tuning. ``calibration_dataloader()`` yields the training split
again, without augmentation and unshuffled, to collect MeanSparse channel statistics. Note that a
checkpoint trained on the full training set (as published checkpoints are) has seen the validation images.

Subsets. ``train_subset``/``val_subset``/``test_subset``/``calibration_subset`` keep the first N images of a
split, for quick runs. Training and validation splits are in permuted order, so their first N images are a
random sample; the test split keeps the data set's own order (the first N CIFAR test images are the usual
RobustBench subset), except ImageNet, whose ``val/`` folder is sorted by class and is therefore put in a
fixed permuted order (seed 0, independent of ``seed``) so a test subset covers many classes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import pil_loader

from meansparse_pl.config import check_optional_positive_int
from meansparse_pl.errors import ConfigurationError, DataFormatError

Transform = Callable[[torch.Tensor], torch.Tensor]


class TensorImageDataset(Dataset):
    """uint8 images (N, C, H, W) held in memory, returned as float [0, 1] with an optional transform.

    Kept as uint8 (a quarter of the float32 memory) and converted per item; the train and eval views of one
    split share the same tensors.
    """

    def __init__(
        self, images: torch.Tensor, labels: torch.Tensor, transform: Transform | None = None
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.to(torch.int64)
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.images[index].to(torch.float32).div_(255.0)
        if self.transform is not None:
            image = self.transform(image)
        return image, self.labels[index]


class ImageFileDataset(Dataset):
    """(path, label) samples decoded with PIL, transformed to a float [0, 1] tensor."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Transform) -> None:
        self.samples = list(samples)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        path, label = self.samples[index]
        try:
            image = pil_loader(path)
        except (OSError, SyntaxError, ValueError) as error:  # PIL: truncated, empty or not an image at all
            raise DataFormatError(
                f"image file {path} cannot be decoded ({type(error).__name__}: {str(error)[:80] or 'empty file'}); "
                "replace or remove it (a truncated download or copy?)."
            ) from None
        return self.transform(image), torch.tensor(label, dtype=torch.int64)


_COMMON_ARGS = """
            batch_size: Training batch size.
            eval_batch_size: Batch size of the validation, test and calibration loaders (None: batch_size).
            val_size: Number of TRAINING images held out as the validation split (chosen by ``seed``); the
                test split is never used for tuning. 0 disables validation.
            seed: Seed of the permutation that splits the training set into training and validation.
            num_workers: DataLoader worker processes (0: load in the main process).
            train_subset: Keep only the first N images of the (permuted) training split; None keeps all.
            val_subset: Keep only the first N images of the validation split; None keeps all.
            test_subset: Keep only the first N images of the test split; None keeps all.
            calibration_subset: Keep only the first N images of the calibration split (the training split
                without augmentation); None uses train_subset.
"""


def document_common_args(init: Callable[..., None]) -> Callable[..., None]:
    """Append the shared argument descriptions to an ``__init__`` docstring (LightningCLI reads them)."""
    init.__doc__ = (init.__doc__ or "").rstrip() + _COMMON_ARGS
    return init


_COMMON_NAMES = (
    "data_dir", "batch_size", "eval_batch_size", "val_size", "seed", "num_workers",
    "train_subset", "val_subset", "test_subset", "calibration_subset", "augment", "download",
)  # fmt: skip


def common_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """The base-class arguments out of a subclass ``__init__``'s ``locals()``."""
    return {name: arguments[name] for name in _COMMON_NAMES if name in arguments}


def check_optional_count(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


class ImageClassificationDataModule(L.LightningDataModule):
    """Shared split / subset / loader logic; subclasses only read their files and define transforms."""

    dataset_name: str = ""

    def __init__(
        self,
        data_dir: str | Path,
        batch_size: int,
        eval_batch_size: int | None,
        val_size: int,
        seed: int,
        num_workers: int,
        train_subset: int | None,
        val_subset: int | None,
        test_subset: int | None,
        calibration_subset: int | None,
        augment: bool,
        download: bool,
    ) -> None:
        super().__init__()
        if batch_size is None:
            raise ConfigurationError("batch_size must be a positive integer, got None")
        optional_counts = {
            "batch_size": batch_size,
            "eval_batch_size": eval_batch_size,
            "train_subset": train_subset,
            "val_subset": val_subset,
            "test_subset": test_subset,
            "calibration_subset": calibration_subset,
        }
        for name, value in optional_counts.items():
            check_optional_count(name, value)
        if not isinstance(val_size, int) or isinstance(val_size, bool) or val_size < 0:
            raise ConfigurationError(f"val_size must be a non-negative integer, got {val_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigurationError(f"num_workers must be a non-negative integer, got {num_workers!r}")
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_size = val_size
        self.seed = seed
        self.num_workers = num_workers
        self.train_subset = train_subset
        self.val_subset = val_subset
        self.test_subset = test_subset
        self.calibration_subset = calibration_subset
        self.augment = augment
        self.download = download
        self.train_dataset: Subset | None = None
        self.val_dataset: Subset | None = None
        self.calibration_dataset: Subset | None = None
        self.test_dataset: Subset | None = None

    # ---- what a subclass provides ------------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        """Number of classes (size of the model's output layer)."""
        raise NotImplementedError

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the images the loaders yield."""
        raise NotImplementedError

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        """Per-channel (mean, std) of the training images, for the model's ``Normalize`` module."""
        raise NotImplementedError

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        """(training pool with training transforms, the same pool with eval transforms, test set)."""
        raise NotImplementedError

    def _download(self) -> None:
        """Fetch the data into ``data_dir`` (only called when ``download=True``)."""

    def _test_order(self, size: int) -> list[int]:
        return list(range(size))

    # ---- Lightning hooks ------------------------------------------------------------------------------

    def prepare_data(self) -> None:
        """Download once (Lightning calls this on one process only) when ``download=True``."""
        if self.download:
            self._download()

    def setup(self, stage: str | None = None) -> None:
        """Read the data and make the splits; idempotent, every stage gets every split."""
        if self.train_dataset is not None:
            return
        train_pool, calibration_pool, test_set = self._build()
        pool_size = len(train_pool)
        if self.val_size >= pool_size:
            raise ConfigurationError(
                f"val_size={self.val_size} leaves no training images: the {self.dataset_name} training set "
                f"has {pool_size}"
            )
        generator = torch.Generator().manual_seed(self.seed)
        permutation = torch.randperm(pool_size, generator=generator).tolist()
        val_indices = permutation[: self.val_size]
        train_indices = permutation[self.val_size :]
        calibration_size = (
            self.calibration_subset if self.calibration_subset is not None else self.train_subset
        )
        self.train_dataset = Subset(
            train_pool, first_indices(train_indices, self.train_subset, "train_subset")
        )
        self.calibration_dataset = Subset(
            calibration_pool, first_indices(train_indices, calibration_size, "calibration_subset")
        )
        self.val_dataset = Subset(calibration_pool, first_indices(val_indices, self.val_subset, "val_subset"))
        test_indices = self._test_order(len(test_set))
        self.test_dataset = Subset(test_set, first_indices(test_indices, self.test_subset, "test_subset"))

    def _split(self, name: str) -> Subset:
        if self.train_dataset is None:
            self.setup()
        return getattr(self, name)

    def train_dataloader(self) -> DataLoader:
        """Training split, augmented (if ``augment``) and shuffled."""
        return self._make_loader(self._split("train_dataset"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        """Held-out validation split (from the training set), no augmentation, not shuffled."""
        return self._make_loader(self._split("val_dataset"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test split, no augmentation, not shuffled."""
        return self._make_loader(self._split("test_dataset"), self.eval_batch_size, shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """Training split without augmentation, not shuffled: the images MeanSparse statistics come from."""
        return self._make_loader(self._split("calibration_dataset"), self.eval_batch_size, shuffle=False)

    def _make_loader(self, dataset: Subset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )


def first_indices(indices: list[int], count: int | None, what: str) -> list[int]:
    if count is None:
        return indices
    if count > len(indices):
        raise ConfigurationError(f"{what}={count} but the split has only {len(indices)} images")
    return indices[:count]


def first_samples(dataset: Dataset, limit: int | None) -> Dataset:
    """The first ``limit`` samples of ``dataset`` (all of them for None): how every subcommand and callback
    selects the samples it evaluates."""
    limit = check_optional_positive_int("limit_samples", limit, "or null for every sample")
    if limit is None or limit >= len(dataset):  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(limit))


def split_samples(datamodule: Any, split: str, limit: int | None) -> Dataset:
    """The first ``limit`` samples of the datamodule's test split (``split="test"``), or of its held-out
    validation split."""
    datamodule.setup("test" if split == "test" else "fit")
    loader = datamodule.test_dataloader() if split == "test" else datamodule.val_dataloader()
    return first_samples(loader.dataset, limit)
