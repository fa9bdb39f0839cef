"""The GPU check: correctness, kernel paths, host-device syncs, and speed of the package on one device.

Run on a CUDA machine (``--device cuda``) it checks

1. the operator in float32 / bfloat16 / float16, contiguous and channels_last, in every backward mode, against
   the CPU path on the same values (forward and input gradient) and against a float64 reference of the band
   decision (no decision may differ from the float32 band test), and says which kernel path ran;
2. host-device syncs per phase: calibration per batch, one evaluation batch, the operator's forward (CUDA:
   ``torch.cuda.set_sync_debug_mode``, which reports every synchronising call; elsewhere the dispatch-level
   :class:`~meansparse_pl.syncs.HostSyncCounter`);
3. operator overhead on ResNet-18 and WRN-28-10 at batch 256, no-grad and forward + input gradient, against the
   same network without operators (CUDA events, interleaved repeats);
4. calibration against plain inference over the same batches: time and peak memory;
5. AutoAttack-standard throughput through the package (``run_attack("autoattack")``) against plain pyautoattack
   with the same settings on the same model.

Targets on a GPU: operator overhead <= 1.05x, calibration <= 1.10x plain inference in time and peak memory,
package AutoAttack >= 0.95x plain pyautoattack, zero syncs per batch. ``--device cpu --quick`` runs every check
on tiny sizes (the tests run it so it cannot rot); its timings mean nothing.

    python benchmarks/gpu_check.py --device cuda --output gpu_check.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import describe_machine, write_json  # noqa: E402
from pyautoattack import AutoAttack  # noqa: E402
from torch import nn  # noqa: E402

from meansparse_pl import calibrate, run_attack, set_alpha, sparsify  # noqa: E402
from meansparse_pl.attacks.autoattack import make_apgd, make_apgd_t  # noqa: E402
from meansparse_pl.config import ThreatModel  # noqa: E402
from meansparse_pl.evaluation import EvaluationTask, run_tasks, single_device_trainer  # noqa: E402
from meansparse_pl.models import create_model  # noqa: E402
from meansparse_pl.ops import BACKWARD_MODES, MeanSparse, kernels, operators  # noqa: E402
from meansparse_pl.syncs import HostSyncCounter  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ------------------------------------------------------------------------------------------ helpers
def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(fn: Callable[[], Any], device: torch.device) -> float:
    """One call's time: CUDA events on a GPU, the wall clock elsewhere."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    began = time.perf_counter()
    fn()
    return time.perf_counter() - began


def paired(cases: dict[str, Callable[[], Any]], device: torch.device, repeats: int) -> dict[str, float]:
    """Median seconds of each case over interleaved repeats (order reversed every other repeat), after one
    warm-up call each, and each case's median ratio to the first case within a repeat."""
    names = list(cases)
    for name in names:
        cases[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            times[name].append(seconds(cases[name], device))
    base = times[names[0]]
    out = {f"{name}_median_s": statistics.median(t) for name, t in times.items()}
    for name in names[1:]:
        out[f"{name}_ratio"] = statistics.median(v / b for v, b in zip(times[name], base, strict=True))
    return out


@contextlib.contextmanager
def counting_syncs(device: torch.device) -> Iterator[Callable[[], int]]:
    """Counts synchronising calls inside the block; yields a function returning the count so far."""
    if device.type == "cuda":
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                yield lambda: sum("synchroniz" in str(w.message) for w in caught)
            finally:
                torch.cuda.set_sync_debug_mode("default")
    else:
        with HostSyncCounter() as counter:
            yield lambda: counter.total


def calibrated(model: nn.Module, batches: list[torch.Tensor], alpha: float) -> nn.Module:
    sparse = sparsify(model, batches[0][:1])
    calibrate(sparse, batches, progress=False)
    set_alpha(sparse, alpha)
    return sparse.eval()


# ------------------------------------------------------------------------------- 1. the operator
def operator_checks(device: torch.device, quick: bool) -> list[dict[str, Any]]:
    """Every dtype x layout x backward mode on ``device`` against the CPU path and the band references."""
    shape = (4, 16, 12, 12) if quick else (64, 64, 32, 32)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for layout in ("contiguous", "channels_last"):
            for mode in BACKWARD_MODES:
                op = MeanSparse(shape[1], 1, alpha=0.5, backward_mode=mode)
                op.set_statistics(
                    torch.randn(shape[1], generator=generator), 0.2 + torch.rand(shape[1]), 1000
                )
                x = (torch.randn(shape, generator=generator) * op.var.sqrt().view(1, -1, 1, 1)).to(dtype)
                if layout == "channels_last":
                    x = x.contiguous(memory_format=torch.channels_last)
                grad_out = torch.randn(shape, generator=generator).to(dtype)
                runs = {}
                for where in ("cpu", device):
                    operator = copy.deepcopy(op).to(where)
                    xi = x.to(where).requires_grad_()
                    out = operator(xi)
                    (grad,) = torch.autograd.grad(out, xi, grad_out.to(where))
                    runs[str(where)] = (out.detach().cpu(), grad.cpu(), grad)
                out, grad, raw_grad = runs[str(device)]
                mean = op.mean.view(1, -1, 1, 1)
                threshold = (op.alpha * op.var.sqrt()).view_as(mean)
                inside32 = (x.float() - mean).abs() < threshold  # the documented float32 band test
                inside64 = (x.double() - mean.double()).abs() < threshold.double()
                expected = torch.where(inside32, mean.to(dtype), x)
                rows.append(
                    {
                        "dtype": dtype_name,
                        "layout": layout,
                        "backward": mode,
                        "forward_equals_cpu": torch.equal(out, runs["cpu"][0]),
                        "outputs_off_the_float32_band": int((out != expected).sum()),
                        "float32_band_vs_float64_decisions": int((inside32 != inside64).sum()),
                        "gradient_max_abs_diff_vs_cpu": float(
                            (grad.float() - runs["cpu"][1].float()).abs().max()
                        ),
                        "gradient_keeps_channels_last": raw_grad.is_contiguous(
                            memory_format=torch.channels_last
                        )
                        if layout == "channels_last"
                        else None,
                    }
                )
    return rows


# -------------------------------------------------------------------------------------- 2. syncs
def sync_counts(device: torch.device, model: nn.Module, batches: list[torch.Tensor]) -> dict[str, float]:
    model = model.to(device)
    on_device = [b.to(device) for b in batches]
    sparse = sparsify(model, on_device[0][:1])
    counts = {}
    for n in (2, 4):
        with counting_syncs(device) as count:
            calibrate(sparse, on_device[:n], progress=False)
            counts[n] = count()
    set_alpha(sparse, 0.25)
    labels = sparse(on_device[0]).argmax(1).detach()
    data = torch.utils.data.TensorDataset(torch.cat(batches[:4]).cpu(), torch.cat([labels] * 4).cpu())
    threat = ThreatModel("Linf", 8 / 255)
    tasks = [EvaluationTask("clean", "clean", threat), EvaluationTask("base", "clean", threat, alpha=0.0)]
    size = batches[0].shape[0]
    evaluation = {}
    for n in (1, 3):
        subset = torch.utils.data.Subset(data, range(n * size))
        with counting_syncs(device) as count:
            run_tasks(
                sparse, subset, tasks, batch_size=size, trainer=single_device_trainer(sparse, progress=False)
            )
            evaluation[n] = count()
    with torch.no_grad():
        sparse(on_device[0])
        with counting_syncs(device) as count:
            for _ in range(3):
                sparse(on_device[0])
            forward = count()
    return {
        "calibration_per_batch": (counts[4] - counts[2]) / 2,
        "evaluation_per_batch_of_two_tasks": (evaluation[3] - evaluation[1]) / 2,
        "operator_forward_per_call": forward / 3,
    }


# ----------------------------------------------------------------------------------- 3. overhead
def overhead(device: torch.device, name: str, batch: int, repeats: int, image: int = 32) -> dict[str, Any]:
    torch.manual_seed(0)
    base = create_model(name, num_classes=10).to(device).eval()
    x = torch.rand(batch, 3, image, image, device=device)
    sparse = calibrated(create_model(name, num_classes=10).to(device).eval(), [x], 0.25)
    sparse.load_state_dict(
        {**base.state_dict(), **{k: v for k, v in sparse.state_dict().items() if "meansparse" in k}},
        strict=False,
    )

    def infer(model: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            with torch.no_grad():
                model(x)

        return run

    def input_gradient(model: nn.Module) -> Callable[[], Any]:
        def run() -> None:
            xi = x.clone().requires_grad_()
            torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)

        return run

    return {
        "model": name,
        "batch": batch,
        "operators": len(operators(sparse)),
        "no_grad": paired({"base": infer(base), "meansparse": infer(sparse)}, device, repeats),
        "input_gradient": paired(
            {"base": input_gradient(base), "meansparse": input_gradient(sparse)}, device, repeats
        ),
    }


# -------------------------------------------------------------------------------- 4. calibration
def peak_memory(fn: Callable[[], Any], device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def calibration_cost(
    device: torch.device, name: str, batch: int, batches: int, repeats: int
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).to(device).eval()
    data = [torch.rand(batch, 3, 32, 32, device=device) for _ in range(batches)]
    sparse = sparsify(model, data[0][:1])

    def inference() -> None:
        with torch.no_grad():
            for b in data:
                sparse(b)

    def statistics_pass() -> None:
        calibrate(sparse, data, progress=False)

    statistics_pass()  # the operators need statistics before the plain forward (alpha 0: the identity)
    result = paired({"inference": inference, "calibration": statistics_pass}, device, repeats)
    plain, observed = peak_memory(inference, device), peak_memory(statistics_pass, device)
    result.update(
        {
            "model": name,
            "batch": batch,
            "batches": batches,
            "kernel_path": kernels.kernel_path(device),
            "inference_peak_bytes": plain,
            "calibration_peak_bytes": observed,
            "peak_memory_ratio": None if plain is None else observed / plain,
        }
    )
    return result


# --------------------------------------------------------------------------------- 5. AutoAttack
def autoattack_throughput(device: torch.device, quick: bool) -> dict[str, Any]:
    torch.manual_seed(0)
    name, n, n_iter, n_queries = ("small_cnn", 16, 2, 20) if quick else ("resnet18", 512, 100, 5000)
    kwargs = {"in_channels": 1} if name == "small_cnn" else {}
    side = 28 if name == "small_cnn" else 32
    images = torch.rand(n, kwargs.get("in_channels", 3), side, side, device=device)
    model = calibrated(create_model(name, num_classes=10, **kwargs).to(device).eval(), [images], 0.25)
    labels = model(images).argmax(1).detach()
    eps = 8 / 255

    def package() -> None:
        run_attack(
            "autoattack", model, images, labels, eps=eps, n_iter=n_iter, n_queries=n_queries, batch_size=n
        )

    def plain() -> None:  # what a user of pyautoattack writes, with the same iteration counts
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=device)
        settings = {
            "eps": eps,
            "norm": "Linf",
            "seed": 0,
            "device": device,
            "n_iter": n_iter,
            "n_restarts": 1,
        }
        adversary.apgd = make_apgd(model, loss="ce", rho=0.75, **settings)
        adversary.apgd_targeted = make_apgd_t(model, n_target_classes=9, rho=0.75, **settings)
        adversary.fab.n_iter = n_iter
        adversary.fab.n_target_classes = 9
        adversary.square.n_queries = n_queries
        adversary.verbose = False
        adversary.run_standard_evaluation(images, labels, batch_size=n)

    result = paired({"plain_pyautoattack": plain, "package": package}, device, 1 if quick else 3)
    result["package_throughput_vs_plain"] = 1.0 / result["package_ratio"]
    result.update({"model": name, "images": n, "n_iter": n_iter, "n_queries": n_queries})
    return result


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks that everything runs")
    parser.add_argument("--output", help="write the results as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    quick = args.quick
    batch, repeats = (4, 2) if quick else (256, 20)
    torch.manual_seed(0)
    sync_model = create_model("resnet18", num_classes=10)
    sync_batches = [torch.rand(batch, 3, 32, 32) for _ in range(4)]
    results: dict[str, Any] = {
        "machine": describe_machine(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "quick": quick,
        "kernel_path": kernels.kernel_path(device),
        "operator": operator_checks(device, quick),
        "syncs": sync_counts(device, sync_model, sync_batches),
        "overhead": [
            overhead(device, name, batch, repeats)
            for name in (["resnet18"] if quick else ["resnet18", "wrn_28_10"])
        ],
        "calibration": calibration_cost(device, "resnet18", batch, 2 if quick else 8, repeats),
        "autoattack": autoattack_throughput(device, quick),
    }
    write_json(args.output, results)
    print(report(results))
    return results


def report(results: dict[str, Any]) -> str:
    operator_rows = results["operator"]
    worst_flip = max(r["outputs_off_the_float32_band"] for r in operator_rows)
    lines = [
        f"GPU check on {results['device']} ({results['machine']}); kernel path for large inputs: "
        f"{results['kernel_path']}",
        f"- operator: {len(operator_rows)} cases (dtype x layout x backward); forward equal to the CPU path in "
        f"{sum(r['forward_equals_cpu'] for r in operator_rows)}; decisions off the float32 band: {worst_flip}; "
        f"largest input-gradient difference vs CPU: {max(r['gradient_max_abs_diff_vs_cpu'] for r in operator_rows):.3g}",
        f"- syncs: {results['syncs']}",
    ]
    for row in results["overhead"]:
        lines.append(
            f"- overhead {row['model']} batch {row['batch']}: no-grad {row['no_grad']['meansparse_ratio']:.3f}x, "
            f"forward + input gradient {row['input_gradient']['meansparse_ratio']:.3f}x"
        )
    cal = results["calibration"]
    memory = "n/a" if cal["peak_memory_ratio"] is None else f"{cal['peak_memory_ratio']:.3f}x"
    lines.append(f"- calibration vs inference: time {cal['calibration_ratio']:.3f}x, peak memory {memory}")
    aa = results["autoattack"]
    lines.append(
        f"- AutoAttack-standard throughput, package vs plain pyautoattack: {aa['package_throughput_vs_plain']:.3f}x"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
