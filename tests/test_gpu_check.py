"""``benchmarks/gpu_check.py --device cpu --quick`` runs every check of the GPU benchmark on tiny sizes, so
the script that is run on a lent GPU cannot rot; its correctness results must hold on the CPU too."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_on_cpu_and_its_checks_pass(tmp_path):
    output = tmp_path / "gpu_check.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "gpu_check.py"),
            "--device",
            "cpu",
            "--quick",
            "--output",
            str(output),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=300,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    assert "GPU check on cpu" in done.stdout
    assert results["kernel_path"] == "fused"
    rows = results["operator"]
    assert len(rows) == 3 * 2 * 3  # dtype x layout x backward mode
    for row in rows:
        assert row["forward_equals_cpu"] and row["outputs_off_the_float32_band"] == 0, row
        assert row["gradient_max_abs_diff_vs_cpu"] == 0.0, row
        if row["layout"] == "channels_last":
            assert row["gradient_keeps_channels_last"], row
    syncs = results["syncs"]
    assert syncs["calibration_per_batch"] == 0 and syncs["operator_forward_per_call"] == 0
    assert syncs["evaluation_per_batch_of_two_tasks"] <= 2  # the attacks' input checks, one per task
    ratios = [
        results["overhead"][0]["no_grad"]["meansparse_ratio"],
        results["overhead"][0]["input_gradient"]["meansparse_ratio"],
        results["calibration"]["calibration_ratio"],
        results["autoattack"]["package_throughput_vs_plain"],
    ]
    assert all(math.isfinite(r) and r > 0 for r in ratios)
