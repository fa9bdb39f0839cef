"""Tests of the MeanSparse operator against independent computations (float64 brute force, a reimplementation of
the published RobustBench module, hand-derived gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import FunctionalResNet, MethodReluNet, make_batches
from torch import nn

from meansparse_pl import backward_mode, calibrate, get_alpha, set_alpha, sparsify
from meansparse_pl.errors import (
    ConfigurationError,
    PlacementError,
    StatisticsError,
    UncalibratedOperatorError,
)
from meansparse_pl.ops import MeanSparse, operators, set_backward_mode, temporary_alpha

pytestmark = pytest.mark.usefixtures("single_thread")

# Dyadic statistics: every mean, sigma = sqrt(var) and alpha * sigma is exactly representable in float32, so a
# float64 brute force and the float32 operator must agree bit for bit (no rounding of the threshold).
MEANS = torch.tensor([0.5, -0.25, 1.375, 0.0, -2.0])
SIGMAS = torch.tensor([0.5, 1.0, 0.25, 2.0, 1.5])
ALPHA = 0.75


def calibrated_op(
    mean: torch.Tensor, var: torch.Tensor, alpha: float, channel_dim: int = 1, **kwargs
) -> MeanSparse:
    op = MeanSparse(mean.numel(), channel_dim, alpha=alpha, **kwargs)
    op.set_statistics(mean, var, count=100.0)
    return op


def brute_force(x: torch.Tensor, mean, var, alpha: float, channel_dim: int, centre=None) -> torch.Tensor:
    """where(|x - centre| < alpha * sqrt(var), centre, x) elementwise in float64 (centre = mean by default)."""
    shape = [1] * x.dim()
    shape[channel_dim] = -1
    x64 = x.double()
    c = (mean if centre is None else centre).double().view(shape)
    threshold = alpha * var.double().sqrt().view(shape)
    return torch.where((x64 - c).abs() < threshold, c.expand_as(x64), x64)


class PublishedMeanSparse(nn.Module):
    """The forward of the published RobustBench MeanSparse module (buffers running_mean / running_var /
    threshold), re-implemented from its documented behaviour for a bit-exactness comparison."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, threshold: float) -> None:
        super().__init__()
        self.register_buffer("running_mean", mean.clone())
        self.register_buffer("running_var", var.clone())
        self.register_buffer("threshold", torch.tensor(threshold))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.threshold == 0:
            return x
        bias = self.running_mean.view(1, self.running_mean.shape[0], 1, 1)
        crop = self.threshold * torch.sqrt(self.running_var.view(1, self.running_var.shape[0], 1, 1))
        return torch.where(torch.abs(x - bias) < crop, bias, x)


# ---------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize(
    ("shape", "channel_dim"),
    [((4, 5, 6, 7), 1), ((4, 9, 5), -1), ((3, 4, 4, 5), -1), ((16, 5), 1)],
    ids=["NCHW-dim1", "NLC-dim-1", "NHWC-dim-1", "NC-dim1"],
)
def test_forward_equals_float64_brute_force(shape, channel_dim):
    g = torch.Generator().manual_seed(1)
    view = [1] * len(shape)
    view[channel_dim] = -1
    x = MEANS.view(view) + SIGMAS.view(view) * torch.randn(shape, generator=g)
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA, channel_dim)
    out = op(x)
    expected = brute_force(x, MEANS, SIGMAS.square(), ALPHA, channel_dim)
    assert out.dtype == torch.float32
    assert torch.equal(out.double(), expected)
    replaced = (out != x).sum().item()
    assert 0.2 * x.numel() < replaced < 0.8 * x.numel()  # both branches are exercised


def test_strict_inequality_at_the_boundary():
    # mu = 0.5, var = 0.25 (sigma 0.5), alpha = 0.5 -> threshold 0.25, band (0.25, 0.75); all exact in float32
    op = calibrated_op(torch.tensor([0.5]), torch.tensor([0.25]), 0.5)
    inf = torch.tensor(math.inf)
    lo, hi = torch.tensor(0.25), torch.tensor(0.75)
    values = torch.stack(
        [
            lo,  # exactly on mu - threshold: outside (strict <)
            hi,  # exactly on mu + threshold: outside
            torch.nextafter(lo, inf),  # one ulp inside
            torch.nextafter(hi, -inf),  # one ulp inside
            torch.nextafter(lo, -inf),  # one ulp outside
            torch.nextafter(hi, inf),  # one ulp outside
            torch.tensor(0.5),  # the mean
        ]
    )
    x = values.view(1, 1, -1)
    out = op(x).flatten()
    expected = torch.tensor([0.25, 0.75, 0.5, 0.5, values[4].item(), values[5].item(), 0.5])
    assert torch.equal(out, expected)


def test_alpha_zero_is_the_identity():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 5, 4, 4, generator=g)
    x[0, :, 0, 0] = MEANS  # values exactly at the mean stay untouched too
    op = calibrated_op(MEANS, SIGMAS.square(), 0.0)
    snapshot = x.clone()
    out = op(x)
    assert out is x
    assert torch.equal(out, snapshot)


@pytest.mark.parametrize("alpha", [0.0, 0.05, 0.25, 1.0 / 3.0, 0.7, 2.0])
def test_bit_identical_to_the_published_module(alpha):
    g = torch.Generator().manual_seed(3)
    channels = 11
    mean = 0.7 * torch.randn(channels, generator=g)
    var = 0.05 + 3 * torch.rand(channels, generator=g)
    x = mean.view(1, -1, 1, 1) + var.sqrt().view(1, -1, 1, 1) * torch.randn(8, channels, 9, 9, generator=g)
    published = PublishedMeanSparse(mean, var, alpha)
    ours = calibrated_op(mean, var, alpha)
    expected = published(x)
    out = ours(x)
    assert torch.equal(out, expected)
    if alpha > 0:
        assert not torch.equal(out, x)


def test_published_state_maps_onto_the_operator():
    """Same numbers through the published buffer names: mean <- running_mean, var <- running_var."""
    g = torch.Generator().manual_seed(4)
    mean, var = torch.randn(6, generator=g), torch.rand(6, generator=g) + 0.1
    published = PublishedMeanSparse(mean, var, 0.35)
    ours = MeanSparse(6)
    ours.set_statistics(published.running_mean, published.running_var, count=1.0)
    ours.set_alpha(float(published.threshold))
    x = torch.randn(2, 6, 5, 5, generator=g)
    assert torch.equal(ours(x), published(x))


# --------------------------------------------------------------------------------------------- backward
def test_exact_backward_is_zero_inside_the_band_and_upstream_outside():
    g = torch.Generator().manual_seed(5)
    x = (MEANS.view(1, -1, 1) + SIGMAS.view(1, -1, 1) * torch.randn(6, 5, 8, generator=g)).requires_grad_()
    upstream = torch.randn(6, 5, 8, generator=g)
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA)
    op(x).backward(upstream)
    inside = (x.detach().double() - MEANS.double().view(1, -1, 1)).abs() < ALPHA * SIGMAS.double().view(
        1, -1, 1
    )
    assert 0 < inside.sum() < inside.numel()
    expected = torch.where(inside, torch.zeros_like(upstream), upstream)
    assert torch.equal(x.grad, expected)


def _points_away_from_the_boundary(mean, sigma, alpha, shape, margin, generator):
    view = [1] * len(shape)
    view[1] = -1
    m, s = mean.double().view(view), sigma.double().view(view)
    x = m + s * torch.randn(shape, generator=generator, dtype=torch.float64)
    distance = (x - m).abs() - alpha * s
    too_close = distance.abs() < margin
    return torch.where(too_close, x + 4 * margin * torch.sign(x - m), x)


def test_exact_backward_passes_gradcheck():
    g = torch.Generator().manual_seed(6)
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA)
    x = _points_away_from_the_boundary(MEANS, SIGMAS, ALPHA, (3, 5, 4), 1e-3, g).requires_grad_()
    assert torch.autograd.gradcheck(op, (x,), eps=1e-6, atol=1e-8)
    inside = (
        (x.detach() - MEANS.double().view(1, -1, 1)).abs() < ALPHA * SIGMAS.double().view(1, -1, 1)
    ).sum()
    assert 0 < inside < x.numel()  # gradcheck saw both zero and identity entries


def test_straight_through_backward_is_the_identity():
    g = torch.Generator().manual_seed(7)
    x = (MEANS.view(1, -1) + SIGMAS.view(1, -1) * torch.randn(40, 5, generator=g)).requires_grad_()
    upstream = torch.randn(40, 5, generator=g)
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA, backward_mode="straight_through")
    out = op(x)
    assert torch.equal(out.detach().double(), brute_force(x.detach(), MEANS, SIGMAS.square(), ALPHA, 1))
    out.backward(upstream)
    assert torch.equal(x.grad, upstream)


def _model_with_operators(modes: list[str]) -> nn.Module:
    ops = [calibrated_op(MEANS, SIGMAS.square(), ALPHA, backward_mode=mode) for mode in modes]
    return nn.Sequential(*ops)


def test_backward_mode_context_manager_switches_and_restores():
    model = _model_with_operators(["exact", "straight_through", "exact"])
    x = (MEANS.view(1, -1) + torch.randn(30, 5)).requires_grad_()
    with backward_mode(model, "straight_through") as same:
        assert same is model
        assert [op.backward_mode for op in operators(model)] == ["straight_through"] * 3
        model(x).sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))  # identity backward through all three operators
    assert [op.backward_mode for op in operators(model)] == ["exact", "straight_through", "exact"]
    with backward_mode(model, "exact"):
        assert [op.backward_mode for op in operators(model)] == ["exact"] * 3
    assert [op.backward_mode for op in operators(model)] == ["exact", "straight_through", "exact"]


def test_backward_mode_context_manager_restores_on_exception():
    model = _model_with_operators(["exact", "exact"])
    with pytest.raises(RuntimeError, match="boom"), backward_mode(model, "straight_through"):
        assert all(op.backward_mode == "straight_through" for op in operators(model))
        raise RuntimeError("boom")
    assert [op.backward_mode for op in operators(model)] == ["exact", "exact"]


def test_temporary_alpha_sets_every_operator_and_restores_each_own_value_even_on_exception():
    model = _model_with_operators(["exact", "exact", "exact"])
    set_alpha(model, [0.1, 0.2, 0.3])
    x = MEANS.view(1, -1) + 0.01 * torch.randn(30, 5)  # inside every band at alpha >= 0.1
    with temporary_alpha(model, 0.0):
        assert [float(op.alpha) for op in operators(model)] == [0.0] * 3
        assert torch.equal(model(x), x)  # alpha 0: every operator is the identity
    assert [float(op.alpha) for op in operators(model)] == pytest.approx([0.1, 0.2, 0.3])
    with pytest.raises(RuntimeError, match="boom"), temporary_alpha(model):
        set_alpha(model, 0.5)
        raise RuntimeError("boom")
    assert [float(op.alpha) for op in operators(model)] == pytest.approx([0.1, 0.2, 0.3])
    with temporary_alpha(nn.Linear(2, 2), 0.0):  # no operators: nothing to set or restore
        pass


def test_invalid_backward_mode_is_rejected():
    model = _model_with_operators(["exact"])
    with pytest.raises(ConfigurationError):
        set_backward_mode(model, "bpda")
    with pytest.raises(ConfigurationError), backward_mode(model, "bpda"):
        pass
    assert operators(model)[0].backward_mode == "exact"
    with pytest.raises(ConfigurationError):
        MeanSparse(3, backward_mode="bpda")


# ---------------------------------------------------------------------------------------------- centres
def test_centre_zero_uses_zero_and_the_channel_sigma():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(10, 5, 3, generator=g) * 2
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA, centre="zero")
    expected = brute_force(x, MEANS, SIGMAS.square(), ALPHA, 1, centre=torch.zeros(5))
    assert torch.equal(op(x).double(), expected)
    # hand check of one element per side: |x| < alpha * sigma -> 0, otherwise x
    small = torch.tensor([[0.3, 0.7, 0.1, 1.4, -1.1]]).view(1, 5, 1)  # thresholds 0.375 .75 .1875 1.5 1.125
    assert torch.equal(op(small).flatten(), torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0]))
    big = torch.tensor([[0.5, -0.8, 0.2, 1.6, 1.2]]).view(1, 5, 1)
    assert torch.equal(op(big), big)


def test_centre_global_mean_uses_the_mean_over_all_channels():
    # mean over channels of the channel means = (1.25 + 0 + 1.75 - 0.5 - 1.25) / 5 = 0.25 exactly (the median is
    # 0); with equal counts per channel this is the mean over every feature of every channel.
    means = torch.tensor([1.25, 0.0, 1.75, -0.5, -1.25])
    op = calibrated_op(means, SIGMAS.square(), ALPHA, centre="global_mean")
    g = torch.Generator().manual_seed(9)
    x = 0.25 + SIGMAS.view(1, -1, 1) * torch.randn(10, 5, 3, generator=g)
    expected = brute_force(x, means, SIGMAS.square(), ALPHA, 1, centre=torch.full((5,), 0.25))
    out = op(x)
    assert torch.equal(out.double(), expected)
    assert set(out[out != x].unique().tolist()) == {0.25}
    # a value at its own channel mean but far from the global mean is left alone
    probe = means.view(1, 5, 1).clone()
    far = (means - 0.25).abs() >= ALPHA * SIGMAS
    assert torch.equal(op(probe).flatten()[far], means[far])


def test_unknown_centre_is_rejected():
    with pytest.raises(ConfigurationError):
        MeanSparse(3, centre="median")


# ------------------------------------------------------------------------------------- errors and state
def test_uncalibrated_forward_raises():
    op = MeanSparse(5, alpha=0.3)
    with pytest.raises(UncalibratedOperatorError, match="calibrate"):
        op(torch.randn(2, 5, 3, 3))
    op_zero = MeanSparse(5, alpha=0.0)  # even at alpha 0 an uncalibrated operator is an error
    with pytest.raises(UncalibratedOperatorError):
        op_zero(torch.randn(2, 5, 3, 3))


@pytest.mark.parametrize("alpha", [-0.1, -1e-12, math.nan, math.inf, -math.inf])
def test_invalid_alpha_is_rejected(alpha):
    with pytest.raises(ConfigurationError):
        MeanSparse(4, alpha=alpha)
    op = calibrated_op(MEANS, SIGMAS.square(), 0.5)
    with pytest.raises(ConfigurationError):
        op.set_alpha(alpha)
    assert float(op.alpha) == 0.5  # unchanged after the rejected value
    model = _model_with_operators(["exact", "exact"])
    with pytest.raises(ConfigurationError):
        set_alpha(model, alpha)
    assert get_alpha(model) == ALPHA


def test_model_level_alpha_helpers():
    model = _model_with_operators(["exact", "exact", "exact"])
    set_alpha(model, 0.125)
    assert get_alpha(model) == 0.125
    assert all(float(op.alpha) == 0.125 for op in operators(model))
    operators(model)[1].set_alpha(0.5)
    with pytest.raises(ConfigurationError, match="different alpha"):
        get_alpha(model)
    with pytest.raises(PlacementError):
        set_alpha(nn.Linear(2, 2), 0.1)


@pytest.mark.parametrize(
    ("mean", "var", "match"),
    [
        (torch.tensor([0.0, math.nan, 1.0]), torch.ones(3), "NaN"),
        (torch.zeros(3), torch.tensor([1.0, math.inf, 1.0]), "NaN or Inf"),
        (torch.zeros(4), torch.ones(4), "shape"),
        (torch.zeros(3), torch.ones(3, 1), "shape"),
        (torch.zeros(3), torch.tensor([1.0, -0.5, 1.0]), "negative"),
    ],
    ids=["nan-mean", "inf-var", "wrong-mean-shape", "wrong-var-shape", "negative-var"],
)
def test_set_statistics_validation_names_the_site(mean, var, match):
    op = MeanSparse(3)
    op.site_name = "site 4 (nn.ReLU in layer2.1.relu)"
    with pytest.raises(StatisticsError, match=match) as info:
        op.set_statistics(mean, var, count=10.0)
    assert "site 4 (nn.ReLU in layer2.1.relu)" in str(info.value)
    assert not op.is_calibrated  # nothing was installed


def test_set_statistics_error_names_a_real_site():
    model = sparsify(FunctionalResNet(), (3, 8, 8))
    op = operators(model)[2]
    with pytest.raises(StatisticsError) as info:
        op.set_statistics(torch.full((6,), math.nan), torch.ones(6), count=1.0)
    assert "site 2" in str(info.value) and "layer1" in str(info.value)


def test_wrong_channel_count_at_runtime_is_rejected():
    op = calibrated_op(MEANS, SIGMAS.square(), 0.5)
    with pytest.raises(ConfigurationError, match="channels"):
        op(torch.randn(2, 4, 3, 3))


# ----------------------------------------------------------------------------- dtypes and memory formats
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_input_matches_a_float32_computation(dtype):
    g = torch.Generator().manual_seed(10)
    channels = 8
    mean = torch.randn(channels, generator=g)
    var = torch.rand(channels, generator=g) + 0.1
    op = calibrated_op(mean, var, 0.7)
    x = (
        mean.view(1, -1, 1, 1) + var.sqrt().view(1, -1, 1, 1) * torch.randn(32, channels, 12, 12, generator=g)
    ).to(dtype)
    out = op(x)
    assert out.dtype == dtype
    expected = op(x.float()).to(dtype)
    assert torch.equal(out, expected)
    changed = out != x
    assert 0.2 * x.numel() < changed.sum() < 0.8 * x.numel()
    # the replaced values are the channel means rounded once to the input dtype
    assert torch.equal(out[changed], mean.to(dtype).view(1, -1, 1, 1).expand_as(x)[changed])
    # gradients keep the input dtype too
    xg = x.clone().requires_grad_()
    op(xg).sum().backward()
    assert xg.grad.dtype == dtype


def test_channels_last_input_gives_the_same_values():
    g = torch.Generator().manual_seed(11)
    op = calibrated_op(MEANS, SIGMAS.square(), ALPHA)
    x = MEANS.view(1, -1, 1, 1) + SIGMAS.view(1, -1, 1, 1) * torch.randn(4, 5, 6, 6, generator=g)
    x_cl = x.contiguous(memory_format=torch.channels_last).requires_grad_()
    x_c = x.clone().requires_grad_()
    assert not x_cl.is_contiguous()
    out_cl, out_c = op(x_cl), op(x_c)
    assert torch.equal(out_cl, out_c)
    upstream = torch.randn(4, 5, 6, 6, generator=g)
    out_cl.backward(upstream)
    out_c.backward(upstream)
    assert torch.equal(x_cl.grad, x_c.grad)


# --------------------------------------------------------------------------------------- torch.compile
def _calibrated_small_model(alpha: float) -> nn.Module:
    model = sparsify(MethodReluNet().eval(), (3, 8, 8))
    calibrate(model, make_batches((3, 8, 8), 32, 16, seed=12), progress=False)
    set_alpha(model, alpha)
    return model


def _output_and_input_grad(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_()
    out = model(x)
    out.square().sum().backward()
    return out.detach(), x.grad


def test_torch_compile_gives_the_same_outputs_and_gradients():
    torch._dynamo.reset()
    model = _calibrated_small_model(0.5)
    x = make_batches((3, 8, 8), 8, 8, seed=13)[0]
    compiled = torch.compile(model, backend="aot_eager")
    for mode in ("exact", "straight_through", "exact"):
        set_backward_mode(model, mode)
        ref_out, ref_grad = _output_and_input_grad(model, x)
        out, grad = _output_and_input_grad(compiled, x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    # the straight-through gradient really differs from the exact one (the mode switch is not cached away)
    set_backward_mode(model, "straight_through")
    _, st_grad = _output_and_input_grad(compiled, x)
    set_backward_mode(model, "exact")
    _, exact_grad = _output_and_input_grad(compiled, x)
    assert not torch.allclose(st_grad, exact_grad)
    # a new alpha after compilation is honoured
    set_alpha(model, 0.0)
    ref_out, ref_grad = _output_and_input_grad(model, x)
    out, grad = _output_and_input_grad(compiled, x)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
