"""Shared timing helpers for the benchmarks: interleaved repeats, medians, paired ratios, machine description.

On a shared machine the load drifts during a run. Every benchmark therefore runs all of its cases once per
repeat, back to back, in an order that rotates from repeat to repeat (each case takes every position equally
often), and reports

* the median time of each case over the repeats, the ratio of those medians to the baseline case, and
* the median over repeats of the *paired* ratio (case / baseline within the same repeat), which cancels
  load that changes slowly compared with one repeat.

Run a benchmark from the repository root, e.g. ``.venv/bin/python benchmarks/operator_overhead.py``.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Benchmarks run as scripts from the repository root: make the package importable without installing it.
_ROOT = Path(__file__).resolve().parent.parent
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average_1min": round(os.getloadavg()[0], 2),
    }


def describe_machine() -> str:
    m = machine()
    return (
        f"{m['cpu']}, {m['logical_cpus']} logical CPUs, torch {m['torch']} with {m['torch_threads']} threads, "
        f"Python {m['python']}, 1-min load average {m['load_average_1min']}"
    )


def time_call(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(
    cases: dict[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    on_repeat: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of every case, ``repeats`` times, the cases interleaved in a rotating order.

    ``warmup`` untimed calls of each case come first (compilation, allocator and cache warm-up).
    """
    names = list(cases)
    for _ in range(warmup):
        for name in names:
            cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        shift = repeat % len(names)
        order = names[shift:] + names[:shift]
        if repeat % 2:
            order = order[::-1]
        this_repeat = {}
        for name in order:
            this_repeat[name] = time_call(cases[name])
            times[name].append(this_repeat[name])
        if on_repeat is not None:
            on_repeat(repeat, this_repeat)
    return times


def summarize(times: dict[str, list[float]], baseline: str) -> dict[str, dict[str, float]]:
    """Per case: median seconds, ratio of medians to ``baseline`` and median paired ratio."""
    base = times[baseline]
    base_median = statistics.median(base)
    out = {}
    for name, values in times.items():
        paired = [v / b for v, b in zip(values, base, strict=True)]
        out[name] = {
            "median_s": statistics.median(values),
            "min_s": min(values),
            "max_s": max(values),
            "ratio_of_medians": statistics.median(values) / base_median,
            "median_paired_ratio": statistics.median(paired),
        }
    return out


def table(summary: dict[str, dict[str, float]], title: str, unit_scale: float = 1e3, unit: str = "ms") -> str:
    """A Markdown table of a :func:`summarize` result."""
    lines = [
        f"**{title}**",
        "",
        f"| case | median ({unit}) | min ({unit}) | max ({unit}) | ratio of medians | median paired ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in summary.items():
        lines.append(
            f"| {name} | {row['median_s'] * unit_scale:.1f} | {row['min_s'] * unit_scale:.1f} | "
            f"{row['max_s'] * unit_scale:.1f} | {row['ratio_of_medians']:.3f} | {row['median_paired_ratio']:.3f} |"
        )
    return "\n".join(lines)


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        with open(path, "w") as handle:
            json.dump(payload, handle, indent=2, default=str)
