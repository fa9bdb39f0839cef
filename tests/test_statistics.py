"""Tests of the channel statistics: float64 moments, exact merging, and the calibration pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from conftest import (
    AmbiguousLayoutNet,
    ConvNeXtBlockNet,
    DataDependentNet,
    FunctionalResNet,
    TransformerBlockNet,
    WideResNetTiny,
    capture_operator_inputs,
    make_batches,
    randomize_batchnorm,
)
from torch import nn

from meansparse_pl import calibrate, set_alpha, sparsify, statistics
from meansparse_pl.calibration import Calibrator
from meansparse_pl.errors import (
    ConfigurationError,
    DataFormatError,
    MeanSparseError,
    PlacementError,
    StatisticsError,
)
from meansparse_pl.ops import operators
from meansparse_pl.statistics import Moments, OperatorMoments, batch_moments, merge_moments

pytestmark = pytest.mark.usefixtures("single_thread")


def reference_moments(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Population mean / variance per channel in float64 by the two-pass textbook formula."""
    channel_dim = channel_dim % x.dim()
    flat = x.double().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    mean = flat.sum(0) / flat.shape[0]
    var = ((flat - mean) ** 2).sum(0) / flat.shape[0]
    return mean, var, flat.shape[0]


def assert_relative(actual: torch.Tensor, expected: torch.Tensor, tolerance: float, scale=None) -> None:
    """|actual - expected| <= tolerance * max(|expected|, scale) elementwise (scale guards means near 0)."""
    actual, expected = actual.double(), expected.double()
    reference = expected.abs() if scale is None else torch.maximum(expected.abs(), scale.double())
    error = (actual - expected).abs() / reference.clamp_min(1e-300)
    assert error.max().item() <= tolerance, f"max relative error {error.max().item():.3g} > {tolerance:g}"


# ------------------------------------------------------------------------------- moments and merging
def _features(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # offset channels with small spread: the regime where naive sum / sum-of-squares formulas lose digits
    return 1000.0 + torch.arange(5.0).view(1, -1, 1, 1) + 0.01 * torch.randn(64, 5, 3, 3, generator=g)


# The eager moments work in float32 per sample and merge in float64 (no float64 copy of an activation); their
# contract is a relative error of at most 1e-6 against a float64 brute force (means relative to the larger of
# |mean| and sigma). Measured: about 1e-8, also at values ~1e3 with a spread of 1e-2.
EAGER = 1e-6


def test_batch_moments_equal_the_two_pass_formula():
    x = _features()
    moments = batch_moments(x, 1)
    mean, var, count = reference_moments(x, 1)
    assert moments.mean.dtype == moments.m2.dtype == torch.float64
    assert float(moments.count) == count == 64 * 9
    assert_relative(moments.mean, mean, EAGER, scale=var.sqrt())
    assert_relative(moments.var, var, EAGER)
    last = batch_moments(x.movedim(1, -1), -1)  # same data laid out channels-last
    assert_relative(last.mean, mean, EAGER, scale=var.sqrt())
    assert_relative(last.var, var, EAGER)
    exact = batch_moments(x.double(), 1)  # float64 data: float64 throughout
    assert_relative(exact.mean, mean, 1e-14)
    assert_relative(exact.var, var, 1e-10)


@pytest.mark.parametrize(
    "shape, channel_dim",
    [((6, 5, 7, 9), 1), ((4, 11, 13), -1), ((33, 9), 1), ((3, 6, 5, 4), -1), ((5, 4, 3), 0)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_eager_moments_without_float64_copies_are_within_1e6(shape, channel_dim, dtype, monkeypatch):
    monkeypatch.setattr(statistics, "PARTIAL_CHUNK_NUMEL", 50)  # several chunks even on these small tensors
    g = torch.Generator().manual_seed(len(shape) + channel_dim)
    x = (3.0 + 2.0 * torch.randn(shape, generator=g)).to(dtype)
    moments = batch_moments(x, channel_dim)
    mean, var, count = reference_moments(x, channel_dim)
    assert float(moments.count) == count
    assert_relative(moments.mean, mean, EAGER, scale=var.sqrt())
    assert_relative(moments.var, var, EAGER)


@pytest.mark.parametrize("split", [1, 17, 32, 63])
def test_merge_of_two_parts_equals_one_pass(split):
    x = _features(1)
    merged = merge_moments(batch_moments(x[:split], 1), batch_moments(x[split:], 1))
    whole = batch_moments(x, 1)
    assert float(merged.count) == float(whole.count)
    sigma = whole.var.sqrt()
    assert_relative(merged.mean, whole.mean, EAGER, scale=sigma)
    assert_relative(merged.m2, whole.m2, EAGER)
    # merging is symmetric, and exact in float64
    swapped = merge_moments(batch_moments(x[split:], 1), batch_moments(x[:split], 1))
    assert_relative(swapped.mean, merged.mean, 1e-14)
    assert_relative(swapped.m2, merged.m2, 1e-10)


def test_merge_with_an_empty_part_is_the_identity():
    x = _features(2)
    empty = Moments(
        torch.zeros((), dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
        torch.zeros(5, dtype=torch.float64),
    )
    part = batch_moments(x, 1)
    for merged in (merge_moments(empty, part), merge_moments(part, empty)):
        assert float(merged.count) == float(part.count)
        assert torch.equal(merged.mean, part.mean)
        assert torch.equal(merged.m2, part.m2)
    both_empty = merge_moments(empty, empty)
    assert float(both_empty.count) == 0 and torch.isfinite(both_empty.mean).all()


@pytest.mark.parametrize("channel_dim", [1, -1])
def test_channel_moments_independent_of_batch_size_and_order(channel_dim):
    x = _features(3)
    if channel_dim == -1:
        x = x.movedim(1, -1).contiguous()
    mean, var, count = reference_moments(x, channel_dim)
    results = []
    for batch_size in (1, 7, 64):
        for shuffle in (False, True):
            order = (
                torch.randperm(64, generator=torch.Generator().manual_seed(batch_size)) if shuffle else None
            )
            data = x[order] if shuffle else x
            metric = OperatorMoments([5], [channel_dim])
            observe = metric.observer(0)
            for batch in data.split(batch_size):
                metric.update(batch)
                observe(batch)
            sites, images = metric.compute()
            assert images == 64
            results.append(sites[0])
    for result in results:
        assert float(result.count) == count
        assert_relative(result.mean, mean, EAGER, scale=var.sqrt())
        assert_relative(result.var, var, EAGER)  # var ~ 1e-4 at values ~ 1e3
        assert_relative(result.mean, results[0].mean, EAGER, scale=var.sqrt())
        assert_relative(result.var, results[0].var, EAGER)


def test_channel_moments_keep_float64_when_the_model_is_cast():
    metric = OperatorMoments([3], [1]).half()
    assert metric.moments.dtype == metric.images.dtype == torch.float64
    x = torch.randn(4, 3, 2, 2).to(torch.float16)
    metric.update(x)
    metric.observer(0)(x)
    result = metric.compute()[0][0]
    mean, var, _ = reference_moments(x, 1)
    assert result.mean.dtype == torch.float64
    assert_relative(result.mean, mean, EAGER, scale=var.sqrt())
    assert_relative(result.var, var, EAGER)


# ------------------------------------------------------------------------ calibration vs brute force
CALIBRATION_MODELS = {
    "functional-resnet": (lambda: randomize_batchnorm(FunctionalResNet()), (3, 8, 8)),
    "wideresnet-silu": (lambda: randomize_batchnorm(WideResNetTiny()), (3, 8, 8)),
    "transformer-NLC": (TransformerBlockNet, (6, 8)),
    "convnext-NHWC": (ConvNeXtBlockNet, (3, 12, 12)),
    "ambiguous-H-W-C": (AmbiguousLayoutNet, (4, 4, 4)),
    "hooks-reused-module": (DataDependentNet, (3, 8, 8)),
}


@pytest.mark.parametrize("name", list(CALIBRATION_MODELS))
def test_calibrated_statistics_equal_float64_brute_force(name):
    factory, shape = CALIBRATION_MODELS[name]
    model = sparsify(factory().eval(), shape)
    batches = make_batches(shape, 40, 16, seed=4)  # 16 + 16 + 8: an uneven last batch
    summary = calibrate(model, batches, progress=False)
    assert (summary.images, summary.batches) == (40, 3)
    captured = capture_operator_inputs(model, batches)
    for op in operators(model):
        mean, var, count = reference_moments(captured[op], op.channel_dim)
        assert float(op.count) == count
        assert op.mean.dtype == op.var.dtype == torch.float32
        assert_relative(op.mean, mean, 1e-6, scale=var.sqrt())
        assert_relative(op.var, var, 1e-6)


def test_statistics_independent_of_batch_size_and_order_end_to_end():
    """Float64 model, so the features themselves do not depend on the batching (float32 convolutions do at
    the 1e-8 level): the statistics, accumulated in float64 and stored in the operators' float32 buffers (which
    stay float32 when the model is cast), agree to float32 rounding for batch sizes 1, 7, 64 and a shuffled
    order, and with a float64 brute force."""
    model = sparsify(randomize_batchnorm(FunctionalResNet()).double().eval(), (3, 4, 4)).double()
    assert operators(model)[0].mean.dtype == torch.float32
    data = torch.cat(make_batches((3, 4, 4), 64, 64, seed=5)).double()
    runs = []
    for batch_size, shuffle in ((64, False), (1, True), (7, False), (7, True), (64, True)):
        ordered = data[torch.randperm(64, generator=torch.Generator().manual_seed(6))] if shuffle else data
        calibrate(model, list(ordered.split(batch_size)), progress=False)
        runs.append([(op.mean.clone(), op.var.clone(), float(op.count)) for op in operators(model)])
    float32_rounding = 2.0**-24
    for run in runs[1:]:
        for (mean, var, count), (mean0, var0, count0) in zip(run, runs[0], strict=True):
            assert count == count0 == 64 * 16
            assert_relative(mean, mean0, 2 * float32_rounding, scale=var0.sqrt())
            assert_relative(var, var0, 2 * float32_rounding)
    captured = capture_operator_inputs(model, [data])
    for op, (mean0, var0, _) in zip(operators(model), runs[0], strict=True):
        mean, var, _ = reference_moments(captured[op], op.channel_dim)
        assert_relative(mean0, mean, float32_rounding, scale=var.sqrt())
        assert_relative(var0, var, float32_rounding)


def test_recalibration_replaces_the_statistics():
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    first, second = make_batches((3, 8, 8), 16, 8, seed=7), make_batches((3, 8, 8), 16, 8, seed=8)
    calibrate(model, first, progress=False)
    calibrate(model, second, progress=False)
    captured = capture_operator_inputs(model, second)
    for op in operators(model):
        mean, var, count = reference_moments(captured[op], op.channel_dim)
        assert float(op.count) == count
        assert_relative(op.mean, mean, 1e-6, scale=var.sqrt())
        assert_relative(op.var, var, 1e-6)


def test_calibration_sees_the_unmodified_features_at_any_alpha():
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 16, 8, seed=9)
    calibrate(model, batches, progress=False)
    reference = [(op.mean.clone(), op.var.clone()) for op in operators(model)]
    set_alpha(model, 1.0)  # a large band: operators applied during calibration would change later sites
    calibrate(model, batches, progress=False)
    for op, (mean, var) in zip(operators(model), reference, strict=True):
        assert torch.equal(op.mean, mean) and torch.equal(op.var, var)
    assert float(operators(model)[0].alpha) == 1.0


# ------------------------------------------------------------------------------- calibration contract
def test_calibration_leaves_the_model_untouched_and_restores_modes():
    base = randomize_batchnorm(WideResNetTiny())
    model = sparsify(base, (3, 8, 8))
    model.train()
    base.block.bn2.eval()  # mixed modes must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    parameters = {name: p.detach().clone() for name, p in model.named_parameters()}
    buffers = {name: b.clone() for name, b in model.named_buffers() if "meansparse" not in name}
    assert any("running_mean" in name for name in buffers)
    calibrate(model, make_batches((3, 8, 8), 24, 8, seed=10), progress=False)
    assert {name: m.training for name, m in model.named_modules()} == modes
    for name, value in model.named_parameters():
        assert torch.equal(value, parameters[name]), name
    for name, value in model.named_buffers():
        if name in buffers:
            assert torch.equal(value, buffers[name]), name
    assert all(op.observer is None for op in operators(model))
    assert all(op.is_calibrated for op in operators(model))


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_data_is_rejected(bad):
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 16, 8, seed=11)
    batches[1][3, 0, 2, 2] = bad
    with pytest.raises(DataFormatError, match="batch 1: 1 pixels are NaN or infinite"):
        calibrate(model, batches, progress=False)
    assert not any(op.is_calibrated for op in operators(model))
    assert all(op.observer is None for op in operators(model))


def test_non_finite_features_are_rejected_with_the_site_name():
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    with torch.no_grad():
        model.layer1.conv2.weight[0, 0, 0, 0] = math.nan  # a diverged layer: site 2 (after the sum) sees NaN
    with pytest.raises(StatisticsError, match="site 2"):
        calibrate(model, make_batches((3, 8, 8), 16, 8, seed=12), progress=False)


def test_empty_dataloader_is_a_clear_error():
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    with pytest.raises(MeanSparseError, match="no images"):
        calibrate(model, [], progress=False)
    empty_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(0, 3, 8, 8)))
    with pytest.raises(MeanSparseError, match="no images"):
        calibrate(model, empty_loader, progress=False)
    assert not any(op.is_calibrated for op in operators(model))


class CountingLoader:
    """An iterable that records how many batches were drawn from it."""

    def __init__(self, batches) -> None:
        self.batches = batches
        self.drawn = 0

    def __iter__(self):
        for batch in self.batches:
            self.drawn += 1
            yield batch

    def __len__(self) -> int:
        return len(self.batches)


def test_limit_batches_is_honoured():
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 40, 8, seed=13)
    loader = CountingLoader([(b, torch.zeros(len(b), dtype=torch.long)) for b in batches])  # (images, labels)
    summary = calibrate(model, loader, limit_batches=2, progress=False)
    assert (summary.batches, summary.images) == (2, 16)
    assert loader.drawn == 2  # no batch beyond the limit is loaded
    captured = capture_operator_inputs(model, batches[:2])
    for op in operators(model):
        mean, var, count = reference_moments(captured[op], op.channel_dim)
        assert float(op.count) == count
        assert_relative(op.mean, mean, 1e-6, scale=var.sqrt())
        assert_relative(op.var, var, 1e-6)
    for bad in (0, -1):
        with pytest.raises(ConfigurationError):
            calibrate(model, loader, limit_batches=bad, progress=False)


def test_batch_formats():
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    images = make_batches((3, 8, 8), 8, 8, seed=14)[0]
    calibrate(model, [images], progress=False)
    reference = [op.mean.clone() for op in operators(model)]
    for batch in ({"image": images, "label": 0}, {"input": images}, [images, torch.zeros(8)]):
        calibrate(model, [batch], progress=False)
        assert all(torch.equal(op.mean, m) for op, m in zip(operators(model), reference, strict=True))
    with pytest.raises(ConfigurationError):
        calibrate(model, [{"pixels": images}], progress=False)


def test_calibrating_a_model_without_operators_is_an_error():
    with pytest.raises(PlacementError):
        calibrate(FunctionalResNet(), make_batches((3, 8, 8), 8, 8), progress=False)


def test_collector_statistics_before_finish_are_float64():
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    collector = Calibrator(model)
    batches = make_batches((3, 8, 8), 16, 8, seed=15)
    with collector.observing():
        for batch in batches:
            collector.observe(batch)
    moments = collector.compute()[0]
    assert all(m.mean.dtype == torch.float64 for m in moments)
    assert collector.finish() == 16
    captured = capture_operator_inputs(model, batches)
    for op, m in zip(operators(model), moments, strict=True):
        mean, var, _ = reference_moments(captured[op], op.channel_dim)
        assert_relative(m.mean, mean, EAGER, scale=var.sqrt())
        assert_relative(m.var, var, EAGER)
    copy.deepcopy(model)  # operators stay deep-copyable after calibration (no observer closures left)


@pytest.mark.filterwarnings("ignore:The ``compute`` method")  # states set by hand, update() never called
def test_operator_moments_merge_the_stacked_states_of_several_processes():
    """After a torch.distributed sync torchmetrics stacks each process's packed (count, mean, m2) state and sums
    the image counts; compute() must merge them exactly, site by site (here: two sites, three uneven shards,
    states stacked by hand as the gather would)."""
    x = _features(16)
    y = x[:, :3].movedim(1, -1).contiguous()  # a second, channels-last site with 3 channels
    shards = [slice(0, 5), slice(5, 40), slice(40, None)]
    per_process = []
    for shard in shards:
        metric = OperatorMoments([5, 3], [1, -1])
        metric.update(x[shard])
        metric.observer(0)(x[shard])
        metric.observer(1)(y[shard])
        per_process.append(metric)
    gathered = OperatorMoments([5, 3], [1, -1])
    gathered.moments = torch.stack([m.moments for m in per_process])
    gathered.images = sum(m.images for m in per_process)
    (merged_x, merged_y), images = gathered.compute()
    assert images == x.shape[0]
    for merged, data, dim in ((merged_x, x, 1), (merged_y, y, -1)):
        mean, var, count = reference_moments(data, dim)
        assert float(merged.count) == count
        assert_relative(merged.mean, mean, EAGER, scale=var.sqrt())
        assert_relative(merged.var, var, EAGER)


class _BranchyNet(nn.Module):
    """The second activation runs only for inputs above 2: the probe takes it, calibration data never does."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.ReLU()
        self.b = nn.ReLU()

    def forward(self, x):
        x = self.a(x)
        if x.max() > 2:
            x = self.b(x)
        return x


def test_site_that_never_ran_is_named():
    model = sparsify(_BranchyNet(), torch.rand(1, 3, 4, 4) + 5, strategy="hooks")
    assert len(operators(model)) == 2
    with pytest.raises(StatisticsError, match="never ran during calibration"):
        calibrate(model, [torch.rand(2, 3, 4, 4)], progress=False)


def test_half_precision_keeps_the_count_exact():
    model = sparsify(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (3, 64, 64))
    calibrate(model, [torch.rand(20, 3, 64, 64)], progress=False)
    count = int(operators(model)[0].count)
    assert count == 20 * 62 * 62 > 65504  # above the float16 range
    model.half()
    assert int(operators(model)[0].count) == count and operators(model)[0].is_calibrated


def test_nan_input_is_rejected_the_same_way_by_every_calibration_path():
    """calibrate(), the MeanSparseCallback's calibration step and the CLI's predict-loop module all feed the one
    Calibrator, so a NaN pixel is the same error, with the same message, on every path."""
    import lightning.pytorch as pl

    from meansparse_pl.calibration import CalibrationModule
    from meansparse_pl.callback import MeanSparseCallback

    images = make_batches((3, 8, 8), 16, 8, seed=16)
    images[1][3, 0, 2, 2] = math.nan  # one pixel of the second batch
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.cat(images)), batch_size=8)
    messages = []
    for path in ("calibrate", "callback", "cli"):
        model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
        with pytest.raises(DataFormatError) as error:
            if path == "calibrate":
                calibrate(model, loader, progress=False)
            elif path == "callback":
                MeanSparseCallback().calibrate(model, loader, progress=False)
            else:
                trainer = pl.Trainer(
                    accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
                )
                trainer.predict(CalibrationModule(model), dataloaders=loader, return_predictions=False)
        messages.append(str(error.value))
        assert not any(op.is_calibrated for op in operators(model))
    assert messages[0] == messages[1] == messages[2]
    assert messages[0].startswith("calibration batch 1: 1 pixels are NaN or infinite; clean the data")


def test_images_of_another_shape_than_the_placement_are_one_clear_error():
    model = sparsify(FunctionalResNet().eval(), (3, 8, 8))
    with pytest.raises(
        ConfigurationError, match=r"shape \(3, 6, 6\) but the model's operators were placed for \(3, 8, 8\)"
    ):
        calibrate(model, [torch.rand(4, 3, 6, 6)], progress=False)


def test_a_statistics_pass_stopped_by_a_signal_resumes_to_the_same_statistics(tmp_path):
    """SIGTERM (a real one, to this process) during the CLI's statistics pass: the moments so far are saved and
    the pass stops; run again, it skips the batches already seen and ends with exactly the statistics of an
    uninterrupted pass."""
    import os
    import signal

    import lightning.pytorch as pl

    from meansparse_pl import preemption
    from meansparse_pl.calibration import CalibrationModule
    from meansparse_pl.errors import Interrupted

    batches = make_batches((3, 8, 8), 64, 8, seed=21)
    base = randomize_batchnorm(FunctionalResNet()).eval()
    reference = sparsify(copy.deepcopy(base), (3, 8, 8))
    calibrate(reference, batches, progress=False)

    class SignalAfterThree(torch.utils.data.Dataset):
        """The batches, with SIGTERM sent to this process while the fourth is loaded (the first time only)."""

        sent = False

        def __len__(self) -> int:
            return len(batches)

        def __getitem__(self, index: int) -> torch.Tensor:
            if index == 3 and not SignalAfterThree.sent:
                SignalAfterThree.sent = True
                os.kill(os.getpid(), signal.SIGTERM)
            return batches[index]

    loader = torch.utils.data.DataLoader(SignalAfterThree(), batch_size=None)
    model = sparsify(copy.deepcopy(base), (3, 8, 8))
    state = tmp_path / "statistics"

    def run() -> CalibrationModule:
        trainer = pl.Trainer(
            accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        module = CalibrationModule(model, state_path=state)
        trainer.predict(module, dataloaders=loader, return_predictions=False)
        return module

    with (
        preemption.watching(),
        pytest.raises(Interrupted, match="after 4 batches.*run the same command again"),
    ):
        run()
    assert (tmp_path / "statistics.rank0").exists() and not any(op.is_calibrated for op in operators(model))
    assert all(op.observer is None for op in operators(model))  # nothing left attached by the stop
    with preemption.watching():
        module = run()
    assert module.images == 64 and not (tmp_path / "statistics.rank0").exists()
    for op, ref in zip(operators(model), operators(reference), strict=True):
        assert torch.equal(op.count, ref.count)
        torch.testing.assert_close(op.mean, ref.mean, rtol=0, atol=0)
        torch.testing.assert_close(op.var, ref.var, rtol=0, atol=0)


def test_the_callbacks_limit_samples_counts_images_of_the_split_and_limit_batches_says_it_is_deprecated(
    caplog,
):
    """MeanSparseCallback(limit_samples=N): the first N images of the split, in whole batches (here 96 = 64 + 32),
    as every subcommand counts samples; the old per-process ``limit_batches`` still works, with one line."""
    from types import SimpleNamespace

    from torch.utils.data import DataLoader, TensorDataset

    from meansparse_pl.callback import MeanSparseCallback

    images = torch.arange(200, dtype=torch.float32).reshape(200, 1)
    loader = DataLoader(TensorDataset(images, torch.zeros(200, dtype=torch.long)), batch_size=64)
    trainer = SimpleNamespace(world_size=1, global_rank=0, datamodule=None)
    callback = MeanSparseCallback(limit_samples=96, data=loader)
    seen = torch.cat([x for x, _ in callback.calibration_loader(trainer)])
    assert torch.equal(seen, images[:96])
    assert [len(x) for x, _ in callback.calibration_loader(trainer)] == [64, 32]
    caplog.clear()
    MeanSparseCallback(limit_batches=2)
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("deprecated:")] == [
        "deprecated: MeanSparseCallback(limit_batches=...) counts batches per process; it is now limit_samples "
        "(the old name is accepted until meansparse_pl 0.3)."
    ]
