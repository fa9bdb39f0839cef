"""One-off cost of the fused operator kernels: the first call of each path in a fresh process (inductor
compiles the kernels) against the second call, with inductor's on-disk cache cold and warm.

Each measurement runs in its own subprocess so that nothing compiled earlier in this process is reused.

    .venv/bin/python benchmarks/compile_cost.py            # ResNet-18, batch 64
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from common import describe_machine

WORKER = r"""
import json, time, torch
from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.models import create_model

torch.manual_seed(0)
torch.set_num_threads({threads})
model = create_model("resnet18", num_classes=10).eval()
x = torch.rand({batch}, 3, 32, 32)
sparse = sparsify(model, x[:2])
out = {{}}

def twice(name, fn):
    for key in ("first", "second"):
        start = time.perf_counter()
        fn()
        out[f"{{name}} {{key}}"] = time.perf_counter() - start

twice("calibrate", lambda: calibrate(sparse, [x], progress=False))
set_alpha(sparse, 0.25)
def forward():
    with torch.no_grad():
        sparse(x)
twice("forward", forward)
def forward_backward():
    sparse(x.clone().requires_grad_()).sum().backward()
twice("forward+backward", forward_backward)
print(json.dumps(out))
"""


def run(cache_dir: str, threads: int, batch: int) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache_dir, "PYTHONWARNINGS": "ignore"}
    code = WORKER.format(threads=threads, batch=batch)
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}")
    with tempfile.TemporaryDirectory() as cache:
        cold = run(cache, args.threads, args.batch_size)  # empty cache: compiles from scratch
        warm = run(cache, args.threads, args.batch_size)  # same cache, new process
    print("| path | cache | first call (s) | second call (s) | one-off cost (s) | first / second |")
    print("|---|---|---:|---:|---:|---:|")
    for path in ("calibrate", "forward", "forward+backward"):
        for label, times in (("cold", cold), ("warm", warm)):
            first, second = times[f"{path} first"], times[f"{path} second"]
            print(
                f"| {path} | {label} | {first:.2f} | {second:.2f} | {first - second:.2f} | {first / second:.1f} |"
            )


if __name__ == "__main__":
    main()
