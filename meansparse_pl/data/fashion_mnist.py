"""Fashion-MNIST (Xiao et al., 2017) from its four gzip IDX files."""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

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


# ---- Fashion-MNIST ----------------------------------------------------------------------------------------

FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}


class FashionMNISTDataModule(ImageClassificationDataModule):
    """Fashion-MNIST (Xiao et al., 2017): 28x28 grey images of 10 clothing classes, 60000 train / 10000 test.

    Reads the four gzip IDX files directly from ``data_dir`` (Debian's ``dataset-fashion-mnist`` package
    installs them in /usr/share/datasets/fashion-mnist), or from ``data_dir/FashionMNIST/raw`` where
    torchvision's downloader puts them.
    """

    dataset_name = "Fashion-MNIST"
    CLASSES: tuple[str, ...] = (
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    )  # fmt: skip

    @document_common_args
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
        super().__init__(**common_args(locals()))
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
        if len(train_images) < len(test_images):  # Fashion-MNIST: 60,000 training and 10,000 test images
            raise DataFormatError(
                f"{paths['train_images']} holds {len(train_images)} images and {paths['test_images']} holds "
                f"{len(test_images)}: fewer training than test images, so the train-* and t10k-* files look swapped "
                "(Fashion-MNIST has 60,000 training and 10,000 test images); give each file its own name."
            )
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
