"""Cost of the calibration pass against a plain no-grad inference pass over the same images.

Same model (ResNet-18, CIFAR shape; the calibrated model is the sparsified copy that shares its weights),
same ``DataLoader`` over the same N images. Timed cases, interleaved (see ``benchmarks/common.py``):

* ``plain inference``: ``for images, _ in loader: model(images)`` under ``torch.no_grad()``;
* ``calibrate``: ``meansparse_pl.calibrate(sparse_model, loader)`` (the default path: per-channel moments by a
  fused kernel that reads each activation once, accumulated and merged in float64);
* ``calibrate, eager float64``: the same with the fused kernels switched off (a float64 copy of each
  activation, reduced by the two-pass formula);
* ``calibrate, original``: the statistics code as it was before the speed work (float64 copy, mean, a
  second float64 temporary for the deviations, square, sum).

Peak memory: each of ``plain inference`` and ``calibrate`` also runs alone in a fresh subprocess (several
times, alternating), after one warm-up batch (which also compiles the fused kernels), while a background
thread samples the resident set size (``/proc/self/statm``) every 2 ms. Reported: the peak RSS during the pass
and the peak increase over the RSS just before the pass. One-off costs (kernel compilation on the first call,
the inductor import) are reported separately from the per-pass numbers.

    .venv/bin/python benchmarks/calibration_cost.py                 # 512 images, batch 128, 5 repeats
    .venv/bin/python benchmarks/calibration_cost.py --images 1024 --repeats 7
    .venv/bin/python benchmarks/calibration_cost.py --model torchvision:resnet18 --cifar-stem  # in-place ReLUs
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch
from common import describe_machine, interleaved, machine, summarize, table, write_json
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import meansparse_pl.statistics as statistics_module
from meansparse_pl import calibrate, sparsify
from meansparse_pl.models import create_model
from meansparse_pl.ops import fused_kernels
from meansparse_pl.statistics import Moments


def original_batch_moments(x: torch.Tensor, channel_dim: int) -> Moments:
    """statistics.batch_moments as it was before the speed work."""
    channel_dim = channel_dim % x.dim()
    reduce_dims = [d for d in range(x.dim()) if d != channel_dim]
    values = x.detach().to(torch.float64)
    count = torch.tensor(float(x.numel() // x.shape[channel_dim]), dtype=torch.float64, device=x.device)
    mean = values.mean(dim=reduce_dims)
    shape = [1] * x.dim()
    shape[channel_dim] = x.shape[channel_dim]
    m2 = (values - mean.view(shape)).square_().sum(dim=reduce_dims)
    return Moments(count, mean, m2)


@contextlib.contextmanager
def original_statistics():
    current = statistics_module.batch_moments
    statistics_module.batch_moments = original_batch_moments
    try:
        yield
    finally:
        statistics_module.batch_moments = current


def cifar_stem(model: nn.Module) -> nn.Module:
    """A torchvision ResNet with the CIFAR stem (3x3 stride-1 first convolution, no max-pool), as users adapt
    it to 32x32 images; its ReLUs stay torchvision's own: in place, and reused within each block."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    return model


def build(args: argparse.Namespace):
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    base = create_model(args.model, num_classes=10)
    if args.cifar_stem:
        base = cifar_stem(base)
    base = base.eval()
    sparse = sparsify(copy.deepcopy(base), torch.rand(2, *shape))
    images = torch.rand(args.images, *shape)
    loader = DataLoader(
        TensorDataset(images, torch.zeros(args.images, dtype=torch.long)), batch_size=args.batch_size
    )
    return base, sparse, loader


def plain_pass(model, loader) -> None:
    with torch.no_grad():
        for images, _ in loader:
            model(images)


def calibration_pass(model, loader) -> None:
    calibrate(model, loader, progress=False)


# ------------------------------------------------------------------------------------------ memory worker
def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def memory_worker(args: argparse.Namespace) -> None:
    """One pass in this fresh process, RSS sampled by a thread; prints one JSON line."""
    torch.set_num_threads(args.threads)
    base, sparse, loader = build(args)
    first = next(iter(loader))
    warm_start = time.perf_counter()
    if args.memory_worker == "calibrate":
        calibration_pass(sparse, [first])  # warm-up batch: compiles the fused kernels in this process
        run = lambda: calibration_pass(sparse, loader)  # noqa: E731
    else:
        plain_pass(base, [first])
        run = lambda: plain_pass(base, loader)  # noqa: E731
    warm_seconds = time.perf_counter() - warm_start
    before = _rss_bytes()
    peak = [before]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    run()
    stop.set()
    sampler.join()
    peak[0] = max(peak[0], _rss_bytes())
    print(json.dumps({"before": before, "peak": peak[0], "warm_up_s": warm_seconds}))


def measure_memory(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    samples: dict[str, list[dict[str, float]]] = {"plain inference": [], "calibrate": []}
    for repeat in range(args.memory_repeats):
        order = ["plain inference", "calibrate"] if repeat % 2 == 0 else ["calibrate", "plain inference"]
        for name in order:
            mode = "plain" if name == "plain inference" else "calibrate"
            command = (
                [sys.executable, __file__, "--memory-worker", mode]
                + [
                    f"--{k.replace('_', '-')}={v}"
                    for k, v in vars(args).items()
                    if k in ("model", "images", "batch_size", "image_size", "threads")
                ]
                + (["--cifar-stem"] if args.cifar_stem else [])
            )
            output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            samples[name].append(json.loads(output.strip().splitlines()[-1]))
    out = {}
    for name, rows in samples.items():
        out[name] = {
            "peak_rss_mb": statistics.median(r["peak"] for r in rows) / 2**20,
            "rss_before_mb": statistics.median(r["before"] for r in rows) / 2**20,
            "peak_increase_mb": statistics.median(r["peak"] - r["before"] for r in rows) / 2**20,
            "warm_up_s": statistics.median(r["warm_up_s"] for r in rows),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="resnet18", help="a registry name, e.g. resnet18 or torchvision:resnet18"
    )
    parser.add_argument("--cifar-stem", action="store_true", help="torchvision ResNets: the CIFAR stem")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-repeats", type=int, default=3, help="subprocess runs per case (0: skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="also write the results to this file")
    parser.add_argument("--memory-worker", choices=["plain", "calibrate"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_worker:
        memory_worker(args)
        return

    torch.set_num_threads(args.threads)
    base, sparse, loader = build(args)
    print(f"machine: {describe_machine()}")
    print(
        f"{args.model}: {args.images} images of {args.image_size}x{args.image_size}, batch {args.batch_size}"
    )
    start = time.perf_counter()
    calibration_pass(sparse, loader)
    first_call = time.perf_counter() - start

    def eager_calibration() -> None:
        with fused_kernels(False):
            calibration_pass(sparse, loader)

    def original_calibration() -> None:
        with fused_kernels(False), original_statistics():
            calibration_pass(sparse, loader)

    cases = {
        "plain inference": lambda: plain_pass(base, loader),
        "calibrate": lambda: calibration_pass(sparse, loader),
        "calibrate, eager float64": eager_calibration,
        "calibrate, original": original_calibration,
    }
    times = interleaved(cases, args.repeats, on_repeat=lambda r, t: print(f"  repeat {r}", flush=True))
    summary = summarize(times, "plain inference")
    print(
        table(summary, f"one pass over {args.images} images ({args.repeats} repeats)", unit_scale=1, unit="s")
    )
    print(
        f"first calibrate call in this process (includes compiling the fused kernels): {first_call:.2f} s "
        f"vs {summary['calibrate']['median_s']:.2f} s afterwards"
    )
    result = {"args": vars(args), "machine": machine(), "time": summary, "first_call_s": first_call}
    if args.memory_repeats > 0:
        memory = measure_memory(args)
        result["memory"] = memory
        plain, cal = memory["plain inference"], memory["calibrate"]
        print("\n**peak memory (RSS sampled every 2 ms, fresh subprocess per run, medians)**\n")
        print("| case | RSS before pass (MB) | peak RSS during pass (MB) | peak increase (MB) |")
        print("|---|---:|---:|---:|")
        for name, row in memory.items():
            print(
                f"| {name} | {row['rss_before_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['peak_increase_mb']:.0f} |"
            )
        print(
            f"\npeak RSS ratio calibrate / plain = {cal['peak_rss_mb'] / plain['peak_rss_mb']:.3f}; "
            f"peak-increase ratio = {cal['peak_increase_mb'] / max(plain['peak_increase_mb'], 1e-9):.3f} "
            f"(RSS before the pass differs by {cal['rss_before_mb'] - plain['rss_before_mb']:.0f} MB: the "
            "operators, the torch.compile / inductor import and the compiled kernels)"
        )
    row = summary["calibrate"]
    print(
        f"calibrate / plain inference = {row['ratio_of_medians']:.3f} (ratio of medians), "
        f"{row['median_paired_ratio']:.3f} (median paired ratio); target <= 1.10"
    )
    write_json(args.json, result)


if __name__ == "__main__":
    main()
