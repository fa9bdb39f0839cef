"""Two gloo processes on CPU give the same statistics and accuracies as one process."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_calibrate_evaluate.py"
ROOT = Path(__file__).parent.parent


def _run(devices: int, output: Path) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(devices), str(output)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(output, weights_only=True)


def test_two_processes_equal_one(tmp_path):
    one = _run(1, tmp_path / "one.pt")
    two = _run(2, tmp_path / "two.pt")
    # every image counted exactly once: no padding leaked into the statistics
    assert one["images"] == two["images"] == 37
    assert one["count"] == two["count"]
    for m1, m2, v1, v2 in zip(one["mean"], two["mean"], one["var"], two["var"], strict=True):
        torch.testing.assert_close(m2, m1, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(v2, v1, rtol=1e-6, atol=1e-7)
    # each test sample evaluated exactly once, with the same per-sample outcome
    for key in ("clean", "pgd", "base/clean"):
        assert sorted(two["results"][key]) == list(range(37))
        assert two["results"][key] == one["results"][key]
    # and the numbers are not trivial: the clean labels were corrupted for every 4th sample
    assert sum(one["results"]["base/clean"].values()) == 37 - 10
