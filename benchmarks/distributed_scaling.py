"""Scaling of the statistics pass and of the sharded evaluation with Lightning DDP: 1 process vs N processes.

Runs the real command-line jobs as subprocesses (so DDP launches exactly as for a user):

* ``postprocess`` of a trained Fashion-MNIST demo checkpoint (operators + one statistics pass over the
  calibration split); the pass's own time is read from the written checkpoint (``metadata.calibration``),
  and the statistics of every N are compared with those of 1 process;
* ``alpha_search`` over two alphas (clean, APGD-CE, APGD-DLR, BPDA-APGD-CE on ``--samples`` held-out images):
  wall time of the whole job, process start-up included.

Each device count runs ``--repeats`` times, interleaved (1, N, 1, N, ...). Reported: median times, speed-up
over 1 process and the scaling efficiency (speed-up / N). On CPU the cores are shared between the processes
(Lightning gives each ``cores / N`` intra-op threads), so this measures what sharding buys over intra-op
threading; on a GPU node (``--accelerator gpu --devices 1 2 4 8``) it is the multi-GPU scaling.

    .venv/bin/python cli.py fit --config configs/fashion_mnist_demo.yaml     # or scripts/demo.sh
    .venv/bin/python benchmarks/distributed_scaling.py --devices 1 2
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import describe_machine, machine, write_json

from meansparse_pl.io import safe_load

ROOT = Path(__file__).resolve().parent.parent


def run(command: list[str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"failed: {' '.join(command)}\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def trainer_args(accelerator: str, devices: int) -> list[str]:
    strategy = ["--trainer.strategy=ddp"] if devices > 1 else []
    return [
        f"--trainer.accelerator={accelerator}",
        f"--trainer.devices={devices}",
        *strategy,
        "--trainer.logger=false",
        "--trainer.enable_progress_bar=false",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/fashion_mnist_demo/checkpoints/last.ckpt")
    parser.add_argument("--config", default="configs/fashion_mnist_demo.yaml")
    parser.add_argument("--search-config", default="configs/fashion_mnist_alpha_search.yaml")
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--samples", type=int, default=500, help="held-out images for the alpha search")
    parser.add_argument("--n-iter", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    if not (ROOT / args.checkpoint).is_file():
        raise SystemExit(f"no checkpoint at {args.checkpoint}: run scripts/demo.sh (or cli.py fit) first")
    print(f"machine: {describe_machine()}")
    python = sys.executable
    times: dict[int, dict[str, list[float]]] = {
        n: {"pass": [], "postprocess": [], "search": []} for n in args.devices
    }
    means: dict[int, list[torch.Tensor]] = {}
    images: dict[int, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for n in args.devices if repeat % 2 == 0 else list(reversed(args.devices)):
                output = Path(tmp) / f"sparse_{n}" / "meansparse.pt"
                wall = run(
                    [python, "cli.py", "postprocess", "--config", args.config, f"--weights={args.checkpoint}",
                     f"--output_dir={output.parent}", *trainer_args(args.accelerator, n)]
                )  # fmt: skip
                payload = safe_load(output)
                summary = payload["metadata"]["calibration"]
                times[n]["pass"].append(float(summary["seconds"]))
                times[n]["postprocess"].append(wall)
                images[n] = int(summary["images"])
                state = payload["state_dict"]
                means[n] = [state[k].double() for k in sorted(state) if k.endswith(".mean")]
                wall = run(
                    [python, "cli.py", "alpha_search", "--config", args.search_config, f"--checkpoint={output}",
                     "--alphas=[0, 0.25]", f"--limit_samples={args.samples}", f"--attacks.n_iter={args.n_iter}",
                     f"--output_dir={Path(tmp) / f'search_{n}'}", "--write_alpha=false", "--resume=false",
                     *trainer_args(args.accelerator, n)]
                )  # fmt: skip
                times[n]["search"].append(wall)
                print(f"  repeat {repeat}, {n} process(es): done", flush=True)
    one = args.devices[0]
    result: dict = {"args": vars(args), "machine": machine(), "rows": []}
    print(f"\n| processes | statistics pass (s) | postprocess job (s) | alpha search job (s) | speed-up pass / search "
          f"| efficiency pass / search | images | max rel. diff of means vs {one} |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.devices:
        median = {k: statistics.median(v) for k, v in times[n].items()}
        base = {k: statistics.median(v) for k, v in times[one].items()}
        speed = {k: base[k] / median[k] for k in median}
        diff = max(
            float(((a - b).abs() / b.abs().clamp_min(1e-12)).max())
            for a, b in zip(means[n], means[one], strict=True)
        )
        row = {
            "processes": n,
            **{f"{k}_s": v for k, v in median.items()},
            "images": images[n],
            "max_rel_diff": diff,
        }
        result["rows"].append(row)
        print(
            f"| {n} | {median['pass']:.2f} | {median['postprocess']:.1f} | {median['search']:.1f} | "
            f"{speed['pass']:.2f} / {speed['search']:.2f} | {speed['pass'] / n * one:.2f} / {speed['search'] / n * one:.2f} "
            f"| {images[n]} | {diff:.1e} |"
        )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
