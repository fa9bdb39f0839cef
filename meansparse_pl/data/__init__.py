"""Lightning data modules for Fashion-MNIST, CIFAR-10, CIFAR-100 and ImageNet (one dataset family per module;
the shared split and loader logic in :mod:`.base`)."""

from meansparse_pl.data.base import (
    ImageClassificationDataModule,
    TensorImageDataset,
    first_samples,
    split_samples,
)
from meansparse_pl.data.cifar import CIFAR10DataModule, CIFAR100DataModule
from meansparse_pl.data.fashion_mnist import FASHION_MNIST_FILES, FashionMNISTDataModule, read_idx
from meansparse_pl.data.imagenet import ImageNetDataModule
from meansparse_pl.errors import DataFormatError

__all__ = [
    "FASHION_MNIST_FILES",
    "CIFAR10DataModule",
    "CIFAR100DataModule",
    "DataFormatError",
    "FashionMNISTDataModule",
    "ImageClassificationDataModule",
    "ImageNetDataModule",
    "TensorImageDataset",
    "first_samples",
    "split_samples",
    "read_idx",
]
