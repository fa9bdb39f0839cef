"""Several gloo processes on CPU give exactly the numbers of one process.

Every sharded pass takes whole batches of the one-process order (meansparse_pl.sharding), so statistics,
per-sample verdicts (random-start PGD and APGD-CE included) and the chosen alpha must be identical for 1, 2
and 3 processes, on sizes that do not divide evenly, with fewer batches than processes, and with
``cli.py fit`` running both callbacks under DDP (where the alpha search once deadlocked).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parent.parent
SCRIPTS = Path(__file__).parent / "scripts"
DEMO = ROOT / "configs" / "fashion_mnist_demo.yaml"


def _python(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _calibrate_evaluate(devices: int, output: Path) -> dict:
    _python(str(SCRIPTS / "ddp_calibrate_evaluate.py"), str(devices), str(output))
    return torch.load(output, weights_only=True)


def test_two_and_three_processes_equal_one(tmp_path):
    one = _calibrate_evaluate(1, tmp_path / "one.pt")
    assert one["images"] == 37
    assert sum(one["results"]["base/clean"].values()) == 37 - 10  # every 4th label corrupted: not trivial
    for devices in (2, 3):
        many = _calibrate_evaluate(devices, tmp_path / f"{devices}.pt")
        # every image counted exactly once (no padding), and the same batches: identical statistics
        assert many["images"] == 37 and many["count"] == one["count"]
        for m1, m2, v1, v2 in zip(one["mean"], many["mean"], one["var"], many["var"], strict=True):
            assert torch.equal(m1, m2) and torch.equal(v1, v2)
        # each test sample evaluated exactly once, with the same verdict, random-start PGD included
        for key in ("clean", "pgd", "base/clean"):
            assert sorted(many["results"][key]) == list(range(37))
        assert many["results"] == one["results"]
        # two samples for three processes: the processes without a batch still merge, nothing hangs
        assert many["few"] == one["few"] and sorted(many["few"]["pgd"]) == [0, 1]
        # the Trainer-less API shards over the initialised process group by itself
        assert many["without_trainer"]["pgd"] == one["results"]["pgd"]
        # rank 0 alone, distributed=False: no collective, the same statistics as the merged pass
        assert all(torch.equal(a, b) for a, b in zip(many["alone"], one["mean"], strict=True))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A demo network after one epoch of PGD training on 3,000 Fashion-MNIST images (val clean about 69%,
    PGD-10 about 45%): robust enough that random starts decide some verdicts."""
    out = tmp_path_factory.mktemp("trained")
    _python(
        "cli.py",
        "fit",
        "--config",
        str(DEMO),
        "--data.init_args.train_subset=3000",
        "--data.init_args.val_subset=100",
        "--data.init_args.eval_batch_size=50",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.default_root_dir={out}",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.callbacks.init_args.dirpath={out / 'checkpoints'}",
    )
    return out / "checkpoints" / "last.ckpt"


def _subcommands(devices: int, trained: Path, out: Path) -> dict:
    out.mkdir()
    _python(str(SCRIPTS / "ddp_subcommands.py"), str(devices), str(trained), str(out))
    checkpoint = torch.load(out / "meansparse.pt", weights_only=True)
    return {
        "evaluate": json.loads((out / "verdicts.json").read_text()),
        "evaluation": json.loads((out / "evaluate" / "evaluation.json").read_text()),
        "alpha_search": json.loads((out / "alpha_search" / "alpha_search.json").read_text()),
        "compare": json.loads((out / "compare" / "comparison.json").read_text()),
        "state": checkpoint["state_dict"],
        "calibration": checkpoint["metadata"]["calibration"],
    }


def test_subcommands_give_identical_verdicts_on_one_two_and_three_processes(trained, tmp_path):
    """postprocess, alpha_search, evaluate and compare (the methods cli.py calls) with random-start PGD and
    APGD-CE: the same statistics, per-sample verdicts, chosen alpha, reports and diagnostics on 1, 2 and 3
    processes."""
    one = _subcommands(1, trained, tmp_path / "one")
    verdicts = one["evaluate"]
    assert len(verdicts["meansparse/eps=0.1/pgd"]) == 23
    # the attacks break some samples and random starts matter: the numbers are not trivially shared
    clean, pgd = verdicts["base/eps=0.1/clean"], verdicts["base/eps=0.1/pgd"]
    assert sum(pgd.values()) < sum(clean.values())
    for devices in (2, 3):
        many = _subcommands(devices, trained, tmp_path / str(devices))
        assert many["calibration"]["images"] == one["calibration"]["images"] == 101
        for name, tensor in one["state"].items():
            assert torch.equal(many["state"][name], tensor), name
        assert many["evaluate"] == verdicts
        assert many["evaluation"]["results"] == one["evaluation"]["results"]
        assert many["alpha_search"]["per_sample"] == one["alpha_search"]["per_sample"]
        assert many["alpha_search"]["suggestion"] == one["alpha_search"]["suggestion"]
        assert many["compare"]["per_sample"] == one["compare"]["per_sample"]
        # the attack-failure diagnostics (rank 0 in evaluate; every rank, no collective, in compare and the
        # alpha search) do not depend on the number of processes either
        for report in ("evaluation", "alpha_search", "compare"):
            assert many[report]["diagnostics"] == one[report]["diagnostics"], report
            assert one[report]["diagnostics"], report


def _fit_with_both_callbacks(devices: int, trained: Path, out: Path) -> dict:
    """``cli.py fit`` resumed from a finished run (no training step left, so both process counts start the
    callbacks from the same weights) with the MeanSparseCallback and an AlphaSearchCallback."""
    _python(
        "cli.py",
        "fit",
        "--config",
        str(DEMO),
        "--data.init_args.train_subset=101",
        "--data.init_args.val_subset=40",
        "--data.init_args.batch_size=16",
        "--data.init_args.eval_batch_size=16",
        "--trainer.max_epochs=1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.devices={devices}",
        f"--trainer.strategy={'ddp' if devices > 1 else 'auto'}",
        f"--trainer.default_root_dir={out}",
        "--trainer.logger=false",
        f"--trainer.callbacks.init_args.dirpath={out / 'checkpoints'}",
        "--trainer.callbacks+=meansparse_pl.callback.AlphaSearchCallback",
        "--trainer.callbacks.alphas=[0, 0.35]",
        "--trainer.callbacks.threat.eps=0.1",
        "--trainer.callbacks.attacks.names=[pgd, apgd-ce]",
        "--trainer.callbacks.attacks.options={pgd: {steps: 3}, apgd-ce: {n_iter: 3}}",
        "--trainer.callbacks.limit_samples=23",
        "--trainer.callbacks.batch_size=8",
        f"--ckpt_path={trained}",
        timeout=240,
    )
    checkpoint = torch.load(out / "meansparse.pt", weights_only=True)
    return {
        "state": checkpoint["state_dict"],
        "metadata": checkpoint["metadata"],
        "search": json.loads((out / "alpha_search" / "alpha_search.json").read_text()),
    }


def test_fit_with_both_callbacks_on_two_processes_writes_the_one_process_checkpoint(trained, tmp_path):
    one = _fit_with_both_callbacks(1, trained, tmp_path / "one")
    two = _fit_with_both_callbacks(2, trained, tmp_path / "two")
    assert two["metadata"]["calibration"]["images"] == one["metadata"]["calibration"]["images"] == 101
    for name, tensor in one["state"].items():  # statistics and the chosen alpha, bit for bit
        assert torch.equal(two["state"][name], tensor), name
    assert two["search"]["per_sample"] == one["search"]["per_sample"]
    assert two["search"]["suggestion"] == one["search"]["suggestion"]
    assert two["metadata"]["alpha_search"]["suggestion"] == one["search"]["suggestion"]
