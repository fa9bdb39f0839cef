"""The fast paths give the same numbers as the reference paths.

* The fused CPU operator kernel (torch.compile / inductor) against the eager formula and a float64 brute force:
  bit for bit, every dtype, layout and special value, both backward modes.
* The cached band tensors follow every change of alpha, statistics and buffers.
* The one-read fused moments kernel against the float64 two-pass formula.

No timing is asserted here; the benchmarks in ``benchmarks/`` measure speed.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from conftest import FunctionalResNet, make_batches, randomize_batchnorm

import meansparse_pl.statistics as statistics_module
from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.ops import MeanSparse, fused_kernels, kernels, operators
from meansparse_pl.statistics import batch_moments

INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16}
INT_OF[torch.bfloat16] = torch.int16


def bits(t: torch.Tensor) -> torch.Tensor:
    """Bit patterns: equality that also tells NaN payloads and -0.0 from +0.0."""
    return t.contiguous().view(INT_OF[t.dtype])


def _operator(channels: int, channel_dim: int, alpha: float, seed: int, **kwargs) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, channel_dim, alpha=alpha, **kwargs)
    op.set_statistics(0.7 * torch.randn(channels, generator=g), 0.05 + torch.rand(channels, generator=g), 100)
    return op


def _input(op: MeanSparse, shape, dtype, seed: int, channels_last: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    view = [1] * len(shape)
    view[op.channel_dim] = -1
    x = op.mean.view(view) + op.var.sqrt().view(view) * torch.randn(shape, generator=g)
    flat = x.view(-1)
    # special values: exact centres, the band edges (as computed in float32), signed zeros, inf and NaN
    flat[0], flat[1], flat[2], flat[3], flat[4] = math.nan, math.inf, -math.inf, 0.0, -0.0
    x = x.to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _eager_and_fused(op: MeanSparse, x: torch.Tensor, grad_seed: int):
    results = []
    for fused in (False, True):
        with fused_kernels(fused):
            with torch.no_grad():
                no_grad_out = op(x)
            xg = x.detach().clone(memory_format=torch.preserve_format).requires_grad_()
            out = op(xg)
            upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(grad_seed)).to(x.dtype)
            out.backward(upstream)
        results.append((no_grad_out, out.detach(), xg.grad))
    return results


CASES = {
    "NCHW-float32": ((6, 5, 7, 9), 1, torch.float32, False),
    "NCHW-channels-last": ((6, 5, 7, 9), 1, torch.float32, True),
    "NLC-float32": ((4, 11, 5), -1, torch.float32, False),
    "NC-float32": ((40, 5), 1, torch.float32, False),
    "NCHW-float64": ((3, 5, 6, 6), 1, torch.float64, False),
    "NCHW-float16": ((6, 5, 7, 9), 1, torch.float16, False),
    "NCHW-bfloat16": ((6, 5, 7, 9), 1, torch.bfloat16, False),
}


@pytest.mark.parametrize("mode", ["exact", "straight_through"])
@pytest.mark.parametrize("case", list(CASES))
def test_fused_kernel_is_bit_identical_to_the_eager_formula(case, mode, fused_everywhere):
    shape, channel_dim, dtype, channels_last = CASES[case]
    op = _operator(5, channel_dim, 0.6, seed=1, backward_mode=mode)
    if dtype == torch.float64:
        op.double()
    x = _input(op, shape, dtype, seed=2, channels_last=channels_last)
    (eager_ng, eager_out, eager_grad), (fused_ng, fused_out, fused_grad) = _eager_and_fused(op, x, 3)
    assert "_sparsify_kernel" in fused_everywhere  # the fused kernel really ran
    assert (mode == "exact") == ("_exact_grad_kernel" in fused_everywhere)
    for eager, fused in ((eager_ng, fused_ng), (eager_out, fused_out), (eager_grad, fused_grad)):
        assert fused.dtype == eager.dtype == x.dtype
        assert fused.shape == eager.shape
        assert torch.equal(bits(fused), bits(eager))
    if channels_last:
        assert fused_out.is_contiguous(memory_format=torch.channels_last)
    changed = (eager_out != x) & ~x.isnan()
    assert 0.2 * x.numel() < changed.sum() < 0.8 * x.numel()  # both branches exercised
    flat = fused_out.contiguous().view(-1)
    assert flat[0].isnan() and flat[1] == math.inf and flat[2] == -math.inf


def test_fused_kernel_matches_the_float64_brute_force_at_the_band_edges(fused_everywhere):
    """Values one ulp either side of both edges and exactly on them, in float32 (strict <)."""
    op = MeanSparse(1, alpha=0.5)
    op.set_statistics(torch.tensor([0.5]), torch.tensor([0.25]), 1)  # band (0.25, 0.75), all exact
    inf = torch.tensor(math.inf)
    lo, hi = torch.tensor(0.25), torch.tensor(0.75)
    edges = torch.stack(
        [
            lo,
            hi,
            lo.nextafter(inf),
            hi.nextafter(-inf),
            lo.nextafter(-inf),
            hi.nextafter(inf),
            torch.tensor(0.5),
        ]
    )
    x = edges.repeat(300).view(1, 1, -1)
    expected = torch.tensor([0.25, 0.75, 0.5, 0.5, edges[4].item(), edges[5].item(), 0.5]).repeat(300)
    with fused_kernels(True):
        out = op(x)
    assert fused_everywhere == ["_sparsify_kernel"]
    assert torch.equal(out.flatten(), expected)


def test_fused_path_handles_non_contiguous_inputs_through_the_eager_formula(fused_everywhere):
    op = _operator(5, 1, 0.5, seed=4)
    x = _input(op, (6, 5, 9, 4), torch.float32, seed=5).transpose(2, 3)  # neither contiguous nor NHWC
    assert not x.is_contiguous()
    with fused_kernels(False):
        expected = op(x)
    with fused_kernels(True):
        out = op(x)
    assert torch.equal(bits(out), bits(expected))


def test_default_threshold_keeps_small_inputs_eager():
    op = _operator(5, 1, 0.5, seed=6)
    assert kernels.FUSED_MIN_NUMEL > 5 * 16
    calls = []
    original = kernels.run_compiled
    kernels.run_compiled = lambda fn, *a: calls.append(fn) or original(fn, *a)
    try:
        op(torch.randn(2, 5, 4, 2))
    finally:
        kernels.run_compiled = original
    assert calls == []


def test_fused_path_under_inference_mode_then_with_gradients(fused_everywhere):
    """The band cache built under inference_mode must still be usable by a later call that saves it for
    backward (inference tensors cannot be saved)."""
    op = _operator(5, 1, 0.5, seed=7)
    x = _input(op, (4, 5, 6, 6), torch.float32, seed=8)
    with torch.inference_mode():
        first = op(x)
    xg = x.clone().requires_grad_()
    out = op(xg)
    out.sum().backward()
    assert torch.equal(bits(out.detach()), bits(first))
    assert xg.grad is not None


def test_fused_kernel_failure_falls_back_with_one_warning(monkeypatch, fused_everywhere):
    op = _operator(5, 1, 0.5, seed=9)
    x = _input(op, (4, 5, 6, 6), torch.float32, seed=10)
    with fused_kernels(False):
        expected = op(x)

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(kernels, "_COMPILED", {})
    monkeypatch.setattr(kernels, "_compile", lambda fn, variant: broken)
    with pytest.warns(RuntimeWarning, match="falling back"):
        out = op(x)
    assert torch.equal(bits(out), bits(expected))
    assert not kernels.fused_device(x.device)  # off on this device type only
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(bits(op(x)), bits(expected))  # eager from now on, no further warning


# ------------------------------------------------------------------------------------------ band cache
def _fresh_reference(op: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    """The published formula computed from the buffers as they are now, without any cache."""
    shape = [1] * x.dim()
    shape[op.channel_dim] = -1
    mean = op.mean.view(shape)
    threshold = op.alpha * torch.sqrt(op.var.view(shape))
    return torch.where(torch.abs(x - mean) < threshold, mean, x)


@pytest.mark.parametrize("fused", [False, True])
def test_band_cache_follows_every_change(fused, fused_everywhere):
    op = _operator(5, 1, 0.5, seed=11)
    x = _input(op, (4, 5, 6, 6), torch.float32, seed=12)[1:]  # drop the special values: plain comparison
    x = x.contiguous()
    with fused_kernels(fused):

        def check():
            assert torch.equal(op(x), _fresh_reference(op, x))

        check()
        op.set_alpha(0.9)
        check()
        g = torch.Generator().manual_seed(13)
        op.set_statistics(torch.randn(5, generator=g), torch.rand(5, generator=g) + 0.2, 50)
        check()
        with torch.no_grad():
            op.mean.add_(0.3)  # a direct in-place write
        check()
        op.var = op.var * 2.0  # a replaced buffer
        check()
        other = _operator(5, 1, 0.25, seed=14)
        op.load_state_dict(other.state_dict())
        check()
        op.centre = "zero"
        assert not torch.equal(op(x), _fresh_reference(op, x))  # the reference ignores the centre setting
        op.centre = "channel_mean"
        check()
        op.double()
        assert op(x.double()).dtype == torch.float64
        assert torch.equal(op(x.double()), _fresh_reference(op, x.double()))


def test_cached_band_is_not_an_inference_tensor():
    op = _operator(5, 1, 0.5, seed=15)
    with torch.inference_mode():
        op(torch.randn(2, 5, 3, 3))
    (entry,) = op._band_cache.values()
    band = entry[1]
    tensors = [band.centre, band.threshold, band.centre_out, *band.flat]
    assert not any(t.is_inference() for t in tensors)


# ----------------------------------------------------------------------------------- fused statistics
def _reference_moments(x: torch.Tensor, channel_dim: int):
    channel_dim = channel_dim % x.dim()
    flat = x.double().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    mean = flat.sum(0) / flat.shape[0]
    return mean, ((flat - mean) ** 2).sum(0), flat.shape[0]


MOMENT_CASES = {
    "offset-NCHW": (
        lambda g: 1000.0 + torch.arange(6.0).view(1, -1, 1, 1) + 0.01 * torch.randn(8, 6, 9, 9, generator=g),
        1,
    ),
    "heavy-tailed": (lambda g: torch.randn(8, 6, 9, 9, generator=g).exp().square(), 1),
    "channels-last": (
        lambda g: (3 * torch.randn(8, 6, 9, 9, generator=g) - 2).contiguous(
            memory_format=torch.channels_last
        ),
        1,
    ),
    "NLC": (lambda g: 5 + torch.randn(8, 40, 6, generator=g), -1),
    "float64": (lambda g: 7 * torch.randn(8, 6, 9, 9, generator=g, dtype=torch.float64), 1),
    "float16": (lambda g: torch.randn(8, 6, 9, 9, generator=g).half(), 1),
}


@pytest.mark.parametrize("case", list(MOMENT_CASES))
def test_fused_moments_equal_the_float64_two_pass_formula(case, monkeypatch, fused_everywhere):
    factory, channel_dim = MOMENT_CASES[case]
    x = factory(torch.Generator().manual_seed(16))
    used = []
    original = statistics_module._fused_moments
    monkeypatch.setattr(statistics_module, "_fused_moments", lambda *a: used.append(1) or original(*a))
    moments = batch_moments(x, channel_dim)
    mean, m2, count = _reference_moments(x, channel_dim)
    assert used and float(moments.count) == count
    assert moments.mean.dtype == moments.m2.dtype == torch.float64
    sigma = (m2 / count).sqrt()
    assert ((moments.mean - mean).abs() / torch.maximum(mean.abs(), sigma)).max() < 1e-12
    assert ((moments.m2 - m2).abs() / m2).max() < 1e-12
    with fused_kernels(False):  # the eager path: float32 per sample, float64 merge; its contract is 1e-6
        eager = batch_moments(x, channel_dim)
    assert ((eager.mean - moments.mean).abs() / torch.maximum(mean.abs(), sigma)).max() < 1e-6
    assert ((eager.m2 - moments.m2).abs() / m2).max() < 1e-6


def test_fused_and_eager_calibration_agree(fused_everywhere):
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 40, 16, seed=17)
    with fused_kernels(False):
        calibrate(model, batches, progress=False)
    eager = [(op.mean.clone(), op.var.clone(), int(op.count)) for op in operators(model)]
    calibrate(model, batches, progress=False)
    for op, (mean, var, count) in zip(operators(model), eager, strict=True):
        assert int(op.count) == count
        torch.testing.assert_close(op.mean, mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(op.var, var, rtol=1e-6, atol=0)
    # and the calibrated model gives the same outputs on both operator paths
    set_alpha(model, 0.4)
    x = batches[0]
    with fused_kernels(False):
        expected = model(x)
    assert torch.equal(model(x), expected)


# -------------------------------------------------------------------------------------- output reuse
@pytest.fixture
def fresh_output_cache(monkeypatch):
    cache = kernels.OutputCache(geometries=8, per_geometry=2)
    monkeypatch.setattr(kernels, "OUTPUTS", cache)
    return cache


def _reference(op: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    with fused_kernels(False):
        return op(x)


def test_reused_output_memory_never_overwrites_a_live_output(fused_everywhere, fresh_output_cache):
    op = _operator(5, 1, 0.5, seed=20)
    x1, x2, x3 = (_input(op, (4, 5, 6, 6), torch.float32, seed=s)[1:].contiguous() for s in (21, 22, 23))
    first = op(x1)
    kept = first.clone()
    second = op(x2)  # the first output is alive: new memory
    third = op(x3)  # both alive and the geometry's two slots taken: plain allocation
    assert len({first.data_ptr(), second.data_ptr(), third.data_ptr()}) == 3
    assert torch.equal(first, kept)
    assert torch.equal(second, _reference(op, x2)) and torch.equal(third, _reference(op, x3))
    view = first[1:]  # a view keeps the memory in use too
    address = first.data_ptr()
    del first
    again = op(x1)
    assert again.data_ptr() != address and torch.equal(view, kept[1:])
    del view, again, second, third
    reused = op(x2)
    assert reused.data_ptr() == address  # everything over that memory is gone: reused
    assert torch.equal(reused, _reference(op, x2))
    array = reused.numpy()  # numpy arrays over the memory count as users as well
    del reused
    assert op(x3).data_ptr() != array.ctypes.data


def test_in_place_changes_to_an_output_do_not_leak_into_the_next_call(fused_everywhere, fresh_output_cache):
    op = _operator(5, 1, 0.5, seed=24)
    x = _input(op, (4, 5, 6, 6), torch.float32, seed=25)[1:].contiguous()
    out = op(x)
    out.relu_().mul_(3)  # an in-place activation after the operator
    del out
    assert torch.equal(op(x), _reference(op, x))


def test_outputs_saved_for_backward_by_the_next_layer(fused_everywhere, fresh_output_cache):
    """GELU saves its input (the operator's output) for backward: that memory must not be reused before the
    backward has run, and the gradients must equal the eager path's."""
    ops = [_operator(5, 1, 0.4, seed=26 + i) for i in range(3)]
    x = _input(ops[0], (4, 5, 6, 6), torch.float32, seed=29)[1:].contiguous()

    def run(fused: bool):
        xg = x.clone().requires_grad_()
        with fused_kernels(fused):
            h = xg
            for op in ops:
                h = torch.nn.functional.gelu(op(h))
            h.square().sum().backward()
        return h.detach(), xg.grad

    (out, grad), (ref_out, ref_grad) = run(True), run(False)
    assert torch.equal(out, ref_out) and torch.equal(grad, ref_grad)


def test_output_reuse_is_thread_safe(fused_everywhere, fresh_output_cache):
    import threading

    op = _operator(5, 1, 0.5, seed=30)
    inputs = [_input(op, (4, 5, 6, 6), torch.float32, seed=31 + i)[1:].contiguous() for i in range(4)]
    expected = [_reference(op, x) for x in inputs]
    failures = []

    def work(i: int) -> None:
        for _ in range(30):
            if not torch.equal(op(inputs[i]), expected[i]):
                failures.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert failures == []


def test_copies_of_an_operator_drop_the_band_cache():
    import copy
    import pickle

    op = _operator(5, 1, 0.5, seed=35)
    x = torch.randn(3, 5, 2)
    op(x)
    assert op._band_cache
    for clone in (copy.deepcopy(op), pickle.loads(pickle.dumps(op))):
        assert clone._band_cache == {}
        assert torch.equal(clone(x), op(x))
