"""Ordinary Lightning habits with the MeanSparseCallback, end to end: a network kept at another attribute than
``.model``, a datamodule of the user's own, ``trainer.test(ckpt_path="best")`` and ``fit(ckpt_path="last")``
after the callback inserted its operators, EarlyStopping + ModelCheckpoint under bf16-mixed, and a broken
setup refused before the first training step."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from meansparse_pl import MeanSparseCallback, operators
from meansparse_pl.errors import ConfigurationError


class OwnModule(pl.LightningModule):
    """A user's own LightningModule: the network at ``self.<where>`` (``net`` by default), plain cross-entropy
    training."""

    def __init__(self, where: str = "net") -> None:
        super().__init__()
        torch.manual_seed(0)
        network = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 12 * 12, 10)
        )
        setattr(self, where, network)
        self.where = where
        self.steps = 0

    @property
    def network(self) -> nn.Module:
        return getattr(self, self.where)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.network(x)

    def training_step(self, batch, batch_idx):
        self.steps += 1
        x, y = batch
        return F.cross_entropy(self.network(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_acc", (self.network(x).argmax(1) == y).float().mean())

    def test_step(self, batch, batch_idx):
        x, y = batch
        self.log("test_acc", (self.network(x).argmax(1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class OwnData(pl.LightningDataModule):
    """Random 12x12 images; ``with_calibration`` adds the calibration_dataloader() the callback uses by default."""

    def __init__(self, with_calibration: bool = True) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.rand(64, 1, 12, 12, generator=g), torch.randint(0, 10, (64,), generator=g)
        if with_calibration:
            self.calibration_dataloader = lambda: DataLoader(TensorDataset(self.x, self.y), batch_size=16)

    def train_dataloader(self):
        return DataLoader(TensorDataset(self.x, self.y), batch_size=16, shuffle=True)

    def val_dataloader(self):
        return DataLoader(TensorDataset(self.x[:32], self.y[:32]), batch_size=16)

    def test_dataloader(self):
        return DataLoader(TensorDataset(self.x[32:], self.y[32:]), batch_size=16)


def _trainer(tmp_path, callbacks, **kwargs) -> pl.Trainer:
    return pl.Trainer(
        accelerator="cpu",
        max_epochs=kwargs.pop("max_epochs", 2),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=callbacks,
        **kwargs,
    )


@pytest.mark.parametrize(
    ("callback", "data", "fragment"),
    [
        ({}, {}, "OwnModule.model, which is missing; give attribute= the name"),
        (
            {"attribute": "net"},
            {"with_calibration": False},
            "needs a datamodule with calibration_dataloader()",
        ),
    ],
)
def test_a_broken_setup_is_refused_before_the_first_training_step(callback, data, fragment, tmp_path):
    module = OwnModule()
    with pytest.raises(ConfigurationError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        _trainer(tmp_path, [MeanSparseCallback(**callback)]).fit(module, OwnData(**data))
    assert module.steps == 0  # before: the error came after all of training


def test_the_network_at_another_attribute_and_train_dataloader_data(tmp_path):
    module = OwnModule()
    callback = MeanSparseCallback(attribute="net", data="train", output_path=str(tmp_path / "ms.pt"))
    _trainer(tmp_path, [callback], max_epochs=1).fit(module, OwnData(with_calibration=False))
    assert len(operators(module.net)) == 1 and operators(module.net)[0].is_calibrated
    assert callback.summary["images"] == 64


@pytest.mark.parametrize("where", ["model", "net"])
def test_test_best_and_resume_last_after_the_callback_under_bf16_mixed_with_early_stopping(where, tmp_path):
    """After fit with the callback, the module holds operators its Lightning checkpoints (written during
    training) lack: before, test(ckpt_path="best") and fit(ckpt_path="last") raised Missing key(s)
    "model.meansparse_0.mean"."""
    module, data = OwnModule(where), OwnData()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_acc", mode="max", save_last=True)
    stopping = EarlyStopping(monitor="val_acc", mode="max", patience=1)
    options = {} if where == "model" else {"attribute": where}
    callback = MeanSparseCallback(output_path=str(tmp_path / "ms.pt"), **options)
    trainer = _trainer(tmp_path, [callback, checkpoints, stopping], precision="bf16-mixed", max_epochs=6)
    trainer.fit(module, data)
    sparse_ops = operators(module.network)
    assert len(sparse_ops) == 1 and sparse_ops[0].is_calibrated
    statistics = sparse_ops[0].mean.clone()
    # the sparsified model itself, then the "best" weights (the ones the callback calibrated) loaded into it
    direct = trainer.test(module, data, verbose=False)[0]["test_acc"]
    from_best = trainer.test(module, data, ckpt_path="best", verbose=False)[0]["test_acc"]
    assert from_best == direct
    assert torch.equal(operators(module.network)[0].mean, statistics)  # kept, not reset
    # resume the same module from last.ckpt for one more epoch: trains, recalibrates at its end
    again = MeanSparseCallback(output_path=str(tmp_path / "ms2.pt"), **options)
    resumed = _trainer(tmp_path, [again], max_epochs=trainer.current_epoch + 1)
    resumed.fit(module, data, ckpt_path=str(checkpoints.last_model_path))
    assert (tmp_path / "ms2.pt").is_file() and operators(module.network)[0].is_calibrated


# ---------------------------------------------------------------------------------------- the CLI
FMNIST_SMALL = [
    "--data=meansparse_pl.data.FashionMNISTDataModule",
    "--data.data_dir=/usr/share/datasets/fashion-mnist",
    "--data.val_size=100",
    "--data.val_subset=32",
    "--data.test_subset=32",
    "--data.train_subset=64",
    "--data.batch_size=32",
    "--data.eval_batch_size=32",
]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


@pytest.fixture
def cli_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.argv", ["cli.py"])
    return tmp_path


def _tiny_net_lightning_checkpoint(path, attribute: str) -> dict:
    """A Lightning checkpoint of a module that keeps a TinyNet at ``self.<attribute>``."""
    from custom_networks import TinyNet

    torch.manual_seed(3)
    state = TinyNet().state_dict()
    torch.save(
        {
            "state_dict": {f"{attribute}.{k}": v for k, v in state.items()},
            "pytorch-lightning_version": "2.6.6",
        },
        path,
    )
    return state


def test_fit_takes_network_like_every_subcommand(cli_in_tmp):
    """Before: `fit --network` was "unrecognized" although the README says every subcommand takes it."""
    from meansparse_pl.cli import main

    cli = main(
        [
            "fit",
            *FMNIST_SMALL,
            *QUIET,
            "--network=custom_networks.TinyNet",
            "--network.init_args.width=4",
            "--model.attack_steps=1",
            "--model.val_attack_steps=1",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={cli_in_tmp}",
        ]
    )
    assert type(cli.model.model).__name__ == "TinyNet" and cli.model.model.conv1.out_channels == 4
    assert cli.trainer.state.finished


def test_validate_and_test_take_a_meansparse_checkpoint(cli_in_tmp):
    """Before: `validate --ckpt_path meansparse.pt` ended in KeyError: 'pytorch-lightning_version'. Now the
    MeanSparse model is validated; its clean accuracy equals a hand count on the same split."""
    from meansparse_pl.cli import main
    from meansparse_pl.data import FashionMNISTDataModule

    weights = cli_in_tmp / "weights.ckpt"
    _tiny_net_lightning_checkpoint(weights, "model")
    sparse_path = cli_in_tmp / "meansparse.pt"
    common = [*FMNIST_SMALL, *QUIET, "--network=custom_networks.TinyNet"]
    main(["postprocess", *common, f"--checkpoint={weights}", f"--output={sparse_path}", "--alpha=0.3"])
    cli = main(["validate", *common, f"--ckpt_path={sparse_path}", "--model.val_attack_steps=1"])
    clean = cli.trainer.callback_metrics["val/clean_acc"].item()
    data = FashionMNISTDataModule(val_size=100, val_subset=32, train_subset=64, eval_batch_size=32)
    data.setup("fit")
    x, y = next(iter(data.val_dataloader()))
    model = cli.model.model.eval()
    assert len(operators(model)) == 3 and abs(operators(model)[0].alpha_value - 0.3) < 1e-7
    with torch.no_grad():
        assert clean == pytest.approx((model(x).argmax(1) == y).float().mean().item())
    cli = main(["test", *common, f"--ckpt_path={sparse_path}", "--model.val_attack_steps=1"])
    assert "test/clean_acc" in cli.trainer.callback_metrics


def test_postprocess_reads_a_lightning_checkpoint_whose_network_is_not_at_model(cli_in_tmp):
    """Before: the hard-coded ``model.`` prefix made a checkpoint of a module keeping its network at
    ``self.net`` unloadable, and the error blamed --network."""
    from meansparse_pl import load_checkpoint
    from meansparse_pl.cli import main

    checkpoint = cli_in_tmp / "own.ckpt"
    state = _tiny_net_lightning_checkpoint(checkpoint, "net")
    output = cli_in_tmp / "meansparse.pt"
    main(
        [
            "postprocess",
            *FMNIST_SMALL,
            *QUIET,
            "--network=custom_networks.TinyNet",
            f"--checkpoint={checkpoint}",
            f"--output={output}",
        ]
    )
    from custom_networks import TinyNet

    sparse = load_checkpoint(output, TinyNet())
    loaded = sparse.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
