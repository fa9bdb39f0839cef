"""Every bad input is one clear error: a battery of hostile, corrupt, mis-shaped and out-of-range inputs through
the Python API and the command line.

Each API case asserts the error class (a MeanSparseError subclass), that the message is one line, names the
problem and, after a "; ", the fix. Each CLI case asserts exit status 2, a last stderr line starting with
"error:", and no traceback. Hostile files must not run their code: their payload would create a marker file.
"""

from __future__ import annotations

import functools
import os
import pickle
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from meansparse_pl import (
    AttackConfig,
    ThreatModel,
    calibrate,
    load_checkpoint,
    run_attack,
    save_checkpoint,
    set_alpha,
    sparsify,
)
from meansparse_pl.calibration import CalibrationModule
from meansparse_pl.cli import main
from meansparse_pl.data import CIFAR10DataModule, FashionMNISTDataModule
from meansparse_pl.errors import (
    CheckpointError,
    ConfigurationError,
    DataFormatError,
    MeanSparseError,
    OutputError,
    PlacementError,
)
from meansparse_pl.io import LOCK_NAME, safe_load
from meansparse_pl.models import create_model
from meansparse_pl.module import AdversarialClassifier

ROOT = Path(__file__).parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
ARCHITECTURE = {
    "name": "small_cnn",
    "kwargs": {
        "num_classes": 10,
        "in_channels": 1,
        "channels": [8, 16],
        "hidden": 32,
        "normalization": [[0.286], [0.353]],
    },
}


class Hostile:
    """A pickle whose loading would create a marker file (arbitrary code execution)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A small sparsified, calibrated Fashion-MNIST model (untrained: the errors, not the accuracy, matter)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "sparse.pt"
    model = create_model(ARCHITECTURE["name"], **ARCHITECTURE["kwargs"]).eval()
    sparse = sparsify(model, (1, 28, 28))
    calibrate(sparse, [torch.rand(16, 1, 28, 28)], progress=False)
    save_checkpoint(sparse, path, architecture=ARCHITECTURE)
    return path


def _edited(checkpoint: Path, tmp_path: Path, edit) -> Path:
    """A copy of ``checkpoint`` with ``edit(payload)`` applied."""
    payload = torch.load(checkpoint, weights_only=True)
    edit(payload)
    out = tmp_path / "edited.pt"
    torch.save(payload, out)
    return out


def _first_op_key(payload, buffer: str) -> str:
    return next(k for k in payload["state_dict"] if k.endswith(f"meansparse_0.{buffer}"))


def _set(buffer: str, value: float):
    def edit(payload) -> None:
        key = _first_op_key(payload, buffer)
        tensor = payload["state_dict"][key]
        if tensor.dim():
            tensor[0] = value
        else:
            payload["state_dict"][key] = torch.tensor(value, dtype=tensor.dtype)

    return edit


def _record(**changes):
    def edit(payload) -> None:
        payload["meansparse"].update(changes)

    return edit


def _architecture(**kwargs):
    def edit(payload) -> None:
        payload["meansparse"]["architecture"] = {
            "name": "small_cnn",
            "kwargs": {**ARCHITECTURE["kwargs"], **kwargs},
        }

    return edit


def _site_field(field: str, value):
    def edit(payload) -> None:
        payload["meansparse"]["placement"]["sites"][0][field] = value

    return edit


def _state_entry(key: str, value):
    def edit(payload) -> None:
        payload["state_dict"][key] = value

    return edit


FILE_CASES = {
    # silent wrong answers before: statistics and alpha read from a file are checked
    "mean-nan": (_set("mean", float("nan")), "NaN or Inf"),
    "var-inf": (_set("var", float("inf")), "NaN or Inf"),
    "var-negative": (_set("var", -1.0), "negative variance"),
    "alpha-nan": (_set("alpha", float("nan")), "not a finite number >= 0"),
    "alpha-negative": (_set("alpha", -0.3), "not a finite number >= 0"),
    "count-negative": (_set("count", -5), "negative element count"),
    "calibrated-without-count": (_set("count", 0), "marked calibrated have no element count"),
    # the record, field by field
    "record-alpha-text": (_record(alpha="0.2"), "record's alpha"),
    "record-calibrated-text": (_record(calibrated="yes"), "'calibrated' flag"),
    "placement-not-a-dict": (_record(placement="fx"), "placement record is a str"),
    "placement-site-bad-type": (_site_field("num_channels", "16"), "num_channels must be a int"),
    "placement-site-bad-kind": (_site_field("kind", "everywhere"), "unknown site kind"),
    "architecture-not-a-dict": (_record(architecture=["small_cnn"]), "architecture record is a list"),
    "architecture-unknown-name": (
        _record(architecture={"name": "resnet_9000", "kwargs": {}}),
        "unknown model",
    ),
    "architecture-bad-kwargs": (_architecture(depth=3), "cannot be built"),
    # a file controls no allocation: 1e9 hidden units would be 6 TB, 1e5 still 600 MB
    "architecture-huge": (_architecture(hidden=1_000_000_000), "needs"),
    "architecture-large": (_architecture(hidden=100_000), "needs"),
    "state-entry-not-a-tensor": (_state_entry("backbone.fc2.bias", [0.0] * 10), "not tensors"),
    "state-entry-wrong-shape": (_state_entry("backbone.fc2.bias", torch.zeros(7)), "of another shape"),
    "state-entry-missing": (lambda p: p["state_dict"].pop("backbone.fc2.bias"), "missing"),
}


@pytest.mark.parametrize("case", sorted(FILE_CASES))
def test_a_bad_checkpoint_field_is_one_clear_error(case, checkpoint, tmp_path):
    edit, fragment = FILE_CASES[case]
    path = _edited(checkpoint, tmp_path, edit)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_one_clear_line(info.value, fragment)
    # nothing close to the recorded sizes was allocated (ru_maxrss: the process's peak, in KiB)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 * 1024


def _hostile(path: Path, marker: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(1)}, "meansparse": Hostile(marker)}, path)


RAW_FILES = {
    "truncated": lambda p, m: p.write_bytes(_valid_bytes()[:100]),
    "random": lambda p, m: p.write_bytes(np.random.default_rng(0).bytes(4096)),
    "empty": lambda p, m: p.write_bytes(b""),
    "foreign-list": lambda p, m: torch.save([torch.zeros(3)], p),
    "plain-state-dict": lambda p, m: torch.save({"weight": torch.zeros(3)}, p),
    "hostile-pickle": _hostile,
    "hostile-plain-pickle": lambda p, m: p.write_bytes(pickle.dumps(Hostile(m))),
}


def _valid_bytes() -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save({"state_dict": {"w": torch.zeros(100)}}, buffer)
    return buffer.getvalue()


@pytest.mark.parametrize("case", sorted(RAW_FILES))
def test_unreadable_foreign_and_hostile_files_are_refused_without_running_code(case, tmp_path):
    path, marker = tmp_path / "file.pt", tmp_path / "code-ran"
    RAW_FILES[case](path, marker)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    _assert_one_clear_line(info.value, str(path))
    assert not marker.exists()


def test_a_hostile_cifar_batch_runs_no_code(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "code-ran"
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        (folder / name).write_bytes(pickle.dumps(Hostile(marker), protocol=2))
    with pytest.raises(DataFormatError) as info:
        CIFAR10DataModule(tmp_path, val_size=10).setup()
    _assert_one_clear_line(info.value, "data_batch_1")
    assert not marker.exists()


def _sparse_model():
    torch.manual_seed(0)
    model = create_model(ARCHITECTURE["name"], **ARCHITECTURE["kwargs"]).eval()
    sparse = sparsify(model, (1, 28, 28))
    calibrate(sparse, [torch.rand(8, 1, 28, 28)], progress=False)
    return sparse


API_CASES = {
    "set-alpha-text": (
        lambda: set_alpha(_sparse_model(), "0.2"),
        ConfigurationError,
        "alpha must be a finite number",
    ),
    "set-alpha-bool": (
        lambda: set_alpha(_sparse_model(), True),
        ConfigurationError,
        "alpha must be a finite number",
    ),
    "linf-eps-5": (
        lambda: ThreatModel("Linf", 5.0),
        ConfigurationError,
        "larger than the [0, 1] pixel range",
    ),
    "run-attack-eps-5": (
        lambda: run_attack(
            "apgd-ce", _sparse_model(), torch.rand(2, 1, 28, 28), torch.zeros(2, dtype=torch.long), eps=5.0
        ),
        ConfigurationError,
        "larger than the [0, 1] pixel range",
    ),
    "attack-unknown": (lambda: _check_attacks(["bogus"]), ConfigurationError, "unknown attack 'bogus'"),
    "attack-option-unknown": (
        lambda: _check_attacks(["apgd-ce"], options={"apgd-ce": {"steps": 3}}),
        ConfigurationError,
        "does not take option(s) steps",
    ),
    "sparsify-wrong-example": (
        lambda: sparsify(create_model("small_cnn", in_channels=1), (3, 32, 32)),
        PlacementError,
        "example input of shape (1, 3, 32, 32)",
    ),
    "calibrate-wrong-channels": (
        lambda: calibrate(_sparse_model(), [torch.rand(4, 3, 28, 28)], progress=False),
        ConfigurationError,
        "shape (3, 28, 28) but the model's operators were placed for (1, 28, 28)",
    ),
    "calibrate-wrong-size": (
        lambda: calibrate(_sparse_model(), [torch.rand(4, 1, 32, 32)], progress=False),
        ConfigurationError,
        "shape (1, 32, 32)",
    ),
    "calibrate-module-wrong-size": (
        lambda: _calibrate_in_lightning(torch.rand(4, 1, 32, 32)),
        ConfigurationError,
        "shape (1, 32, 32)",
    ),
    "load-into-another-architecture": (
        lambda: load_checkpoint(_saved(), create_model("resnet18")),
        CheckpointError,
        "cannot rebuild the operators",
    ),
    "save-to-a-directory": (
        lambda: save_checkpoint(_sparse_model(), _scratch()),
        OutputError,
        "is a directory",
    ),
    "save-under-a-file": (
        lambda: save_checkpoint(_sparse_model(), _scratch() / "a-file" / "model.pt"),
        OutputError,
        "cannot write",
    ),
}


def _check_attacks(names, **kwargs):
    from meansparse_pl.attacks import check_attack_config

    check_attack_config(AttackConfig(names=names, **kwargs))


def _calibrate_in_lightning(images: torch.Tensor) -> None:
    import lightning.pytorch as pl

    trainer = pl.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=len(images))
    trainer.predict(CalibrationModule(_sparse_model()), dataloaders=loader, return_predictions=False)


_SCRATCH: list[Path] = []


def _scratch() -> Path:
    return _SCRATCH[-1]


def _saved() -> Path:
    path = _scratch() / "saved.pt"
    save_checkpoint(_sparse_model(), path, architecture=ARCHITECTURE)
    return path


@pytest.mark.parametrize("case", sorted(API_CASES))
def test_a_bad_api_input_is_one_clear_error(case, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    _SCRATCH.append(tmp_path)
    action, error, fragment = API_CASES[case]
    with pytest.raises(error) as info:
        action()
    _assert_one_clear_line(info.value, fragment)


def test_an_unusual_linf_radius_is_a_warning():
    with pytest.warns(UserWarning, match="above the usual range"):
        ThreatModel("Linf", 0.6)


def _assert_one_clear_line(error: BaseException, fragment: str) -> None:
    assert isinstance(error, MeanSparseError), type(error)
    message = str(error)
    assert "\n" not in message, message
    assert fragment in message, message
    assert "; " in message, f"no fix named after the problem: {message}"


# ------------------------------------------------------------------------------------------------ CLI
DATA = [
    "--data=meansparse_pl.data.FashionMNISTDataModule",
    f"--data.data_dir={FMNIST}",
    "--data.val_size=100",
    "--data.val_subset=16",
    "--data.test_subset=16",
    "--data.eval_batch_size=16",
]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


@pytest.fixture
def nothing_loaded(monkeypatch):
    """Records whether the CLI built a model or read data: a refused argument must be refused before either."""
    loaded: list[str] = []
    model_init, data_setup = AdversarialClassifier.__init__, FashionMNISTDataModule.setup

    @functools.wraps(model_init)  # keeps the signature LightningCLI builds the model's options from
    def init(self, *args, **kwargs):
        loaded.append("model")
        model_init(self, *args, **kwargs)

    @functools.wraps(data_setup)
    def setup(self, *args, **kwargs):
        loaded.append("data")
        data_setup(self, *args, **kwargs)

    monkeypatch.setattr(AdversarialClassifier, "__init__", init)
    monkeypatch.setattr(FashionMNISTDataModule, "setup", setup)
    return loaded


CLI_CASES = {
    "evaluate-batch-size-0": (["evaluate", "--batch_size=0"], "batch_size must be an integer >= 1"),
    "evaluate-batch-size-negative": (["evaluate", "--batch_size=-4"], "batch_size must be an integer >= 1"),
    "evaluate-unknown-attack": (["evaluate", "--attacks.names=[clean, bogus]"], "unknown attack 'bogus'"),
    "evaluate-linf-eps-5": (["evaluate", "--threat.eps=5.0"], "larger than the [0, 1] pixel range"),
    "evaluate-eps-0": (["evaluate", "--threat.eps=0"], "eps must be > 0"),
    "evaluate-extra-eps-negative": (["evaluate", "--extra_eps=[-0.1]"], "eps must be > 0"),
    "evaluate-histogram-site-negative": (["evaluate", "--histogram_site=-1"], "histogram_site"),
    "evaluate-limit-0": (["evaluate", "--limit_samples=0"], "limit_samples must be an integer >= 1"),
    "evaluate-alpha-negative": (["evaluate", "--alpha=-1"], "alpha must be a finite number >= 0"),
    "evaluate-missing-checkpoint": (
        ["evaluate", "--checkpoint=missing.pt"],
        "no checkpoint file at missing.pt",
    ),
    "alpha-search-negative-alpha": (
        ["alpha_search", "--alphas=[0, -0.1]"],
        "alpha must be a finite number >= 0",
    ),
    "alpha-search-option-of-another-attack": (
        ["alpha_search", "--attacks.options={'pgd': {'steps': 3}}", "--attacks.names=[apgd-ce]"],
        "not an attack that runs",
    ),
    "alpha-search-batch-size-0": (["alpha_search", "--batch_size=0"], "batch_size must be an integer >= 1"),
    "alpha-search-clean-drop-negative": (
        ["alpha_search", "--max_clean_drop=-1"],
        "max_clean_drop must be >= 0",
    ),
    "postprocess-unknown-preset": (
        ["postprocess", "--placement.preset=everything"],
        "unknown placement preset",
    ),
    "postprocess-bad-centre-site": (["postprocess", "--placement.sites=[-1]"], "sites must be integers >= 0"),
    "postprocess-output-directory": (["postprocess", "--output=."], "is a directory"),
}


@pytest.mark.parametrize("case", sorted(CLI_CASES))
def test_a_bad_cli_argument_is_refused_before_anything_is_loaded(case, checkpoint, nothing_loaded, capsys):
    args, fragment = CLI_CASES[case]
    subcommand, *rest = args
    given = (
        []
        if any(a.startswith("--checkpoint") for a in rest) or subcommand == "postprocess"
        else [f"--checkpoint={checkpoint}"]
    )
    line = _cli_error([subcommand, *DATA, *QUIET, *given, *rest], capsys)
    assert fragment in line
    assert nothing_loaded == []


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines and lines[-1].startswith("error:"), err[-2000:]
    return lines[-1]


def _cifar_data(tmp_path: Path) -> list[str]:
    from test_data import write_cifar_batch

    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in (
        "data_batch_1",
        "data_batch_2",
        "data_batch_3",
        "data_batch_4",
        "data_batch_5",
        "test_batch",
    ):
        images = rng.integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
        write_cifar_batch(folder / name, images, {"labels": [int(i) for i in rng.integers(0, 10, 8)]})
    return [
        "--data=meansparse_pl.data.CIFAR10DataModule",
        f"--data.data_dir={tmp_path / 'cifar'}",
        "--data.val_size=8",
        "--data.eval_batch_size=8",
    ]


def test_data_that_does_not_fit_the_checkpoint_is_one_line(checkpoint, tmp_path, capsys):
    line = _cli_error(["evaluate", *_cifar_data(tmp_path), *QUIET, f"--checkpoint={checkpoint}"], capsys)
    assert "CIFAR10DataModule" in line and "(3, 32, 32)" in line and "(1, 28, 28)" in line


def test_another_architecture_on_the_command_line_is_one_line(checkpoint, tmp_path, capsys):
    plain = tmp_path / "plain.pt"
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, plain)
    line = _cli_error(["evaluate", *DATA, *QUIET, f"--checkpoint={plain}"], capsys)
    assert "not a meansparse_pl checkpoint" in line


def test_an_output_folder_in_use_is_refused_before_anything_is_written(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    # a live process of this host holds the folder (process 1 always runs)
    (out / LOCK_NAME).write_text(f"{os.uname().nodename} 1")
    args = ["evaluate", *DATA, *QUIET, f"--checkpoint={checkpoint}", f"--output_dir={out}"]
    line = _cli_error([*args, f"--trainer.default_root_dir={out}"], capsys)
    assert "in use by another run" in line
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME]  # no config.yaml, no state, no report


def test_another_runs_state_is_refused_before_the_config_is_overwritten(checkpoint, tmp_path, capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "config.yaml").write_text("the other run's config\n")
    torch.save({"fingerprint": "another run", "results": {}}, out / "evaluation.state.rank0")
    args = ["evaluate", *DATA, *QUIET, f"--checkpoint={checkpoint}", f"--output_dir={out}"]
    line = _cli_error([*args, f"--trainer.default_root_dir={out}", "--attacks.names=[clean]"], capsys)
    assert "belongs to a different run" in line
    assert (out / "config.yaml").read_text() == "the other run's config\n"
    assert not (out / LOCK_NAME).exists()  # released


def test_the_launcher_prints_no_traceback(checkpoint, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "cli.py"),
            "evaluate",
            *DATA,
            *QUIET,
            f"--checkpoint={checkpoint}",
            "--threat.eps=5",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: a Linf eps of 5")


def test_a_safely_loaded_file_is_a_dictionary(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(CheckpointError, match="holds a list, not a checkpoint dictionary"):
        safe_load(path)
