"""Nothing silent about data and runs: bad data, stale state and faults, each one clear line or a right number.

The battery beside tests/test_bad_inputs.py (files and options): here the data a user's pipeline produces (NaN
pixels, 0-255 or normalised images, labels outside the model's classes, tuples out of the model, dict samples,
(N, H, W) images, float64, swapped or corrupt files), state left by an earlier run (a re-run on other data or
precision, a resume with another data order, a checkpoint rewritten meanwhile) and faults (SIGTERM and Ctrl-C
during fit, truncated Lightning checkpoints, a full disk, leftover temporary files). Every error case asserts
the error class or the CLI's exit status 2 with a last ``error:`` line and no traceback; every number case
compares with an independent computation (a fresh run, a hand count).
"""

from __future__ import annotations

import copy
import errno
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from meansparse_pl import AlphaSearch, AttackConfig, ThreatModel, calibrate, save_checkpoint, sparsify
from meansparse_pl.cli import main
from meansparse_pl.errors import DataFormatError, OutputError
from meansparse_pl.evaluation import EvaluationTask, run_tasks
from meansparse_pl.models import create_model

ROOT = Path(__file__).parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
DEMO = ROOT / "configs" / "fashion_mnist_demo.yaml"
ARCHITECTURE = {
    "name": "small_cnn",
    "kwargs": {
        "num_classes": 10,
        "in_channels": 1,
        "channels": [4, 8],
        "hidden": 16,
        "normalization": [[0.286], [0.353]],
    },
}
THREAT = ThreatModel("Linf", 0.03)
CLEAN = [EvaluationTask("clean", "clean", THREAT)]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


def _sparse_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(ARCHITECTURE["name"], **ARCHITECTURE["kwargs"]).eval()
    sparse = sparsify(model, (1, 28, 28))
    calibrate(sparse, [torch.rand(16, 1, 28, 28)], progress=False)
    return sparse


def _data(n: int = 48, seed: int = 0, classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, classes, (n,), generator=g)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "sparse.pt"
    save_checkpoint(_sparse_model(), path, architecture=ARCHITECTURE)
    return path


def _one_line(error: BaseException, *fragments: str) -> None:
    text = str(error)
    assert "\n" not in text and "; " in text, text
    for fragment in fragments:
        assert fragment in text, text


# ------------------------------------------------------------------------------------------ bad data
@pytest.mark.parametrize("batch", [0, 2])
def test_nan_pixels_are_an_error_on_every_path(batch):
    """NaN pixels in the first or a later batch: evaluation, the alpha search and calibration refuse them."""
    x, y = _data()
    x[16 * batch + 5, 0, 3, 3] = math.nan
    sparse = _sparse_model()
    with pytest.raises(DataFormatError) as error:
        run_tasks(sparse, TensorDataset(x, y), CLEAN, batch_size=16)
    _one_line(error.value, f"evaluation batch {batch}", "NaN", "clean the data")
    search = AlphaSearch(alphas=[0, 0.2], threat=THREAT, attacks=AttackConfig(names=["apgd-ce"], n_iter=2))
    with pytest.raises(DataFormatError, match="NaN"):
        search.run(sparse, TensorDataset(x, y))
    with pytest.raises(DataFormatError, match=f"calibration batch {batch}: 1 pixels are NaN"):
        calibrate(_sparse_model(), list(x.split(16)), progress=False)


class ConstantOrNaN(nn.Module):
    """Predicts class 0 for every image, with NaN logits where pixel (0, 0) is above 0.5."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10) + torch.nn.functional.one_hot(torch.zeros(x.shape[0]).long(), 10)
        logits = logits * self.scale
        marked = x.flatten(1)[:, 0] > 0.5
        return torch.where(marked[:, None], torch.full_like(logits, math.nan), logits)


def test_nan_logits_never_count_as_correct():
    """argmax reads NaN as the largest logit: NaN rows "predicted" class 0, so class-0 samples counted as robust.
    Hand count: every sample is class 0 and predicted 0, except the marked ones, which must count as wrong."""
    x, _ = _data(48)
    x[:, 0, 0, 0] = 0.1
    marked = [i for i in range(16, 48) if i % 3 == 0]
    x[marked, 0, 0, 0] = 0.9
    y = torch.zeros(48, dtype=torch.long)
    results = run_tasks(ConstantOrNaN(), TensorDataset(x, y), CLEAN, batch_size=16)["clean"]
    assert [i for i, correct in results.items() if not correct] == marked
    x[0, 0, 0, 0] = 0.9  # NaN already on the first batch: the model is broken, one clear error
    with pytest.raises(DataFormatError, match="outputs are NaN or infinite"):
        run_tasks(ConstantOrNaN(), TensorDataset(x, y), CLEAN, batch_size=16)


@pytest.mark.parametrize(
    ("labels", "fragment"),
    [
        ("ten", "span [0, 10]"),
        ("minus_one", "span [-1, 9]"),
        ("later_batch", "evaluation batch 2: 1 samples"),
    ],
)
def test_labels_outside_the_models_classes_are_an_error(labels, fragment):
    x, y = _data()
    if labels == "ten":
        y[3] = 10
    elif labels == "minus_one":
        y[0], y[1] = -1, 9
    else:
        y[40] = 12
    with pytest.raises(DataFormatError) as error:
        run_tasks(_sparse_model(), TensorDataset(x, y), CLEAN, batch_size=16)
    _one_line(error.value, fragment, "10 outputs")


def test_a_model_with_fewer_outputs_than_the_data_has_classes_is_an_error():
    torch.manual_seed(0)
    five = create_model("small_cnn", num_classes=5, in_channels=1, channels=[4, 8], hidden=16).eval()
    x, y = _data()
    with pytest.raises(DataFormatError) as error:
        run_tasks(five, TensorDataset(x, y), CLEAN, batch_size=16)
    _one_line(error.value, "5 outputs (classes 0-4)")


@pytest.mark.parametrize(
    ("scale", "fragment"),
    [(255.0, "divide the images by 255"), (-1.0, "remove Normalize")],
)
def test_calibration_refuses_0_255_and_normalised_images(scale, fragment):
    x, _ = _data(32)
    images = x * 255 if scale > 0 else (x - 0.5) / 0.25
    model = _sparse_model()
    before = [op.mean.clone() for op in model.modules() if hasattr(op, "mean") and hasattr(op, "alpha")]
    with pytest.raises(DataFormatError) as error:
        calibrate(model, list(images.split(16)), progress=False)
    _one_line(error.value, fragment)
    after = [op.mean for op in model.modules() if hasattr(op, "mean") and hasattr(op, "alpha")]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))  # statistics untouched
    with pytest.raises(DataFormatError, match=fragment):  # evaluation names the same fix
        run_tasks(model, TensorDataset(images, torch.zeros(32, dtype=torch.long)), CLEAN, batch_size=16)


class TupleNet(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.net = create_model("small_cnn", num_classes=10, in_channels=1, channels=[4, 8], hidden=16)
        self.kind = kind

    def forward(self, x):
        logits = self.net(x)
        return (logits, x.mean()) if self.kind == "tuple" else {"logits": logits, "features": x}


@pytest.mark.parametrize(
    ("kind", "fragment"), [("tuple", "returns a tuple of 2"), ("dict", "keys ['features'")]
)
def test_a_model_returning_a_tuple_or_dict_is_an_error(kind, fragment):
    x, y = _data()
    with pytest.raises(DataFormatError) as error:
        run_tasks(TupleNet(kind).eval(), TensorDataset(x, y), CLEAN, batch_size=16)
    _one_line(error.value, fragment, "wrap it")


class DictSamples(torch.utils.data.Dataset):
    def __init__(self, keys: tuple[str, str]) -> None:
        self.x, self.y = _data(32)
        self.keys = keys

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index):
        return {self.keys[0]: self.x[index], self.keys[1]: self.y[index]}


def test_dict_samples_are_read_by_their_keys_or_refused():
    sparse = _sparse_model()
    reference = run_tasks(sparse, TensorDataset(*_data(32)), CLEAN, batch_size=16)
    assert run_tasks(sparse, DictSamples(("image", "label")), CLEAN, batch_size=16) == reference
    with pytest.raises(DataFormatError) as error:
        run_tasks(sparse, DictSamples(("pixels", "target_class")), CLEAN, batch_size=16)
    _one_line(error.value, "sample 0 is a dict with keys ['pixels', 'target_class']")


def test_images_without_a_channel_axis_and_float64_images():
    sparse = _sparse_model()
    x, y = _data(32)
    with pytest.raises(DataFormatError) as error:
        run_tasks(sparse, TensorDataset(x[:, 0], y), CLEAN, batch_size=16)
    _one_line(error.value, "(N, H, W) without a channel axis", "unsqueeze(1)")
    reference = run_tasks(
        sparse, TensorDataset(x, y), [*CLEAN, EvaluationTask("pgd", "pgd", THREAT)], batch_size=16
    )
    doubled = run_tasks(
        sparse, TensorDataset(x.double(), y), [*CLEAN, EvaluationTask("pgd", "pgd", THREAT)], batch_size=16
    )
    assert doubled == reference  # converted to the model's float32, the same numbers


def test_swapped_fashion_mnist_files_are_refused(tmp_path):
    from test_data import fashion_images, write_idx

    from meansparse_pl.data import FashionMNISTDataModule

    write_idx(tmp_path / "train-images-idx3-ubyte.gz", fashion_images(12, 0))  # the test set's size
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", (np.arange(12) % 10).astype(np.uint8))
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", fashion_images(40, 100))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", (np.arange(40) % 10).astype(np.uint8))
    with pytest.raises(DataFormatError) as error:
        FashionMNISTDataModule(data_dir=str(tmp_path), val_size=4).setup()
    _one_line(error.value, "look swapped", "60,000 training and 10,000 test")


def test_a_corrupt_or_empty_image_file_names_the_file(tmp_path):
    from PIL import Image

    from meansparse_pl.data.base import ImageFileDataset

    good = tmp_path / "good.jpg"
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(good)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    empty = tmp_path / "empty.JPEG"
    empty.write_bytes(b"")
    from torchvision.transforms import v2

    to_tensor = v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])
    dataset = ImageFileDataset([(str(good), 0), (str(truncated), 1), (str(empty), 2)], to_tensor)
    assert dataset[0][0].shape == (3, 16, 16)
    for index, path in ((1, truncated), (2, empty)):
        with pytest.raises(DataFormatError) as error:
            dataset[index]
        _one_line(error.value, str(path), "replace or remove it")


# --------------------------------------------------------------------------------------- stale state
def test_a_rerun_on_other_images_of_the_same_size_is_evaluated_afresh(tmp_path):
    """Before, the state's fingerprint covered weights, tasks, count and seed, not the images: a re-run on another
    data set of the same size printed the first run's numbers and attacked nothing."""
    sparse = _sparse_model()
    tasks = [*CLEAN, EvaluationTask("pgd", "pgd", THREAT)]
    first = run_tasks(sparse, TensorDataset(*_data(seed=1)), tasks, batch_size=16, state_path=tmp_path / "s")
    other = TensorDataset(*_data(seed=2))
    again = run_tasks(sparse, other, tasks, batch_size=16, state_path=tmp_path / "s")
    assert again == run_tasks(sparse, other, tasks, batch_size=16) != first
    # the same data again: every result from the state, nothing attacked
    import meansparse_pl.evaluation as evaluation

    calls = []
    original = evaluation.run_attack
    evaluation.run_attack = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        assert run_tasks(sparse, other, tasks, batch_size=16, state_path=tmp_path / "s") == again
    finally:
        evaluation.run_attack = original
    assert calls == []


def test_a_rerun_under_another_precision_is_not_the_same_run(tmp_path):
    import lightning.pytorch as pl

    from meansparse_pl.evaluation import fingerprint_of

    sparse = _sparse_model()
    data = TensorDataset(*_data())
    assert fingerprint_of(sparse, CLEAN, data, 0, "bf16-mixed") != fingerprint_of(
        sparse, CLEAN, data, 0, "32-true"
    )
    trainers = {
        precision: pl.Trainer(
            accelerator="cpu",
            precision=precision,
            logger=False,
            inference_mode=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        for precision in ("bf16-mixed", "32-true")
    }
    run_tasks(sparse, data, CLEAN, batch_size=16, state_path=tmp_path / "s", trainer=trainers["bf16-mixed"])
    saved = torch.load(tmp_path / "s.rank0", weights_only=True)
    run_tasks(sparse, data, CLEAN, batch_size=16, state_path=tmp_path / "s", trainer=trainers["32-true"])
    assert torch.load(tmp_path / "s.rank0", weights_only=True)["fingerprint"] != saved["fingerprint"]


def test_an_interrupted_state_of_other_images_recomputes_those_batches(tmp_path):
    sparse = _sparse_model()
    x, _ = _data()
    with torch.no_grad():
        y = sparse(x).argmax(1)  # every sample correct on the original images
    run_tasks(sparse, TensorDataset(x, y), CLEAN, batch_size=16, state_path=tmp_path / "s")
    saved = torch.load(tmp_path / "s.rank0", weights_only=True)
    torch.save({**saved, "finished": False}, tmp_path / "s.rank0")  # as if it had been interrupted
    changed = x.clone()
    changed[20:32] = 1 - changed[20:32]  # the second batch's images changed meanwhile
    resumed = run_tasks(sparse, TensorDataset(changed, y), CLEAN, batch_size=16, state_path=tmp_path / "s")
    fresh = run_tasks(sparse, TensorDataset(changed, y), CLEAN, batch_size=16)
    assert resumed == fresh and not all(fresh["clean"].values())  # the stale verdicts were all True


def test_a_statistics_pass_resumed_with_another_data_order_starts_over(tmp_path):
    """postprocess stopped by SIGTERM, then started again with another data.seed (another order of the same
    images): before, the resumed pass skipped the batches "already seen" and mixed two passes (statistics 1%
    off); now it starts over and its statistics are those of one uninterrupted pass over the new order."""
    import lightning.pytorch as pl
    from conftest import FunctionalResNet, make_batches, randomize_batchnorm

    from meansparse_pl import operators, preemption
    from meansparse_pl.calibration import CalibrationModule
    from meansparse_pl.errors import Interrupted

    first_order = make_batches((3, 8, 8), 64, 8, seed=21)
    images = torch.cat(first_order)
    second_order = list(images[torch.randperm(64, generator=torch.Generator().manual_seed(5))].split(8))
    base = randomize_batchnorm(FunctionalResNet()).eval()
    reference = sparsify(copy.deepcopy(base), (3, 8, 8))
    calibrate(reference, second_order, progress=False)

    class SignalOnce(torch.utils.data.Dataset):
        sent = False

        def __init__(self, batches):
            self.batches = batches

        def __len__(self):
            return len(self.batches)

        def __getitem__(self, index):
            if index == 3 and not SignalOnce.sent:
                SignalOnce.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return self.batches[index]

    model = sparsify(copy.deepcopy(base), (3, 8, 8))

    def run(batches) -> CalibrationModule:
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        module = CalibrationModule(model, state_path=tmp_path / "statistics")
        loader = torch.utils.data.DataLoader(SignalOnce(batches), batch_size=None)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        return module

    with preemption.watching(), pytest.raises(Interrupted):
        run(first_order)
    assert (tmp_path / "statistics.rank0").exists()
    with preemption.watching():
        assert run(second_order).images == 64
    for op, ref in zip(operators(model), operators(reference), strict=True):
        torch.testing.assert_close(op.mean, ref.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(op.var, ref.var, rtol=1e-5, atol=1e-6)


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2, err[-2000:]
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), err[-2000:]
    return lines[-1]


def _corrupted(corruption: str) -> list[str]:
    return [
        "--data=custom_data.CorruptedFashionMNIST",
        f"--data.corruption={corruption}",
        f"--data.data_dir={FMNIST}",
        "--data.val_size=100",
        "--data.val_subset=24",
        "--data.test_subset=24",
        "--data.train_subset=48",
        "--data.eval_batch_size=8",
    ]


@pytest.fixture
def cli_in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    return tmp_path


@pytest.mark.parametrize(
    ("corruption", "fragment"),
    [
        ("nan", "NaN or infinite"),
        ("label_10", "span [0, 10]"),
        ("label_-1", "span [-1, 9]"),
        ("scale_255", "255"),
    ],
)
def test_cli_evaluate_refuses_bad_data_without_writing_a_report(
    corruption, fragment, checkpoint, cli_in_tmp, capsys
):
    out = cli_in_tmp / "eval"
    args = ["evaluate", *_corrupted(corruption), *QUIET, f"--checkpoint={checkpoint}", f"--output_dir={out}"]
    line = _cli_error([*args, "--attacks.names=[clean,pgd]", "--compare_base=false"], capsys)
    assert fragment in line
    assert not (out / "evaluation.json").exists()


def test_cli_postprocess_refuses_0_255_calibration_images(cli_in_tmp, capsys):
    weights = cli_in_tmp / "weights.pt"
    torch.save(create_model(ARCHITECTURE["name"], **ARCHITECTURE["kwargs"]).state_dict(), weights)
    output = cli_in_tmp / "meansparse.pt"
    line = _cli_error(
        [
            "postprocess",
            *_corrupted("scale_255"),
            *QUIET,
            "--model.backbone=small_cnn",
            "--model.backbone_kwargs={channels: [4, 8], hidden: 16}",
            f"--checkpoint={weights}",
            f"--output={output}",
        ],
        capsys,
    )
    assert "divide the images by 255" in line and not output.exists()


def test_cli_evaluate_reruns_on_other_data_into_the_same_output(checkpoint, cli_in_tmp, capsys):
    """The same output folder, the test split replaced by other images of the same size: the second report is
    that data's, equal to a fresh run's (before: the first run's numbers, 0 attacks)."""
    import json

    def evaluate(corruption: str, out: Path) -> dict:
        main(
            [
                "evaluate",
                *_corrupted(corruption),
                *QUIET,
                f"--checkpoint={checkpoint}",
                f"--output_dir={out}",
                "--attacks.names=[clean,pgd]",
                "--attacks.options={pgd: {steps: 3}}",
                "--compare_base=false",
            ]
        )
        return json.loads((out / "evaluation.json").read_text())["results"]

    first = evaluate("none", cli_in_tmp / "same")
    second = evaluate("invert", cli_in_tmp / "same")
    assert second == evaluate("invert", cli_in_tmp / "fresh") != first


def test_alpha_search_refuses_to_overwrite_a_checkpoint_rewritten_meanwhile(
    checkpoint, cli_in_tmp, capsys, monkeypatch
):
    """Another program rewrites the checkpoint while the search runs: the alpha is not written over it (before:
    the model read at the start was saved over the newer file)."""
    import shutil

    from meansparse_pl.alpha_search import AlphaSearch as Search

    target = cli_in_tmp / "sparse.pt"
    shutil.copy(checkpoint, target)
    newer = _sparse_model(seed=7)
    original = Search.run

    def run_while_rewritten(self, *args, **kwargs):
        held.append((cli_in_tmp / ".sparse.pt.lock").read_text().split()[1])  # held while the search runs
        result = original(self, *args, **kwargs)
        save_checkpoint(newer, target, architecture=ARCHITECTURE)  # what a postprocess run would write
        return result

    held = []
    monkeypatch.setattr(Search, "run", run_while_rewritten)
    written = target.read_bytes()
    line = _cli_error(
        [
            "alpha_search",
            *_corrupted("none"),
            *QUIET,
            f"--checkpoint={target}",
            f"--output_dir={cli_in_tmp / 'search'}",
            "--alphas=[0, 0.3]",
            "--attacks.names=[apgd-ce]",
            "--attacks.options={apgd-ce: {n_iter: 2}}",
        ],
        capsys,
    )
    assert "was rewritten by another program" in line and held == [str(os.getpid())]
    assert target.read_bytes() != written  # the other writer's file, untouched by the search
    assert (cli_in_tmp / "search" / "alpha_search.json").exists()


def test_a_checkpoint_held_by_a_running_alpha_search_is_not_rewritten(checkpoint, cli_in_tmp, capsys):
    import shutil

    target = cli_in_tmp / "sparse.pt"
    shutil.copy(checkpoint, target)
    (cli_in_tmp / ".sparse.pt.lock").write_text(f"{os.uname().nodename} 1")  # process 1 always runs
    weights = cli_in_tmp / "weights.pt"
    torch.save(create_model(ARCHITECTURE["name"], **ARCHITECTURE["kwargs"]).state_dict(), weights)
    line = _cli_error(
        [
            "postprocess",
            *_corrupted("none"),
            *QUIET,
            "--model.backbone=small_cnn",
            "--model.backbone_kwargs={channels: [4, 8], hidden: 16}",
            f"--checkpoint={weights}",
            f"--output={target}",
        ],
        capsys,
    )
    assert "in use by another run" in line and target.read_bytes() == checkpoint.read_bytes()


# -------------------------------------------------------------------------------------------- faults
def _fit_command(tmp_path: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "cli.py"),
        "fit",
        "--config",
        str(DEMO),
        "--data.init_args.train_subset=256",
        "--data.init_args.val_subset=50",
        "--data.init_args.batch_size=32",
        "--data.init_args.eval_batch_size=50",
        "--model.attack_steps=1",
        "--model.val_attack_steps=1",
        "--trainer.max_epochs=3",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={tmp_path}",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--trainer.callbacks.init_args.dirpath={tmp_path / 'checkpoints'}",
        *extra,
    ]


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT"])
def test_a_signal_during_fit_stops_with_128_plus_signal_and_no_stale_meansparse_checkpoint(name, tmp_path):
    """A real signal to the fitting process in its second epoch (after last.ckpt of the first was written):
    exit status 128 + signal (before: 0 for SIGTERM, so `set -e` scripts went on), one `stopped:` line naming
    the checkpoint to resume from, and the earlier run's meansparse.pt moved aside (before: left in place,
    so the next step used it as if it were this run's)."""
    stale = tmp_path / "meansparse.pt"
    stale.write_bytes(b"an earlier run's checkpoint")
    callbacks = [
        "--trainer.callbacks+=custom_data.SignalAtStep",
        "--trainer.callbacks.init_args.step=10",
        f"--trainer.callbacks.init_args.signal={name}",
    ]
    done = subprocess.run(
        _fit_command(tmp_path, *callbacks),
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}", "OMP_NUM_THREADS": "1"},
        # a test run started in the background of a shell inherits SIGINT ignored, which Python then keeps: the
        # fit would never see the Ctrl-C this test sends; a user's terminal gives the default disposition
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    number = getattr(signal, name)
    assert done.returncode == 128 + number, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped: fit stopped on {name}; no MeanSparse checkpoint was written; resume"), (
        last
    )
    assert str(tmp_path / "checkpoints" / "last.ckpt") in last and "Traceback" not in done.stderr
    assert not stale.exists()
    assert (tmp_path / "meansparse.pt.previous").read_bytes() == b"an earlier run's checkpoint"


def test_lightning_checkpoints_are_written_beside_their_final_name_and_truncated_ones_are_one_line(
    tmp_path, capsys, monkeypatch
):
    from meansparse_pl.lightning_runs import AtomicCheckpointIO

    writer = AtomicCheckpointIO()
    target = tmp_path / "checkpoints" / "last.ckpt"
    writer.save_checkpoint({"state_dict": {"w": torch.ones(3)}, "epoch": 1}, target)
    whole = target.read_bytes()
    seen_dirs = []
    real_mkstemp = __import__("tempfile").mkstemp

    def recording_mkstemp(*args, **kwargs):
        seen_dirs.append(Path(kwargs["dir"]))
        return real_mkstemp(*args, **kwargs)

    monkeypatch.setattr("meansparse_pl.io.tempfile.mkstemp", recording_mkstemp)

    def dies_mid_write(obj, handle, *args, **kwargs):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt  # SIGINT mid-write: the temporary file is removed, the old file stays

    monkeypatch.setattr("meansparse_pl.io.torch.save", dies_mid_write)
    with pytest.raises(KeyboardInterrupt):
        writer.save_checkpoint({"state_dict": {"w": torch.zeros(3)}}, target)
    monkeypatch.undo()
    assert seen_dirs == [target.parent] and target.read_bytes() == whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(whole[: len(whole) // 2])
    monkeypatch.setattr(sys, "argv", ["cli.py"])
    monkeypatch.chdir(tmp_path)
    line = _cli_error(
        [
            "fit",
            "--config",
            str(DEMO),
            "--data.init_args.train_subset=64",
            "--data.init_args.val_subset=50",
            "--trainer.max_epochs=1",
            *QUIET,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks=[]",
            f"--ckpt_path={truncated}",
        ],
        capsys,
    )
    assert f"{truncated} is truncated or not a Lightning checkpoint" in line


def test_a_full_disk_leaves_the_earlier_report_pair_intact(tmp_path, monkeypatch):
    """ENOSPC while the second file of a report is written: neither file is replaced (before: a new .md beside
    an old .json) and no temporary file is left."""
    from meansparse_pl.io import write_report

    class Result:
        def __init__(self, number: int) -> None:
            self.number = number

        def table(self) -> str:
            return f"| {self.number} |"

        def to_json(self) -> dict:
            return {"number": self.number}

    write_report(tmp_path, "evaluation", Result(1))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    real_fsync = os.fsync
    calls = []

    def full_on_second(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr("meansparse_pl.io.os.fsync", full_on_second)
    with pytest.raises(OutputError) as error:
        write_report(tmp_path, "evaluation", Result(2))
    _one_line(
        error.value,
        str(tmp_path / "evaluation.json"),
        "No space left on device",
        "earlier evaluation.json is unchanged",
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tmp_path):
    """A real failed write (the file-size limit of a subprocess stands in for a full disk, EFBIG for ENOSPC):
    one OutputError naming the path, the earlier checkpoint intact, no temporary file left."""
    script = f"""
import resource, signal, sys, torch
sys.path.insert(0, {str(ROOT / "tests")!r})
from test_bad_data import _sparse_model, ARCHITECTURE
from meansparse_pl import save_checkpoint
from meansparse_pl.errors import OutputError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
model = _sparse_model()
save_checkpoint(model, {str(tmp_path / "m.pt")!r}, architecture=ARCHITECTURE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
try:
    save_checkpoint(model, {str(tmp_path / "m.pt")!r}, architecture=ARCHITECTURE)
except OutputError as error:
    print("OutputError:", error)
"""
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-2000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"OutputError: cannot write {tmp_path / 'm.pt'}") and "unchanged" in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]
    torch.load(tmp_path / "m.pt", weights_only=True)  # the earlier, complete checkpoint


def test_leftover_temporary_files_are_cleaned_at_the_next_start(checkpoint, cli_in_tmp, capsys):
    out = cli_in_tmp / "eval"
    out.mkdir()
    leftover = out / ".evaluation.json.x8k2a1.tmp"
    leftover.write_bytes(b"half a report")
    main(
        [
            "evaluate",
            *_corrupted("none"),
            *QUIET,
            f"--checkpoint={checkpoint}",
            f"--output_dir={out}",
            "--attacks.names=[clean]",
            "--compare_base=false",
        ]
    )
    assert not leftover.exists() and (out / "evaluation.json").exists()


# -------------------------------------------------------------------------- tracebacks, now one line
def test_a_missing_accelerator_is_one_line(checkpoint, cli_in_tmp, capsys):
    # an accelerator this machine lacks: a GPU where there is none (the case reported), else Apple's MPS
    missing = "mps" if torch.cuda.is_available() else "gpu"
    line = _cli_error(
        [
            "evaluate",
            *_corrupted("none"),
            *QUIET,
            f"--checkpoint={checkpoint}",
            f"--trainer.accelerator={missing}",
        ],
        capsys,
    )
    assert missing in line.lower() and "use --trainer.accelerator=cpu" in line


def test_limit_predict_batches_in_evaluate_is_refused_before_attacking(checkpoint, cli_in_tmp, capsys):
    line = _cli_error(
        [
            "evaluate",
            *_corrupted("none"),
            *QUIET,
            f"--checkpoint={checkpoint}",
            "--trainer.limit_predict_batches=0.5",
        ],
        capsys,
    )
    assert "limit_predict_batches is 0.5" in line and "limit_samples" in line


@pytest.mark.parametrize(
    ("subcommand", "option"),
    [("alpha_search", "--alphas=[0, 0.1, 0.1000001]"), ("evaluate", "--extra_eps=[0.1000001]")],
)
def test_near_duplicate_alphas_or_eps_are_refused_before_loading(
    subcommand, option, checkpoint, cli_in_tmp, capsys
):
    args = [subcommand, *_corrupted("none"), *QUIET, f"--checkpoint={checkpoint}", option]
    if subcommand == "evaluate":
        args.append("--threat.eps=0.1")
    line = _cli_error(args, capsys)
    assert "same to 6 significant digits (0.1)" in line


def test_a_type_error_in_an_option_is_two_short_lines(checkpoint, cli_in_tmp):
    done = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "evaluate", f"--checkpoint={checkpoint}", "--batch_size=abc"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cli_in_tmp,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) <= 3, done.stderr
    assert lines[-1] == "error: Parser key \"batch_size\": Expected a <class 'int'>. Got value: abc"
