"""Lightning data modules for Fashion-MNIST, CIFAR-10, CIFAR-100 and ImageNet.

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

import gzip
import io
import pickle
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import pil_loader
from torchvision.transforms import v2

from meansparse_pl.errors import ConfigurationError, DataFormatError, DataNotFoundError

__all__ = [
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataFormatError",
    "FashionMNISTDataModule",
    "ImageNetDataModule",
    "read_idx",
]

Transform = Callable[[torch.Tensor], torch.Tensor]


# --------------------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------------------


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
        return self.transform(pil_loader(path)), torch.tensor(label, dtype=torch.int64)


# --------------------------------------------------------------------------------------------------------
# File formats
# --------------------------------------------------------------------------------------------------------

_IDX_UBYTE = 0x08


def read_idx(path: str | Path) -> np.ndarray:
    """Read a gzip-compressed IDX file (the MNIST / Fashion-MNIST format) of unsigned bytes.

    Layout: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, then that many big-endian
    uint32 sizes, then the data. Raises :class:`DataFormatError` on a bad gzip stream, a bad magic number
    or a payload that does not match the header (e.g. a truncated download).
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError, zlib.error) as error:
        raise DataFormatError(
            f"{path} is not a readable gzip file ({error}); delete it and get it again"
        ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] == 0:
        raise DataFormatError(
            f"{path} has magic number {raw[:4].hex() or 'none'}, expected 000008NN (IDX, unsigned bytes); "
            "it is not an IDX image/label file"
        )
    ndim = raw[3]
    header_end = 4 + 4 * ndim
    if len(raw) < header_end:
        raise DataFormatError(f"{path} is truncated: its IDX header is cut off")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = int(np.prod(shape, dtype=np.int64))
    actual = len(raw) - header_end
    if actual != expected:
        raise DataFormatError(
            f"{path} holds {actual} data bytes but its header {shape} says {expected}; "
            "the file is truncated or corrupt, delete it and get it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_end).reshape(shape)


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


# --------------------------------------------------------------------------------------------------------
# Data modules
# --------------------------------------------------------------------------------------------------------

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


def _document_common_args(init: Callable[..., None]) -> Callable[..., None]:
    """Append the shared argument descriptions to an ``__init__`` docstring (LightningCLI reads them)."""
    init.__doc__ = (init.__doc__ or "").rstrip() + _COMMON_ARGS
    return init


_COMMON_NAMES = (
    "data_dir", "batch_size", "eval_batch_size", "val_size", "seed", "num_workers",
    "train_subset", "val_subset", "test_subset", "calibration_subset", "augment", "download",
)  # fmt: skip


def _common_args(arguments: dict[str, Any]) -> dict[str, Any]:
    """The base-class arguments out of a subclass ``__init__``'s ``locals()``."""
    return {name: arguments[name] for name in _COMMON_NAMES if name in arguments}


def _check_optional_positive(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ConfigurationError(f"{name} must be a positive integer or None, got {value!r}")


class _ImageClassificationDataModule(L.LightningDataModule):
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
            _check_optional_positive(name, value)
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
        self.train_dataset = Subset(train_pool, _first(train_indices, self.train_subset, "train_subset"))
        self.calibration_dataset = Subset(
            calibration_pool, _first(train_indices, calibration_size, "calibration_subset")
        )
        self.val_dataset = Subset(calibration_pool, _first(val_indices, self.val_subset, "val_subset"))
        test_indices = self._test_order(len(test_set))
        self.test_dataset = Subset(test_set, _first(test_indices, self.test_subset, "test_subset"))

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


def _first(indices: list[int], count: int | None, what: str) -> list[int]:
    if count is None:
        return indices
    if count > len(indices):
        raise ConfigurationError(f"{what}={count} but the split has only {len(indices)} images")
    return indices[:count]


# ---- Fashion-MNIST ----------------------------------------------------------------------------------------

FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class FashionMNISTDataModule(_ImageClassificationDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 28x28 grey images of 10 clothing classes, 60000 train / 10000 test.

    Reads the four gzip IDX files directly from ``data_dir`` (Debian's ``dataset-fashion-mnist`` package
    installs them in /usr/share/datasets/fashion-mnist), or from ``data_dir/FashionMNIST/raw`` where
    torchvision's downloader puts them.
    """

    dataset_name = "Fashion-MNIST"
    CLASSES: tuple[str, ...] = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip

    @_document_common_args
    def __init__(
        self,
        data_dir: str = "/usr/share/datasets/fashion-mnist",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        calibration_subset: int | None = None,
        augment: bool = False,
        download: bool = False,
    ) -> None:
        """Fashion-MNIST data module.

        Args:
            data_dir: Folder holding the four ``*-ubyte.gz`` files (or a ``FashionMNIST/raw`` sub-folder).
            augment: Random 28x28 crop of the 2-pixel padded image plus horizontal flip for training
                (off by default: the usual Fashion-MNIST robustness setting trains without augmentation).
            download: Download with torchvision into ``data_dir`` when the files are missing.
        """
        super().__init__(**_common_args(locals()))
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return 10

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (1, 28, 28)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        # Mean / std of the 60000 training images (checked against the files in tests/test_data.py).
        return ((0.2860,), (0.3530,))

    def _find_files(self) -> dict[str, Path] | None:
        for folder in (self.data_dir, self.data_dir / "FashionMNIST" / "raw"):
            paths = {key: folder / name for key, name in FASHION_MNIST_FILES.items()}
            if all(path.is_file() for path in paths.values()):
                return paths
        return None

    def _download(self) -> None:
        if self._find_files() is None:
            from torchvision.datasets import FashionMNIST

            FashionMNIST(str(self.data_dir), train=True, download=True)
            FashionMNIST(str(self.data_dir), train=False, download=True)

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        paths = self._find_files()
        if paths is None and self.download:
            self._download()
            paths = self._find_files()
        if paths is None:
            raise DataNotFoundError(
                f"Fashion-MNIST not found: looked in {self.data_dir} (and {self.data_dir / 'FashionMNIST' / 'raw'}) "
                f"for {', '.join(FASHION_MNIST_FILES.values())}; install them with "
                "`apt-get install dataset-fashion-mnist` (into /usr/share/datasets/fashion-mnist) or set download: true"
            )
        train_images, train_labels = self._read_pair(paths["train_images"], paths["train_labels"])
        test_images, test_labels = self._read_pair(paths["test_images"], paths["test_labels"])
        train_transform = None
        if self.augment:
            train_transform = v2.Compose([v2.RandomCrop(28, padding=2), v2.RandomHorizontalFlip()])
        return (
            TensorImageDataset(train_images, train_labels, train_transform),
            TensorImageDataset(train_images, train_labels),
            TensorImageDataset(test_images, test_labels),
        )

    @staticmethod
    def _read_pair(images_path: Path, labels_path: Path) -> tuple[torch.Tensor, torch.Tensor]:
        images = read_idx(images_path)
        labels = read_idx(labels_path)
        if images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DataFormatError(f"{images_path} holds arrays of shape {images.shape}, expected (N, 28, 28)")
        if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
            raise DataFormatError(
                f"{labels_path} holds {labels.shape} labels for {images.shape[0]} images in {images_path}"
            )
        if labels.size and labels.max() >= 10:
            raise DataFormatError(f"{labels_path} has label {labels.max()}, Fashion-MNIST labels are 0..9")
        return torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ---- CIFAR ---------------------------------------------------------------------------------------------


class _CIFARDataModule(_ImageClassificationDataModule):
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

    @_document_common_args
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
        super().__init__(**_common_args(locals()))
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

    @_document_common_args
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
        super().__init__(**_common_args(locals()))
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


# ---- ImageNet ------------------------------------------------------------------------------------------


_INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


class ImageNetDataModule(_ImageClassificationDataModule):
    """ImageNet-1k from an ImageFolder tree: ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*``.

    The held-out validation split is carved from ``train/``; ``val/`` (the official validation set, the
    usual ImageNet "test" set) is the test split, in a fixed permuted order (see the module docstring).
    """

    dataset_name = "ImageNet"

    @_document_common_args
    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_size: int = 10000,
        seed: int = 0,
        num_workers: int = 0,
        train_subset: int | None = None,
        val_subset: int | None = None,
        test_subset: int | None = None,
        calibration_subset: int | None = None,
        augment: bool = True,
        image_size: int = 224,
        resize_size: int = 256,
        interpolation: Literal["bilinear", "bicubic"] = "bilinear",
        num_classes: int = 1000,
    ) -> None:
        """ImageNet data module.

        Args:
            data_dir: Folder with ``train/`` and ``val/`` ImageFolder trees (one sub-folder per class).
            augment: Random-resized crop to ``image_size`` plus horizontal flip for training; without it,
                training images get the eval transform.
            image_size: Side of the square crop the model sees (eval: centre crop).
            resize_size: Eval images are resized (shorter side) to this before the centre crop.
            interpolation: Resampling of that resize. RobustBench evaluates Liu2023 ConvNeXt / Swin (and
                their MeanSparse versions) with ``bicubic`` (its ``BicubicRes256Crop224``), most other
                ImageNet models with ``bilinear`` (``Res256Crop224``); use the one the model was scored with.
            num_classes: Number of class folders expected in ``train/`` and ``val/`` (checked at setup).
        """
        super().__init__(**_common_args(locals()), download=False)
        for name, value in (
            ("image_size", image_size),
            ("resize_size", resize_size),
            ("num_classes", num_classes),
        ):
            _check_optional_positive(name, value)
        if resize_size < image_size:
            raise ConfigurationError(f"resize_size ({resize_size}) must be >= image_size ({image_size})")
        if interpolation not in _INTERPOLATIONS:
            raise ConfigurationError(
                f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {interpolation!r}"
            )
        self.interpolation = interpolation
        self.image_size = image_size
        self.resize_size = resize_size
        self._num_classes = num_classes
        self.save_hyperparameters()

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (3, self.image_size, self.image_size)

    @property
    def normalization(self) -> tuple[tuple[float, ...], tuple[float, ...]]:
        return ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

    def _scan(self, split: str) -> tuple[list[str], list[tuple[str, int]]]:
        from torchvision.datasets import ImageFolder

        root = self.data_dir / split
        if not root.is_dir():
            raise DataNotFoundError(
                f"ImageNet not found: {root} is not a folder; data_dir must contain train/<wnid>/*.JPEG and "
                "val/<wnid>/*.JPEG (the official val set sorted into class folders)"
            )
        try:
            folder = ImageFolder(str(root))
        except FileNotFoundError as error:
            raise DataNotFoundError(f"ImageNet: no images found under {root} ({error})") from None
        return folder.classes, folder.samples

    def _build(self) -> tuple[Dataset, Dataset, Dataset]:
        train_classes, train_samples = self._scan("train")
        test_classes, test_samples = self._scan("val")
        if train_classes != test_classes:
            only_train = sorted(set(train_classes) - set(test_classes))[:5]
            only_val = sorted(set(test_classes) - set(train_classes))[:5]
            raise DataFormatError(
                f"ImageNet train/ and val/ have different class folders (only in train: {only_train}, "
                f"only in val: {only_val}); label indices would not match"
            )
        if len(train_classes) != self.num_classes:
            raise DataFormatError(
                f"{self.data_dir / 'train'} has {len(train_classes)} class folders but num_classes={self.num_classes}"
            )
        to_tensor = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]
        eval_transform = v2.Compose(
            [
                v2.Resize(
                    self.resize_size, interpolation=_INTERPOLATIONS[self.interpolation], antialias=True
                ),
                v2.CenterCrop(self.image_size),
                *to_tensor,
            ]
        )
        train_transform = eval_transform
        if self.augment:
            train_transform = v2.Compose(
                [v2.RandomResizedCrop(self.image_size, antialias=True), v2.RandomHorizontalFlip(), *to_tensor]
            )
        return (
            ImageFileDataset(train_samples, train_transform),
            ImageFileDataset(train_samples, eval_transform),
            ImageFileDataset(test_samples, eval_transform),
        )

    def _test_order(self, size: int) -> list[int]:
        return torch.randperm(size, generator=torch.Generator().manual_seed(0)).tolist()
