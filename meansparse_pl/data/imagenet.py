"""ImageNet-1k from an ImageFolder tree."""

from __future__ import annotations

from typing import Literal

import torch
from torch.utils.data import Dataset
from torchvision.transforms import v2

from meansparse_pl.data.base import (
    ImageClassificationDataModule,
    ImageFileDataset,
    check_optional_count,
    common_args,
    document_common_args,
)
from meansparse_pl.errors import ConfigurationError, DataFormatError, DataNotFoundError

# ---- ImageNet ------------------------------------------------------------------------------------------


_INTERPOLATIONS = {"bilinear": v2.InterpolationMode.BILINEAR, "bicubic": v2.InterpolationMode.BICUBIC}


class ImageNetDataModule(ImageClassificationDataModule):
    """ImageNet-1k from an ImageFolder tree: ``data_dir/train/<wnid>/*.JPEG`` and ``data_dir/val/<wnid>/*``.

    The held-out validation split is carved from ``train/``; ``val/`` (the official validation set, the
    usual ImageNet "test" set) is the test split, in a fixed permuted order (see the module docstring).
    """

    dataset_name = "ImageNet"

    @document_common_args
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
        super().__init__(**common_args(locals()), download=False)
        for name, value in (
            ("image_size", image_size),
            ("resize_size", resize_size),
            ("num_classes", num_classes),
        ):
            check_optional_count(name, value)
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
