"""AdversarialClassifier: objectives learn, attacks run in eval mode, validation metrics, errors, checkpoints."""

from __future__ import annotations

import io

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from meansparse_pl.config import ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models import Normalize
from meansparse_pl.module import AdversarialClassifier

FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
GREY = ((0.2860,), (0.3530,))
TINY_CNN = {"channels": (8, 16), "hidden": 32}


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Run these tests single-threaded, then restore the setting.

    The models here are tiny, so intra-op threads buy nothing; and on a shared 2-core machine OpenMP's
    spin-waiting made 2-thread runs about 10x slower than 1-thread runs once other processes were busy.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_classifier(**overrides) -> AdversarialClassifier:
    """A few-thousand-parameter small_cnn with a Fashion-MNIST threat model (Linf 0.1)."""
    kwargs = dict(
        backbone="small_cnn",
        backbone_kwargs=dict(TINY_CNN),
        in_channels=1,
        normalization=GREY,
        threat=ThreatModel("Linf", 0.1),
        step_size=0.025,
        attack_steps=3,
        val_attack_steps=3,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
    )
    kwargs.update(overrides)
    return AdversarialClassifier(**kwargs)


@pytest.fixture(scope="module")
def fashion_batch() -> tuple[torch.Tensor, torch.Tensor]:
    dm = FashionMNISTDataModule(data_dir=FASHION_MNIST, train_subset=128, val_subset=8, test_subset=8)
    dm.setup("fit")
    x, y = next(iter(torch.utils.data.DataLoader(dm.train_dataset, batch_size=128)))
    return x, y


def tiny_datamodule(**overrides) -> FashionMNISTDataModule:
    kwargs = dict(
        data_dir=FASHION_MNIST,
        batch_size=32,
        eval_batch_size=50,
        val_size=1000,
        train_subset=64,
        val_subset=100,
        test_subset=100,
    )
    kwargs.update(overrides)
    return FashionMNISTDataModule(**kwargs)


def quiet_trainer(**overrides) -> pl.Trainer:
    kwargs = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


# ------------------------------------------------------------------------------------------- learning
@pytest.mark.parametrize("objective", ["standard", "pgd", "trades"])
def test_a_few_optimisation_steps_reduce_the_objective(objective, fashion_batch):
    """Fifteen steps on one fixed batch must lower that batch's loss (measured with the same attack seed)."""
    torch.manual_seed(0)
    module = tiny_classifier(objective=objective, trades_beta=6.0)
    optimizer = module.configure_optimizers()["optimizer"]
    x, y = fashion_batch
    module.train()

    def loss_now() -> float:
        torch.manual_seed(123)  # same random start / TRADES noise for both measurements
        return float(module.training_loss(x, y)[0].detach())

    before = loss_now()
    for step in range(15):
        torch.manual_seed(1000 + step)
        loss, _ = module.training_loss(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = loss_now()
    assert after < 0.8 * before, (objective, before, after)


def test_training_step_logs_and_returns_a_differentiable_loss(fashion_batch):
    module = tiny_classifier()
    trainer = quiet_trainer(max_steps=1)
    # training_step is called by Lightning here; the loss must backpropagate into the network.
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*fashion_batch), batch_size=64)
    trainer.fit(module, train_dataloaders=loader)
    assert trainer.global_step == 1
    assert "train/loss" in trainer.callback_metrics


# ---------------------------------------------------------------------------------- modes of the attack
class _ModeRecorder:
    """Records the train flag of a BatchNorm layer at every forward call."""

    def __init__(self, layer: nn.Module) -> None:
        self.modes: list[bool] = []
        layer.register_forward_pre_hook(lambda m, _inp: self.modes.append(m.training))


def _first_bn(module: nn.Module) -> nn.BatchNorm2d:
    return next(m for m in module.modules() if isinstance(m, nn.BatchNorm2d))


@pytest.mark.parametrize(
    ("objective", "expected"),
    [
        # PGD-3 from a random start: 3 attack forwards in eval mode, then the loss forward in train mode.
        ("pgd", [False, False, False, True]),
        # TRADES: the clean reference logits and 3 KL steps in eval mode, then clean + adversarial in train.
        ("trades", [False, False, False, False, True, True]),
        ("standard", [True]),
    ],
)
def test_attack_runs_in_eval_mode_and_train_mode_is_restored(objective, expected, fashion_batch):
    module = tiny_classifier(objective=objective, attack_steps=3)
    module.train()
    bn = _first_bn(module.model)
    recorder = _ModeRecorder(bn)
    tracked_before = int(bn.num_batches_tracked)
    x, y = fashion_batch
    module.training_loss(x, y)
    assert recorder.modes == expected
    # Only the train-mode forwards update the BatchNorm running statistics.
    assert int(bn.num_batches_tracked) - tracked_before == sum(expected)
    assert all(m.training for m in module.modules())


def test_a_deliberately_frozen_submodule_stays_frozen(fashion_batch):
    module = tiny_classifier()
    module.train()
    bn = _first_bn(module.model)
    bn.eval()
    module.training_loss(*fashion_batch)
    assert not bn.training
    assert module.model.training


# ------------------------------------------------------------------------------------------- validation
def test_validation_reports_clean_and_pgd_accuracy_and_pgd_is_lower():
    torch.manual_seed(0)
    module = tiny_classifier(random_start=False, val_attack_steps=5)
    dm = tiny_datamodule(train_subset=512)
    trainer = quiet_trainer(max_epochs=1)
    trainer.fit(module, datamodule=dm)
    (metrics,) = trainer.validate(module, datamodule=dm, verbose=False)
    assert set(metrics) >= {"val/clean_acc", "val/pgd_acc", "val/loss"}
    assert 0.3 < metrics["val/clean_acc"] <= 1.0  # 512 images of adversarial training beat chance (0.1)
    assert metrics["val/pgd_acc"] < metrics["val/clean_acc"]

    # Recompute by hand: micro accuracy over the whole validation split.
    model = module.model.eval()
    correct_clean = correct_pgd = total = 0
    for x, y in dm.val_dataloader():
        correct_clean += int((model(x).argmax(1) == y).sum())
        x_adv = module.attack(x, y, 5)
        correct_pgd += int((model(x_adv).argmax(1) == y).sum())
        total += len(y)
    assert metrics["val/clean_acc"] == pytest.approx(correct_clean / total, abs=1e-6)
    assert metrics["val/pgd_acc"] == pytest.approx(correct_pgd / total, abs=1e-6)

    (tested,) = trainer.test(module, datamodule=dm, verbose=False)
    assert set(tested) >= {"test/clean_acc", "test/pgd_acc"}


def test_validation_gives_the_same_numbers_with_and_without_inference_mode():
    """PGD needs gradients: under Trainer(inference_mode=True) the attack still runs and agrees."""
    torch.manual_seed(0)
    module = tiny_classifier(random_start=False)
    dm = tiny_datamodule()
    (without,) = quiet_trainer(inference_mode=False).validate(module, datamodule=dm, verbose=False)
    (with_inference,) = quiet_trainer(inference_mode=True).validate(module, datamodule=dm, verbose=False)
    assert without["val/pgd_acc"] == with_inference["val/pgd_acc"]
    assert without["val/clean_acc"] == with_inference["val/clean_acc"]
    assert without["val/pgd_acc"] < without["val/clean_acc"] or without["val/clean_acc"] == 0


# ------------------------------------------------------------------------------------- normalization
def test_normalization_none_is_taken_from_the_datamodule_and_checkpoints_rebuild_it(tmp_path):
    module = tiny_classifier(normalization=None)
    assert module.model is None  # built in configure_model, once the datamodule is known
    dm = tiny_datamodule()
    trainer = quiet_trainer(max_steps=1, limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=dm)
    assert module.hparams.normalization == tuple(tuple(float(v) for v in t) for t in dm.normalization)
    normalize = next(m for m in module.model.modules() if isinstance(m, Normalize))
    assert torch.allclose(normalize.mean.flatten(), torch.tensor(dm.normalization[0]))
    assert torch.allclose(normalize.std.flatten(), torch.tensor(dm.normalization[1]))

    path = tmp_path / "model.ckpt"
    trainer.save_checkpoint(path)
    loaded = AdversarialClassifier.load_from_checkpoint(path, weights_only=True)
    x = torch.rand(4, 1, 28, 28)
    module.eval()
    loaded.eval()
    assert torch.equal(module(x), loaded(x))


def test_normalization_none_without_a_datamodule_is_the_identity():
    module = tiny_classifier(normalization=None)
    trainer = quiet_trainer(max_steps=1, limit_val_batches=0)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y)))
    assert module.hparams.normalization == ((0.0,), (1.0,))


def test_hyperparameters_are_plain_types_loadable_with_weights_only():
    module = tiny_classifier(lr_milestones=[3, 5], normalization=[[0.5], [0.25]])
    buffer = io.BytesIO()
    torch.save(dict(module.hparams), buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)
    assert loaded["normalization"] == ((0.5,), (0.25,))
    assert loaded["lr_milestones"] == (3, 5)


def test_optimizer_and_schedule_follow_the_hyperparameters():
    module = tiny_classifier(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, lr_milestones=[2, 4])
    config = module.configure_optimizers()
    opt, sched = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        ({"eps": -0.1}, "eps must be"),
        ({"eps": 0.0, "objective": "trades"}, "eps must be"),
        ({"attack_steps": 0}, "attack_steps must be an integer >= 1"),
        ({"val_attack_steps": 0}, "val_attack_steps must be an integer >= 1"),
        ({"step_size": 0.0}, "step_size must be"),
        ({"backbone": "resnet_unknown"}, "unknown model 'resnet_unknown'"),
        ({"backbone": "resnet_unknown", "normalization": None}, "unknown model 'resnet_unknown'"),
        ({"objective": "mart"}, "objective must be one of"),
        ({"norm": "L1"}, "norm must be one of"),
        ({"threat": {"norm": "Linf", "eps": -0.1}}, "eps must be"),
        ({"threat": "Linf"}, "threat must be a ThreatModel"),
        ({"trades_beta": -1.0}, "trades_beta must be"),
        ({"lr": 0.0}, "lr must be"),
        ({"lr_milestones": [150, 100]}, "lr_milestones must be strictly increasing"),
        ({"normalization": ((0.5, 0.5), (0.2, 0.2))}, "normalization needs 1 means"),
        ({"backbone_kwargs": {"depth": 3}}, "does not accept depth"),
    ],
)
def test_bad_values_raise_a_one_line_configuration_error(overrides, fragment):
    with pytest.raises(ConfigurationError) as info:
        tiny_classifier(**overrides)
    message = str(info.value)
    assert fragment in message
    assert "\n" not in message


def test_the_old_norm_and_eps_arguments_and_checkpoints_that_store_them_still_load(tmp_path, caplog):
    """threat replaced norm / eps: the old arguments still build the same module (one deprecated: line), and a
    checkpoint written before, whose hyper-parameters are norm / eps, loads with its own threat model."""
    import lightning

    new = tiny_classifier()
    caplog.clear()
    old = tiny_classifier(threat=ThreatModel(), norm="Linf", eps=0.1)
    assert old.threat == new.threat == ThreatModel("Linf", 0.1) and dict(old.hparams) == dict(new.hparams)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("deprecated:")] == [
        "deprecated: AdversarialClassifier's norm / eps are now threat.norm / threat.eps (--model.threat.*) "
        "(the old name is accepted until meansparse_pl 0.3)."
    ]
    before = {k: v for k, v in new.hparams.items() if k != "threat"} | {"norm": "L2", "eps": 0.5}
    path = tmp_path / "before.ckpt"
    torch.save(
        {
            "state_dict": new.state_dict(),
            "hyper_parameters": before,
            "pytorch-lightning_version": lightning.__version__,
        },
        path,
    )
    loaded = AdversarialClassifier.load_from_checkpoint(path, weights_only=True)
    assert loaded.threat == ThreatModel("L2", 0.5) and loaded.hparams.threat == {"norm": "L2", "eps": 0.5}
    assert "norm" not in loaded.hparams and "eps" not in loaded.hparams
