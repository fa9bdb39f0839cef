"""Cost of MeanSparse operators at every activation of a ResNet-18, against the same model without them.

Cases, all on the same weights and the same batch, interleaved (see ``benchmarks/common.py``):

* ``base``: ResNet-18 (CIFAR shape) without operators;
* ``meansparse default``: operators at all 17 activation sites, calibrated, alpha 0.25, the default path
  (each operator fused with the ReLU after it into one CPU kernel, cached band tensors);
* ``meansparse, ReLU not fused``: the same with ``fuse_activations=False``: a fused operator kernel, then the
  model's own ReLU call (the default before activation fusion);
* ``meansparse fused, fresh outputs``: the default path without reusing output memory (every call writes
  into a newly allocated tensor, as plain PyTorch ops do);
* ``meansparse eager``: the same operators with the fused kernels switched off (the eager ``torch.where``
  formula, band tensors cached, then the ReLU);
* ``meansparse original``: the operator forward as it was before the speed work (band tensors rebuilt on
  every call, eager formula through the autograd Function with a saved boolean mask);
* ``published module``: a re-implementation of the RobustBench MeanSparse module's forward (flag-guarded
  clone + per-batch mean/var bookkeeping, then ``torch.where(|x - mean| < threshold * sqrt(var), mean, x)``).

Two measurements: ``forward`` (no grad, inference) and ``forward + backward`` with respect to the input with
the parameters frozen, as inside an attack (exact backward; the default path is also timed with the
straight-through backward that BPDA uses).

    .venv/bin/python benchmarks/operator_overhead.py            # batch 128, 7 repeats, 2 threads
    .venv/bin/python benchmarks/operator_overhead.py --repeats 3 --batch-size 64
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import types

import torch
import torch.nn.functional as F
from common import describe_machine, interleaved, machine, summarize, table, write_json
from torch import nn

from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.errors import UncalibratedOperatorError
from meansparse_pl.models import create_model
from meansparse_pl.ops import MeanSparse, backward_mode, fused_kernels, kernels, operators
from meansparse_pl.ops.functions import SPARSIFY_BY_MODE


class PublishedMeanSparse(nn.Module):
    """The forward of the published RobustBench MeanSparse module (buffers ``running_mean``, ``running_var``,
    ``threshold``, ``flag_update_statistics``, ``batch_num``), statistics updates switched off as in use."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.register_buffer("threshold", torch.tensor(threshold))
        self.register_buffer("flag_update_statistics", torch.tensor(0))
        self.register_buffer("batch_num", torch.tensor(1.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.flag_update_statistics:
            self.running_mean += torch.mean(x.detach().clone(), dim=(0, 2, 3)) / self.batch_num
            self.running_var += torch.var(x.detach().clone(), dim=(0, 2, 3)) / self.batch_num
        bias = self.running_mean.view(1, self.running_mean.shape[0], 1, 1)
        crop = self.threshold * torch.sqrt(self.running_var.view(1, self.running_var.shape[0], 1, 1))
        if self.threshold == 0:
            return x
        return torch.where(torch.abs(x - bias) < crop, bias, x)


def original_forward(self: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    """MeanSparse.forward before the speed work: band rebuilt per call, always through the autograd Function."""
    if self.observer is not None:
        self.observer(x)
        return x
    if not self.is_calibrated:
        raise UncalibratedOperatorError("uncalibrated")
    if self._alpha_value == 0.0:
        return x
    threshold = self.alpha * torch.sqrt(self.var)
    shape = [1] * x.dim()
    shape[self.channel_dim] = self.num_channels
    dtype = torch.promote_types(x.dtype, self.mean.dtype)
    centre, threshold = self.mean.to(dtype).view(shape), threshold.to(dtype).view(shape)
    return SPARSIFY_BY_MODE[self.backward_mode](x, centre, threshold)


@contextlib.contextmanager
def output_reuse(enabled: bool):
    """Switch the fused kernels' output-memory reuse (``kernels.OUTPUTS``) for one measurement."""
    cache = kernels.OUTPUTS
    previous = cache.per_geometry
    cache.per_geometry = previous if enabled else 0
    try:
        yield
    finally:
        cache.per_geometry = previous


def replace_operators(model: nn.Module, factory) -> nn.Module:
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, MeanSparse):
                setattr(module, child_name, factory(child))
        del name
    return model


def replaced_fraction(model: nn.Module, x: torch.Tensor) -> float:
    """Fraction of operator input elements the operators overwrite with the channel mean."""
    changed, total = [0], [0]

    def hook(module, args, out):
        changed[0] += int((out != args[0]).sum())
        total[0] += out.numel()

    handles = [op.register_forward_hook(hook) for op in operators(model)]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return changed[0] / max(total[0], 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--alpha", type=float, default=0.25)
    parser.add_argument("--calibration-images", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-backward", action="store_true", help="time the forward only")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    shape = (3, args.image_size, args.image_size)
    base = create_model(args.model, num_classes=10).eval()
    calibration = torch.rand(args.calibration_images, *shape)
    x = torch.rand(args.batch_size, *shape)
    y = torch.randint(0, 10, (args.batch_size,))

    sparse = sparsify(copy.deepcopy(base), x[:2])
    calibrate(sparse, list(calibration.split(64)), progress=False)
    set_alpha(sparse, args.alpha)
    # the operators' state is the same with and without the ReLU fused into them
    unfused = sparsify(copy.deepcopy(base), x[:2], fuse_activations=False)
    unfused.load_state_dict(sparse.state_dict())
    original = copy.deepcopy(unfused)
    for op in operators(original):
        op.forward = types.MethodType(original_forward, op)
    published = replace_operators(
        copy.deepcopy(unfused), lambda op: PublishedMeanSparse(op.mean, op.var, float(op.alpha))
    )
    for model in (base, sparse, unfused, original, published):
        model.requires_grad_(False)  # parameters frozen, as inside an attack

    fraction = replaced_fraction(unfused, x)  # fused operators also apply the ReLU: compare before it
    with torch.no_grad():
        reference = sparse(x)
        with fused_kernels(False):
            assert torch.equal(sparse(x), reference)
        assert torch.equal(unfused(x), reference)
        assert torch.equal(original(x), reference) and torch.equal(published(x), reference)

    def forward(model: nn.Module, fused: bool = True, reuse: bool = True):
        def run() -> None:
            with fused_kernels(fused), output_reuse(reuse), torch.no_grad():
                model(x)

        return run

    def forward_backward(model: nn.Module, fused: bool = True, mode: str = "exact", reuse: bool = True):
        def run() -> None:
            xi = x.clone().requires_grad_()
            with fused_kernels(fused), output_reuse(reuse), backward_mode(sparse, mode):
                F.cross_entropy(model(xi), y).backward()

        return run

    print(f"machine: {describe_machine()}")
    print(
        f"{args.model}, input {tuple(x.shape)}, {len(operators(sparse))} operators, alpha {args.alpha:g}: "
        f"{100 * fraction:.1f}% of the operator inputs are replaced by the channel mean"
    )
    results = {}
    forward_cases = {
        "base": forward(base),
        "meansparse default": forward(sparse),
        "meansparse, ReLU not fused": forward(unfused),
        "meansparse fused, fresh outputs": forward(sparse, reuse=False),
        "meansparse eager": forward(sparse, fused=False),
        "meansparse original": forward(original),
        "published module": forward(published),
    }
    times = interleaved(
        forward_cases, args.repeats, on_repeat=lambda r, t: print(f"  forward repeat {r}", flush=True)
    )
    results["forward"] = summarize(times, "base")
    print(table(results["forward"], f"forward, no grad (batch {args.batch_size}, {args.repeats} repeats)"))

    if not args.skip_backward:
        backward_cases = {
            "base": forward_backward(base),
            "meansparse default": forward_backward(sparse),
            "meansparse default, straight-through": forward_backward(sparse, mode="straight_through"),
            "meansparse, ReLU not fused": forward_backward(unfused),
            "meansparse fused, fresh outputs": forward_backward(sparse, reuse=False),
            "meansparse eager": forward_backward(sparse, fused=False),
            "meansparse original": forward_backward(original),
            "published module": forward_backward(published),
        }
        times = interleaved(
            backward_cases, args.repeats, on_repeat=lambda r, t: print(f"  backward repeat {r}", flush=True)
        )
        results["forward_backward"] = summarize(times, "base")
        print(
            table(
                results["forward_backward"],
                f"forward + backward w.r.t. the input, parameters frozen (batch {args.batch_size}, "
                f"{args.repeats} repeats)",
            )
        )

    for name in ("forward", "forward_backward"):
        if name in results:
            row = results[name]["meansparse default"]
            print(
                f"{name}: default path / base = {row['ratio_of_medians']:.3f} (ratio of medians), "
                f"{row['median_paired_ratio']:.3f} (median paired ratio); target <= 1.05"
            )
    write_json(
        args.json,
        {"args": vars(args), "machine": machine(), "replaced_fraction": fraction, "results": results},
    )


if __name__ == "__main__":
    main()
