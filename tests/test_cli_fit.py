"""The CLI end to end: fit from the demo config, checkpoints that load back, configs, errors, and DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from meansparse_pl.callback import MeanSparseCallback
from meansparse_pl.cli import MeanSparseCLI, main
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.module import AdversarialClassifier
from meansparse_pl.ops import operators

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "configs" / "fashion_mnist_demo.yaml"
CIFAR_CONFIGS = sorted((ROOT / "configs" / "cifar10").glob("*.yaml"))
FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
ACTIVATIONS = ("relu", "elu", "gelu", "silu", "psilu", "pssilu")


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


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch):
    """LightningCLI warns when it gets ``args`` while ``sys.argv`` holds pytest's own arguments."""
    monkeypatch.setattr(sys, "argv", ["cli.py"])


def tiny_demo_args(tmp_path: Path) -> list[str]:
    """The demo config shrunk to seconds: 256 training images, one epoch, 100 validation images."""
    return [
        "--config",
        str(DEMO),
        "--data.init_args.train_subset=256",
        "--data.init_args.val_subset=100",
        "--data.init_args.eval_batch_size=50",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path / 'checkpoints'}",
    ]


# -------------------------------------------------------------------------------------------------- fit
def test_fit_writes_checkpoints_that_load_back_with_identical_logits(tmp_path):
    cli = main(["fit", *tiny_demo_args(tmp_path)])
    checkpoints = tmp_path / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert callback.monitor == "val/pgd_acc" and callback.mode == "max"
    assert Path(callback.best_model_path).is_file()
    assert 0.0 <= float(callback.best_model_score) <= 1.0
    assert {"val/clean_acc", "val/pgd_acc", "train/loss_epoch"} <= set(cli.trainer.callback_metrics)

    # The datamodule's facts were linked into the model.
    assert cli.model.hparams.in_channels == 1
    assert cli.model.hparams.normalization == cli.datamodule.normalization

    loaded = AdversarialClassifier.load_from_checkpoint(checkpoints / "last.ckpt", weights_only=True)
    # The demo config's MeanSparseCallback replaced the fitted network by its sparsified copy at fit end
    # (alpha 0, so the same function) and saved it beside the run.
    assert operators(cli.model.model) and not operators(loaded.model)
    assert (tmp_path / "meansparse.pt").is_file()
    x = torch.rand(16, 1, 28, 28)
    cli.model.eval()
    loaded.eval()
    assert torch.equal(loaded(x), cli.model(x))
    assert dict(loaded.hparams) == dict(cli.model.hparams)

    # The run's config was saved next to the logs, so the run can be repeated.
    assert list(tmp_path.rglob("config.yaml"))


def test_two_fits_of_the_demo_config_give_identical_weights(tmp_path):
    """The demo is reproducible on a given machine: the same seed, the seeded shuffling of the training split,
    deterministic algorithms (the config's trainer.deterministic) and a fixed thread count give the same
    weights and the same MeanSparse statistics, bit for bit."""
    states = []
    for run in ("first", "second"):
        main(["fit", *tiny_demo_args(tmp_path / run), "--trainer.limit_train_batches=2"])
        payload = torch.load(tmp_path / run / "meansparse.pt", weights_only=True)
        states.append(payload["state_dict"])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert any(k.endswith("meansparse_0.var") for k in states[0])  # the statistics are compared too


def test_validate_and_test_subcommands_run_from_a_checkpoint(tmp_path):
    main(["fit", *tiny_demo_args(tmp_path)])
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    for subcommand, prefix in (("validate", "val/"), ("test", "test/")):
        cli = main(
            [
                subcommand,
                *tiny_demo_args(tmp_path),
                "--data.init_args.test_subset=100",
                f"--ckpt_path={ckpt}",
            ]
        )
        assert {f"{prefix}clean_acc", f"{prefix}pgd_acc"} <= set(cli.trainer.callback_metrics)


def test_print_config_shows_the_model_and_selection_rule(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(DEMO), "--print_config"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "backbone: small_cnn" in out
    assert "monitor: val/pgd_acc" in out
    assert "inference_mode: false" in out


# ---------------------------------------------------------------------------------------------- configs
def _instantiate(config: Path, tmp_path: Path) -> MeanSparseCLI:
    return MeanSparseCLI(
        args=["--config", str(config), f"--trainer.default_root_dir={tmp_path}"],
        run=False,
    )


def test_the_cifar10_ablation_configs_are_all_there():
    names = {p.stem for p in CIFAR_CONFIGS}
    expected = {f"resnet18_{act}_pgd" for act in ACTIVATIONS}
    expected |= {"resnet18_gelu_trades", "resnet18_gelu_standard"}
    assert names == expected


@pytest.mark.parametrize("config", CIFAR_CONFIGS, ids=lambda p: p.stem)
def test_cifar10_configs_have_the_paper_settings(config, tmp_path):
    cli = _instantiate(config, tmp_path)
    hp = cli.model.hparams
    objective = config.stem.split("_")[-1]
    assert hp.backbone == "resnet18"
    assert hp.backbone_kwargs["activation"] == config.stem.split("_")[1]
    assert hp.objective == objective
    assert (hp.threat["norm"], hp.threat["eps"], hp.step_size) == ("Linf", pytest.approx(8 / 255), 0.0078)
    assert hp.attack_steps == 10 and hp.val_attack_steps == 10
    assert (hp.optimizer, hp.lr, hp.momentum, hp.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert hp.lr_milestones == (100, 150) and hp.lr_gamma == 0.1
    if objective == "trades":
        assert hp.trades_beta == 0.6  # paper A.5
    assert cli.trainer.max_epochs == 200
    assert cli.datamodule.batch_size == 256
    assert (hp.num_classes, hp.in_channels) == (10, 3)
    assert hp.normalization == cli.datamodule.normalization
    (checkpoint,) = [c for c in cli.trainer.callbacks if isinstance(c, ModelCheckpoint)]
    assert checkpoint.save_last and checkpoint.mode == "max"
    assert checkpoint.monitor == ("val/clean_acc" if objective == "standard" else "val/pgd_acc")
    assert checkpoint.dirpath is None  # Lightning puts it under the logger's folder, inside default_root_dir
    assert any(isinstance(c, MeanSparseCallback) for c in cli.trainer.callbacks)
    assert not cli.trainer.validate_loop.inference_mode


def test_demo_config_instantiates_with_linked_data_facts(tmp_path):
    cli = _instantiate(DEMO, tmp_path)
    hp = cli.model.hparams
    assert (hp.backbone, hp.objective, hp.threat) == ("small_cnn", "pgd", {"norm": "Linf", "eps": 0.1})
    assert (hp.num_classes, hp.in_channels) == (10, 1)
    assert hp.normalization == cli.datamodule.normalization


# ----------------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("--model.threat.eps=-0.1", "eps must be > 0, got -0.1"),
        ("--model.attack_steps=0", "attack_steps must be an integer >= 1"),
        ("--model.backbone=resnet_unknown", "unknown model 'resnet_unknown'"),
    ],
)
def test_bad_config_values_exit_2_with_one_error_line(override, fragment, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", *tiny_demo_args(tmp_path), override])
    assert info.value.code == 2
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and fragment in err_lines[0]


def test_launcher_prints_no_traceback_for_a_bad_value(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "fit", *tiny_demo_args(tmp_path), "--model.threat.eps=0"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: eps must be > 0, got 0")


# -------------------------------------------------------------------------------------------------- DDP
DDP_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    import lightning.pytorch as pl
    from meansparse_pl.data import FashionMNISTDataModule
    from meansparse_pl.module import AdversarialClassifier

    torch.set_num_threads(1)
    out = sys.argv[1]
    kwargs = json.loads(sys.argv[2])
    dm_kwargs = json.loads(sys.argv[3])
    pl.seed_everything(0)
    model = AdversarialClassifier(**kwargs)
    dm = FashionMNISTDataModule(**dm_kwargs)
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        inference_mode=False,
    )
    trainer.fit(model, datamodule=dm)
    after_fit = {k: float(v) for k, v in trainer.callback_metrics.items() if k.endswith("_acc")}
    (validated,) = trainer.validate(model, datamodule=dm, verbose=False)
    trainer.save_checkpoint(out + "/ddp.ckpt")  # collective: every rank calls it, rank 0 writes
    # Each rank saw its own half of the validation set (no DistributedSampler padding: 200 = 2 x 100).
    seen = sum(len(y) for _, y in trainer.val_dataloaders)
    checksum = sum(float(p.double().sum()) for p in model.parameters())
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as f:
        json.dump({"world_size": trainer.world_size, "after_fit": after_fit, "validated": validated,
                   "seen": seen, "checksum": checksum}, f)
    """
)


def test_two_process_ddp_metrics_equal_a_single_process_validate(tmp_path):
    model_kwargs = {
        "backbone": "small_cnn",
        "backbone_kwargs": {"channels": [8, 16], "hidden": 32},
        "in_channels": 1,
        "normalization": [[0.2860], [0.3530]],
        "eps": 0.1,
        "step_size": 0.025,
        "attack_steps": 2,
        "val_attack_steps": 3,
        "random_start": False,  # deterministic PGD, so both runs attack exactly the same points
        "optimizer": "adam",
        "lr": 3e-3,
        "weight_decay": 0.0,
    }
    dm_kwargs = {
        "data_dir": FASHION_MNIST,
        "batch_size": 32,
        "eval_batch_size": 50,
        "val_size": 1000,
        "train_subset": 128,
        "val_subset": 200,  # even, so DistributedSampler adds no duplicate samples
    }
    script = tmp_path / "ddp_fit.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path), json.dumps(model_kwargs), json.dumps(dm_kwargs)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["seen"] == ranks[1]["seen"] == 100
    assert ranks[0]["checksum"] == ranks[1]["checksum"]  # DDP kept the replicas identical
    # The reduced metrics are the same on both ranks and equal after fit and in validate().
    assert ranks[0]["validated"] == ranks[1]["validated"]
    ddp = ranks[0]["validated"]
    for key in ("val/clean_acc", "val/pgd_acc"):
        assert ranks[0]["after_fit"][key] == ddp[key]

    loaded = AdversarialClassifier.load_from_checkpoint(tmp_path / "ddp.ckpt", weights_only=True)
    single = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
    )
    (reference,) = single.validate(loaded, datamodule=FashionMNISTDataModule(**dm_kwargs), verbose=False)
    assert reference["val/clean_acc"] == ddp["val/clean_acc"]
    assert reference["val/pgd_acc"] == ddp["val/pgd_acc"]
    assert reference["val/pgd_acc"] < reference["val/clean_acc"]


@pytest.mark.parametrize("stem", ["resnet18_gelu_trades", "resnet18_pssilu_pgd"])
def test_cifar10_config_trains_and_postprocesses_end_to_end(stem, tmp_path, monkeypatch):
    """A paper ablation config, unchanged except for size: two TRADES / PGD-10 steps of the real ResNet-18 on
    CIFAR-10 files written in torchvision's format, then `postprocess` of its best checkpoint. Alpha 0 must
    reproduce the trained network's logits exactly."""
    from test_data import cifar_images, write_cifar_batch

    from meansparse_pl.checkpoint import load_checkpoint

    folder = tmp_path / "data" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for batch in range(5):
        write_cifar_batch(
            folder / f"data_batch_{batch + 1}", cifar_images(8, 8 * batch), {"labels": [0, 1, 2, 3] * 2}
        )
    write_cifar_batch(folder / "test_batch", cifar_images(8, 100), {"labels": [0, 1, 2, 3] * 2})
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "elsewhere"  # every output of the config follows default_root_dir
    size = [
        f"--data.init_args.data_dir={tmp_path / 'data'}",
        "--data.init_args.batch_size=8",
        "--data.init_args.eval_batch_size=8",
        "--data.init_args.val_size=8",
        "--data.init_args.num_workers=0",
    ]
    config = ROOT / "configs" / "cifar10" / f"{stem}.yaml"
    main(["fit", "--config", str(config), *size, "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", "--trainer.limit_val_batches=1",
          "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}"])  # fmt: skip
    assert not (tmp_path / "runs").exists()
    best = next(root.rglob("best-*.ckpt"))
    assert (root / "meansparse.pt").is_file()  # the config's MeanSparseCallback, at fit end
    assert next(root.rglob("metrics.csv")).is_file()
    output = tmp_path / "meansparse.pt"
    main(["postprocess", "--config", str(config), *size, f"--checkpoint={best}", f"--output={output}",
          "--trainer.limit_predict_batches=2", "--trainer.enable_progress_bar=false",
          f"--trainer.default_root_dir={root}"])  # fmt: skip
    sparse = load_checkpoint(output).eval()
    trained = AdversarialClassifier.load_from_checkpoint(best, weights_only=True).model.eval()
    assert len(operators(sparse)) == 17  # torchvision-style ResNet-18: every activation call site
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(sparse(x), trained(x))
