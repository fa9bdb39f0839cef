"""Data modules: file formats written byte for byte into tmp_path, splits, subsets, transforms, errors,
and the real Fashion-MNIST installed by Debian's dataset-fashion-mnist package."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from meansparse_pl.data import (
    CIFAR10DataModule,
    CIFAR100DataModule,
    DataFormatError,
    FashionMNISTDataModule,
    ImageNetDataModule,
    read_idx,
)
from meansparse_pl.errors import ConfigurationError, DataNotFoundError
from meansparse_pl.models import create_model

REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

# ---- writers of the exact on-disk formats ------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: 0x0000, type 0x08 (ubyte), ndim, big-endian uint32 sizes, raw bytes; gzip-compressed."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as handle:
        handle.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def fashion_images(count: int, offset: int) -> np.ndarray:
    """Random 28x28 images whose pixel (0, 0) is a unique id, so any image can be traced to its index."""
    rng = np.random.default_rng(offset)
    images = rng.integers(0, 256, size=(count, 28, 28), dtype=np.uint8)
    images[:, 0, 0] = np.arange(offset, offset + count)
    return images


@pytest.fixture
def fashion_dir(tmp_path: Path) -> Path:
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", fashion_images(40, 0))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(40) % 10).astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fashion_images(12, 100))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (np.arange(12) % 10).astype(np.uint8)[::-1].copy())
    return tmp_path


def image_ids(batches) -> list[int]:
    """Ids (pixel (0, 0) * 255) of every image a loader yields, in order."""
    return [round(v * 255) for x, _ in batches for v in x[:, 0, 0, 0].tolist()]


def write_cifar_batch(path: Path, images_hwc: np.ndarray, labels: dict[str, list[int]]) -> None:
    """A CIFAR python batch as the originals are: protocol 2, data rows = R plane, G plane, B plane, and the
    numpy.core module name of the numpy that wrote them (numpy 2 writes numpy._core)."""
    rows = images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), -1)
    entry = {
        "batch_label": "testing batch",
        "data": rows,
        "filenames": [f"{i}.png" for i in range(len(rows))],
    }
    entry.update(labels)
    payload = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
    path.write_bytes(payload)


def cifar_images(count: int, offset: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + offset)
    images = rng.integers(0, 256, size=(count, 32, 32, 3), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(offset, offset + count)  # red channel of pixel (0, 0) = id
    return images


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for batch in range(5):
        images = cifar_images(6, 6 * batch)
        write_cifar_batch(
            folder / f"data_batch_{batch + 1}", images, {"labels": [(6 * batch + i) % 10 for i in range(6)]}
        )
    write_cifar_batch(folder / "test_batch", cifar_images(8, 200), {"labels": [i % 10 for i in range(8)]})
    meta = {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": 6, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return tmp_path


@pytest.fixture
def cifar100_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    fine = [(7 * i) % 100 for i in range(30)]
    write_cifar_batch(
        folder / "train", cifar_images(30, 0), {"fine_labels": fine, "coarse_labels": [f // 5 for f in fine]}
    )
    write_cifar_batch(
        folder / "test",
        cifar_images(10, 200),
        {"fine_labels": list(range(90, 100)), "coarse_labels": [18] * 10},
    )
    return tmp_path


# ---- Fashion-MNIST (tiny files) ----------------------------------------------------------------------


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 3, 4), dtype=np.uint8)
    write_idx(tmp_path / "a.gz", array)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), array)


def test_fashion_mnist_tensors_and_splits(fashion_dir: Path) -> None:
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), batch_size=8, val_size=10, seed=3)
    dm.setup("fit")
    assert (dm.num_classes, dm.input_shape) == (10, (1, 28, 28))
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0

    train_ids = image_ids(dm.train_dataloader())
    val_ids = image_ids(dm.val_dataloader())
    test_ids = image_ids(dm.test_dataloader())
    assert len(train_ids) == 30 and len(val_ids) == 10
    assert set(train_ids).isdisjoint(val_ids)
    assert set(train_ids) | set(val_ids) == set(range(40))
    assert test_ids == list(range(100, 112))  # the test split keeps the file order and is never carved up

    # Calibration = training split, no augmentation, unshuffled: the exact file pixels, in a fixed order.
    raw = fashion_images(40, 0)
    calibration_x, calibration_y = zip(*[(x, y) for x, y in dm.calibration_dataloader()], strict=True)
    calibration_x, calibration_y = torch.cat(calibration_x), torch.cat(calibration_y)
    order = dm.calibration_dataset.indices
    assert sorted(order) == sorted(train_ids)
    torch.testing.assert_close(calibration_x, torch.from_numpy(raw[order]).float().unsqueeze(1) / 255.0)
    assert calibration_y.tolist() == [i % 10 for i in order]
    assert image_ids(dm.calibration_dataloader()) == order  # not shuffled: same order twice
    # Validation images are the file's images too (no augmentation).
    val_x = torch.cat([x for x, _ in dm.val_dataloader()])
    torch.testing.assert_close(
        val_x, torch.from_numpy(raw[dm.val_dataset.indices]).float().unsqueeze(1) / 255.0
    )


def test_splits_are_deterministic_given_the_seed(fashion_dir: Path) -> None:
    def split(seed: int) -> tuple[list[int], list[int]]:
        dm = FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=10, seed=seed)
        dm.setup()
        return dm.train_dataset.indices, dm.val_dataset.indices

    assert split(0) == split(0)
    assert split(0)[1] != split(1)[1]
    for seed in (0, 1):
        train, val = split(seed)
        assert set(train).isdisjoint(val) and sorted(train + val) == list(range(40))


def test_subsets_take_the_first_images_of_each_split(fashion_dir: Path) -> None:
    full = FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=10)
    full.setup()
    dm = FashionMNISTDataModule(
        data_dir=str(fashion_dir), val_size=10, train_subset=7, val_subset=3, test_subset=5
    )
    dm.setup()
    assert dm.train_dataset.indices == full.train_dataset.indices[:7]
    assert dm.val_dataset.indices == full.val_dataset.indices[:3]
    assert dm.test_dataset.indices == [0, 1, 2, 3, 4]
    assert dm.calibration_dataset.indices == full.train_dataset.indices[:7]  # follows train_subset by default
    own = FashionMNISTDataModule(
        data_dir=str(fashion_dir), val_size=10, train_subset=7, calibration_subset=12
    )
    own.setup()
    assert own.calibration_dataset.indices == full.train_dataset.indices[:12]
    with pytest.raises(ConfigurationError, match="test_subset=13"):
        FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=10, test_subset=13).setup()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"batch_size": 0},
        {"batch_size": None},
        {"val_size": -1},
        {"train_subset": 0},
        {"num_workers": -2},
        {"eval_batch_size": 0},
    ],
)
def test_bad_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigurationError):
        FashionMNISTDataModule(**kwargs)


def test_val_size_must_leave_training_images(fashion_dir: Path) -> None:
    with pytest.raises(ConfigurationError, match="val_size=40"):
        FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=40).setup()


def test_fashion_mnist_augmentation_is_crop_and_flip_of_the_original(fashion_dir: Path) -> None:
    torch.manual_seed(0)
    dm = FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=10, augment=True)
    dm.setup()
    raw = torch.from_numpy(fashion_images(40, 0)).float() / 255.0
    changed = 0
    for position, index in enumerate(dm.train_dataset.indices[:10]):
        augmented = dm.train_dataset[position][0][0]
        padded = F.pad(raw[index], (2, 2, 2, 2))
        candidates = [padded[i : i + 28, j : j + 28] for i in range(5) for j in range(5)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(augmented, c) for c in candidates)
        changed += not torch.equal(augmented, raw[index])
        # The calibration view of the same image is untouched.
        assert torch.equal(dm.calibration_dataset[position][0][0], raw[index])
    assert changed > 0


def test_fashion_mnist_torchvision_download_layout(tmp_path: Path, fashion_dir: Path) -> None:
    raw = tmp_path / "root" / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for path in fashion_dir.glob("*.gz"):
        (raw / path.name).write_bytes(path.read_bytes())
    dm = FashionMNISTDataModule(data_dir=str(tmp_path / "root"), val_size=10)
    dm.setup()
    assert len(dm.train_dataset) == 30


def test_fashion_mnist_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        FashionMNISTDataModule(data_dir=str(tmp_path)).setup()
    message = str(info.value)
    assert "\n" not in message
    assert str(tmp_path) in message
    assert "train-images-idx3-ubyte.gz" in message and "t10k-labels-idx1-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message and "download: true" in message


def test_fashion_mnist_bad_magic(fashion_dir: Path) -> None:
    write_idx(fashion_dir / "train-labels-idx1-ubyte.gz", np.zeros(40, dtype=np.uint8))
    with gzip.open(fashion_dir / "train-labels-idx1-ubyte.gz", "rb") as handle:
        data = bytearray(handle.read())
    data[2] = 0x0D  # float type code instead of ubyte
    with gzip.open(fashion_dir / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(bytes(data))
    with pytest.raises(DataFormatError, match="magic number 00000d01"):
        FashionMNISTDataModule(data_dir=str(fashion_dir)).setup()


def test_fashion_mnist_truncated_payload(fashion_dir: Path) -> None:
    path = fashion_dir / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "rb") as handle:
        data = handle.read()
    with gzip.open(path, "wb") as handle:
        handle.write(data[:-100])
    with pytest.raises(DataFormatError, match="truncated"):
        FashionMNISTDataModule(data_dir=str(fashion_dir)).setup()


def test_fashion_mnist_truncated_gzip_stream(fashion_dir: Path) -> None:
    path = fashion_dir / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DataFormatError, match="not a readable gzip"):
        FashionMNISTDataModule(data_dir=str(fashion_dir), val_size=10).setup()


def test_fashion_mnist_label_count_mismatch(fashion_dir: Path) -> None:
    write_idx(fashion_dir / "train-labels-idx1-ubyte.gz", np.zeros(39, dtype=np.uint8))
    with pytest.raises(DataFormatError, match="39"):
        FashionMNISTDataModule(data_dir=str(fashion_dir)).setup()


def test_datamodule_drives_a_lightning_fit(fashion_dir: Path) -> None:
    """The loaders plug into Trainer.fit/test, with and without a validation split."""

    class Classifier(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = create_model("small_cnn", in_channels=1, channels=(4, 8), hidden=8)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def validation_step(self, batch, batch_idx):
            x, y = batch
            self.log("val_loss", F.cross_entropy(self.model(x), y))

        def test_step(self, batch, batch_idx):
            x, y = batch
            self.log("test_acc", (self.model(x).argmax(1) == y).float().mean())

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    for val_size in (10, 0):
        dm = FashionMNISTDataModule(data_dir=str(fashion_dir), batch_size=8, val_size=val_size)
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.fit(Classifier(), datamodule=dm)
        results = trainer.test(Classifier(), datamodule=dm, verbose=False)
        assert 0.0 <= results[0]["test_acc"] <= 1.0
    assert dm.hparams["val_size"] == 0


# ---- Fashion-MNIST (the real files) --------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_fashion() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(val_size=5000)  # default data_dir: where dataset-fashion-mnist installs it
    dm.setup()
    return dm


def test_real_fashion_mnist_sizes_and_label_counts(real_fashion: FashionMNISTDataModule) -> None:
    pool = real_fashion.train_dataset.dataset
    assert pool.images.shape == (60000, 1, 28, 28)
    assert torch.bincount(pool.labels).tolist() == [6000] * 10
    test = real_fashion.test_dataset.dataset
    assert len(real_fashion.test_dataset) == 10000
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    assert len(real_fashion.train_dataset) == 55000 and len(real_fashion.val_dataset) == 5000
    assert set(real_fashion.train_dataset.indices).isdisjoint(real_fashion.val_dataset.indices)


def test_real_fashion_mnist_values_and_normalization(real_fashion: FashionMNISTDataModule) -> None:
    x, y = next(iter(real_fashion.test_dataloader()))
    assert x.shape == (128, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    pixels = real_fashion.train_dataset.dataset.images.double() / 255.0
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    (mean,), (std,) = real_fashion.normalization
    assert pixels.mean().item() == pytest.approx(mean, abs=5e-4)
    assert pixels.std().item() == pytest.approx(std, abs=5e-4)


def test_real_fashion_mnist_first_labels() -> None:
    # Independent of our parser: the label file's first bytes after the 8-byte header, read with gzip only.
    with gzip.open(REAL_FASHION_MNIST / "t10k-labels-idx1-ubyte.gz", "rb") as handle:
        header = handle.read(8)
        first = list(handle.read(10))
    assert struct.unpack(">II", header) == (2049, 10000)
    assert first == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]  # the well-known first Fashion-MNIST test labels
    dm = FashionMNISTDataModule(test_subset=10, val_size=0)
    dm.setup()
    assert [int(dm.test_dataset[i][1]) for i in range(10)] == first


# ---- CIFAR ---------------------------------------------------------------------------------------------


def test_cifar10_reads_the_pickled_batches(cifar10_dir: Path) -> None:
    dm = CIFAR10DataModule(data_dir=str(cifar10_dir), val_size=6, batch_size=4, augment=False)
    dm.setup()
    assert (dm.num_classes, dm.input_shape) == (10, (3, 32, 32))
    raw = np.concatenate([cifar_images(6, 6 * b) for b in range(5)])
    pool = dm.calibration_dataset.dataset
    assert len(pool) == 30
    for index in (0, 7, 29):
        x, y = pool[index]
        # CHW float of the HWC image we wrote: checks the R/G/B plane layout of the rows.
        torch.testing.assert_close(x, torch.from_numpy(raw[index]).permute(2, 0, 1).float() / 255.0)
        assert y.item() == index % 10
    train_ids, val_ids = image_ids(dm.train_dataloader()), image_ids(dm.val_dataloader())
    assert len(train_ids) == 24 and len(val_ids) == 6 and set(train_ids).isdisjoint(val_ids)
    assert image_ids(dm.test_dataloader()) == list(range(200, 208))


def test_cifar10_matches_torchvision_reader(cifar10_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Our reader and torchvision's agree on the same files (torchvision's md5 check patched out for the
    tiny files, which is exactly why our data module reads them itself)."""
    import torchvision.datasets.cifar as tv_cifar

    monkeypatch.setattr(tv_cifar, "check_integrity", lambda *args, **kwargs: True)
    reference = tv_cifar.CIFAR10(str(cifar10_dir), train=True, download=False)
    dm = CIFAR10DataModule(data_dir=str(cifar10_dir), val_size=6, augment=False)
    dm.setup()
    pool = dm.calibration_dataset.dataset
    assert torch.equal(pool.images, torch.from_numpy(reference.data).permute(0, 3, 1, 2))
    assert pool.labels.tolist() == reference.targets


def test_cifar10_augmentation_is_crop_and_flip(cifar10_dir: Path) -> None:
    torch.manual_seed(0)
    dm = CIFAR10DataModule(data_dir=str(cifar10_dir), val_size=6)  # augment defaults to True for CIFAR
    dm.setup()
    raw = (
        torch.from_numpy(np.concatenate([cifar_images(6, 6 * b) for b in range(5)])).permute(0, 3, 1, 2)
        / 255.0
    )
    changed = 0
    for position, index in enumerate(dm.train_dataset.indices[:8]):
        augmented = dm.train_dataset[position][0]
        padded = F.pad(raw[index], (4, 4, 4, 4))
        candidates = [padded[:, i : i + 32, j : j + 32] for i in range(9) for j in range(9)]
        candidates += [c.flip(-1) for c in candidates]
        assert any(torch.equal(augmented, c) for c in candidates)
        changed += not torch.equal(augmented, raw[index])
    assert changed > 0


def test_cifar100_fine_labels(cifar100_dir: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(cifar100_dir), val_size=5, augment=False)
    dm.setup()
    assert dm.num_classes == 100
    pool = dm.calibration_dataset.dataset
    assert pool.labels.tolist() == [(7 * i) % 100 for i in range(30)]
    assert [int(y) for _, y in dm.test_dataset] == list(range(90, 100))
    assert len(dm.train_dataset) == 25 and len(dm.val_dataset) == 5


def test_cifar_missing_files(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        CIFAR10DataModule(data_dir=str(tmp_path)).setup()
    message = str(info.value)
    assert (
        "\n" not in message
        and str(tmp_path / "cifar-10-batches-py") in message
        and "download: true" in message
    )


def test_cifar_refuses_pickles_that_run_code(cifar10_dir: Path) -> None:
    marker = cifar10_dir / "pwned"

    class RunsCode:
        def __reduce__(self):
            import os

            return os.system, (f"touch {marker}",)

    (cifar10_dir / "cifar-10-batches-py" / "data_batch_3").write_bytes(
        pickle.dumps({"data": RunsCode()}, protocol=2)
    )
    with pytest.raises(DataFormatError, match="refusing"):
        CIFAR10DataModule(data_dir=str(cifar10_dir)).setup()
    assert not marker.exists()


def test_cifar_wrong_shape(cifar10_dir: Path) -> None:
    images = np.zeros((6, 16, 16, 3), dtype=np.uint8)
    write_cifar_batch(cifar10_dir / "cifar-10-batches-py" / "data_batch_2", images, {"labels": [0] * 6})
    with pytest.raises(DataFormatError, match="3072"):
        CIFAR10DataModule(data_dir=str(cifar10_dir)).setup()


# ---- ImageNet (ImageFolder tree) ---------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850"]


def image_array(seed: int, height: int = 40, width: int = 48) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


@pytest.fixture
def imagenet_dir(tmp_path: Path) -> Path:
    for c, wnid in enumerate(WNIDS):
        (tmp_path / "train" / wnid).mkdir(parents=True)
        (tmp_path / "val" / wnid).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(image_array(10 * c + i)).save(tmp_path / "train" / wnid / f"{wnid}_{i}.png")
        for i in range(2):
            Image.fromarray(image_array(100 + 10 * c + i)).save(tmp_path / "val" / wnid / f"val_{c}_{i}.JPEG")
    return tmp_path


def test_imagenet_folder_tree(imagenet_dir: Path) -> None:
    dm = ImageNetDataModule(
        data_dir=str(imagenet_dir), val_size=4, image_size=16, resize_size=20, num_classes=3
    )
    dm.setup()
    assert dm.input_shape == (3, 16, 16) and dm.num_classes == 3
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (14, 3, 16, 16) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min() >= 0.0 and x.max() <= 1.0
    train, val = dm.train_dataset.indices, dm.val_dataset.indices
    assert len(train) == 14 and len(val) == 4 and sorted(train + val) == list(range(18))
    # Labels are the sorted class-folder indices, in train and test alike.
    pool = dm.calibration_dataset.dataset
    assert all(label == WNIDS.index(Path(path).parent.name) for path, label in pool.samples)
    test_labels = [int(y) for _, y in dm.test_dataset]
    assert sorted(test_labels) == [0, 0, 1, 1, 2, 2]
    # The test split is a fixed permutation of val/ (independent of the split seed).
    other = ImageNetDataModule(data_dir=str(imagenet_dir), val_size=4, seed=5, image_size=16, resize_size=20,
                               num_classes=3)  # fmt: skip
    other.setup()
    assert other.test_dataset.indices == dm.test_dataset.indices
    assert sorted(dm.test_dataset.indices) == list(range(6)) and dm.test_dataset.indices != list(range(6))
    assert other.val_dataset.indices != dm.val_dataset.indices


def test_imagenet_eval_transform_is_resize_then_centre_crop(imagenet_dir: Path) -> None:
    dm = ImageNetDataModule(
        data_dir=str(imagenet_dir), val_size=4, image_size=16, resize_size=20, num_classes=3
    )
    dm.setup()
    pool = dm.calibration_dataset.dataset
    path, _ = pool.samples[0]
    # Independent reference with PIL: shorter side (40) -> 20, so 48x40 -> 24x20, then a centred 16x16 crop.
    reference = Image.open(path).convert("RGB").resize((24, 20), Image.BILINEAR).crop((4, 2, 20, 18))
    expected = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255.0
    torch.testing.assert_close(pool[0][0], expected, atol=1.5 / 255, rtol=0)
    # RobustBench's BicubicRes256Crop224 for Liu2023 ConvNeXt / Swin: the same with bicubic resampling
    bicubic = ImageNetDataModule(
        data_dir=str(imagenet_dir), val_size=4, image_size=16, resize_size=20, num_classes=3,
        interpolation="bicubic",
    )  # fmt: skip
    bicubic.setup()
    reference = Image.open(path).convert("RGB").resize((24, 20), Image.BICUBIC).crop((4, 2, 20, 18))
    expected_bicubic = torch.from_numpy(np.array(reference)).permute(2, 0, 1).float() / 255.0
    got = bicubic.calibration_dataset.dataset[0][0]
    torch.testing.assert_close(got, expected_bicubic, atol=1.5 / 255, rtol=0)
    assert not torch.allclose(expected_bicubic, expected, atol=1.5 / 255)  # the two modes differ here
    with pytest.raises(ConfigurationError, match="interpolation must be one of bilinear, bicubic"):
        ImageNetDataModule(data_dir=str(imagenet_dir), interpolation="nearest")


def test_imagenet_errors(imagenet_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(DataNotFoundError, match="train"):
        ImageNetDataModule(data_dir=str(empty), num_classes=3).setup()
    with pytest.raises(DataFormatError, match="num_classes=1000"):
        ImageNetDataModule(data_dir=str(imagenet_dir), val_size=4).setup()
    (imagenet_dir / "val" / WNIDS[2]).rename(imagenet_dir / "val" / "n99999999")
    with pytest.raises(DataFormatError, match="different class folders"):
        ImageNetDataModule(data_dir=str(imagenet_dir), val_size=4, num_classes=3).setup()
    with pytest.raises(ConfigurationError, match="resize_size"):
        ImageNetDataModule(image_size=224, resize_size=200)
