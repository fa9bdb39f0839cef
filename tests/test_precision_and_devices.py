"""The places users run: half precision, mixed precision, channels_last, torch.func, second-order gradients,
models spread over devices, and host-device syncs, all checked on CPU against independent computations."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from conftest import FunctionalResNet, make_batches, randomize_batchnorm
from torch import nn
from torch.utils.data import DataLoader, Subset, TensorDataset

from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.calibration import CalibrationModule, Calibrator
from meansparse_pl.callback import MeanSparseCallback
from meansparse_pl.config import ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.evaluation import EvaluationTask, run_tasks
from meansparse_pl.module import AdversarialClassifier
from meansparse_pl.ops import MeanSparse, fused_kernels, operators
from meansparse_pl.ops.functions import BACKWARD_MODES
from meansparse_pl.syncs import HostSyncCounter

pytestmark = pytest.mark.usefixtures("single_thread")


def _operator(channels: int = 6, alpha: float = 0.4, seed: int = 0, **kwargs) -> MeanSparse:
    g = torch.Generator().manual_seed(seed)
    op = MeanSparse(channels, 1, alpha=alpha, **kwargs)
    op.set_statistics(0.5 * torch.randn(channels, generator=g), 0.1 + torch.rand(channels, generator=g), 1000)
    return op


def _float32_reference(op: MeanSparse, x: torch.Tensor) -> torch.Tensor:
    """The band decided in float32 from float32 buffers (the published formula), output in x's dtype."""
    mean = op.mean.float().view(1, -1, *([1] * (x.dim() - 2)))
    threshold = torch.tensor(op.alpha_value, dtype=torch.float32) * op.var.float().sqrt().view_as(mean)
    inside = (x.float() - mean).abs() < threshold
    return torch.where(inside, mean.to(x.dtype), x)


# ------------------------------------------------------------------------------------------- precision
@pytest.mark.parametrize(
    "cast",
    [
        lambda m: m.half(),
        lambda m: m.bfloat16(),
        lambda m: m.to(torch.bfloat16),
        lambda m: m.to("cpu", torch.float16),
        lambda m: m.double(),
    ],
    ids=["half", "bfloat16", "to-bf16", "to-device-fp16", "double"],
)
def test_band_buffers_stay_float32_under_every_module_cast(cast):
    op = _operator(alpha=0.4)
    mean, var = op.mean.clone(), op.var.clone()
    model = cast(nn.Sequential(nn.Conv2d(3, 6, 1), op))
    assert model[0].weight.dtype != torch.float32
    assert op.mean.dtype == op.var.dtype == op.alpha.dtype == torch.float32
    assert torch.equal(op.mean, mean) and torch.equal(op.var, var)
    assert float(op.alpha) == op.alpha_value == float(torch.tensor(0.4))  # not bf16's 0.4004
    assert op.count.dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("fused", [False, True])
def test_a_model_cast_after_calibration_keeps_the_float32_decisions(dtype, fused, fused_everywhere):
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 32, 16, seed=1)
    calibrate(model, batches, progress=False)
    set_alpha(model, 0.4)
    model = model.to(dtype)
    seen: list[tuple[MeanSparse, torch.Tensor, torch.Tensor]] = []
    hooks = [
        op.register_forward_hook(lambda m, args, out: seen.append((m, args[0], out)))
        for op in operators(model)
    ]
    with fused_kernels(fused), torch.no_grad():
        model(batches[0].to(dtype))
    for hook in hooks:
        hook.remove()
    decisions = 0
    for op, x, out in seen:
        assert op.mean.dtype == torch.float32
        expected = _float32_reference(op, x)
        assert torch.equal(op.without_activation(x), expected)
        assert torch.equal(out, expected if op.activation is None else op.activation.fn(expected))
        decisions += x.numel()
    assert decisions > 1000


def test_operators_built_under_a_half_default_dtype_are_float32():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # what Lightning's bf16-true module-init context does
    try:
        op = MeanSparse(4, 1, alpha=0.3)
    finally:
        torch.set_default_dtype(previous)
    assert op.mean.dtype == op.var.dtype == op.alpha.dtype == torch.float32


def _tiny_fit(
    precision: str, tmp_path
) -> tuple[AdversarialClassifier, MeanSparseCallback, FashionMNISTDataModule]:
    data = FashionMNISTDataModule(train_subset=64, val_subset=32, batch_size=32, eval_batch_size=32)
    module = AdversarialClassifier(
        backbone="small_cnn",
        backbone_kwargs={"channels": [8, 16], "hidden": 16},
        in_channels=1,
        normalization=data.normalization,
        threat=ThreatModel("Linf", 0.1),
        attack_steps=1,
        val_attack_steps=1,
        optimizer="sgd",
        lr=1e-3,
        weight_decay=0.0,
    )
    callback = MeanSparseCallback(output_path=str(tmp_path / "meansparse.pt"))
    trainer = pl.Trainer(
        accelerator="cpu",
        precision=precision,
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        inference_mode=False,
        callbacks=[callback],
    )
    trainer.fit(module, data)
    return module, callback, data


@pytest.mark.parametrize(
    "precision, dtype",
    [("bf16-mixed", "float32"), ("bf16-true", "bfloat16"), ("16-true", "float16")],
)
def test_fit_with_the_callback_under_each_precision(precision, dtype, tmp_path):
    """One rule: the statistics pass runs the network in its own parameter dtype with autocast off; the
    checkpoint records that dtype, the buffers stay float32, and the statistics equal a float64 brute force of
    the operator inputs computed by that rule."""
    module, callback, data = _tiny_fit(precision, tmp_path)
    sparse = module.model
    assert callback.summary["dtype"] == dtype
    saved = torch.load(tmp_path / "meansparse.pt", weights_only=True)
    assert saved["metadata"]["calibration"]["dtype"] == dtype
    assert all(op.mean.dtype == op.var.dtype == op.alpha.dtype == torch.float32 for op in operators(sparse))
    # brute force: every operator's input in the rule's dtype, reduced in float64
    seen: dict[MeanSparse, list[torch.Tensor]] = {op: [] for op in operators(sparse)}
    hooks = [
        op.register_forward_pre_hook(lambda m, a: seen[m].append(a[0].double())) for op in operators(sparse)
    ]
    parameter_dtype = next(sparse.parameters()).dtype
    sparse.eval()
    with torch.no_grad():
        for images, _ in data.calibration_dataloader():
            set_alpha(sparse, 0.0)
            sparse(images.to(parameter_dtype))
    for hook in hooks:
        hook.remove()
    for op, parts in seen.items():
        x = torch.cat(parts).movedim(op.channel_dim, -1).reshape(-1, op.num_channels)
        mean, var = x.mean(0), x.var(0, unbiased=False)
        assert torch.allclose(op.mean.double(), mean, rtol=1e-6, atol=1e-6 * float(var.sqrt().max()))
        assert torch.allclose(op.var.double(), var, rtol=1e-5, atol=1e-9)


def test_postprocess_under_bf16_mixed_collects_the_callbacks_statistics():
    """cli.py postprocess runs the pass inside Lightning's predict loop, whose bf16-mixed precision wraps each
    step in autocast; the pass turns it off, so the statistics are bit-identical to the callback's plain pass
    (before, bf16 autocast put the variances 0.8-1.0% off)."""
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    data = TensorDataset(torch.cat(make_batches((3, 8, 8), 40, 40, seed=2)))
    calibrate(model, DataLoader(data, batch_size=8), progress=False)
    plain = [(op.mean.clone(), op.var.clone()) for op in operators(model)]
    module = CalibrationModule(model)
    trainer = pl.Trainer(
        accelerator="cpu",
        precision="bf16-mixed",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.predict(module, dataloaders=DataLoader(data, batch_size=8), return_predictions=False)
    assert module.statistics_dtype == "float32"
    for op, (mean, var) in zip(operators(model), plain, strict=True):
        assert torch.equal(op.mean, mean) and torch.equal(op.var, var)


# ------------------------------------------------------------------------ gradients on every path
def _large_input(channels_last: bool = False) -> torch.Tensor:
    x = torch.randn(2, 6, 110, 110)  # 145,200 elements: above the default fused threshold (2^17)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_double_backward_is_the_same_on_the_fused_and_the_eager_path(mode):
    """A gradient penalty (the gradient of a gradient): the fused kernels run outside autograd, so with
    create_graph the backward must take the differentiable formula (before, the fused path returned a
    gradient without graph for inputs of 2^17 elements or more)."""
    torch.manual_seed(3)
    conv = nn.Conv2d(6, 6, 1)
    op = _operator(alpha=0.5, backward_mode=mode)
    x = _large_input().requires_grad_()
    results = []
    for fused in (False, True):
        conv.zero_grad()
        with fused_kernels(fused):
            out = op(conv(x))
            (gradient,) = torch.autograd.grad((out * out).sum(), x, create_graph=True)
            assert gradient.grad_fn is not None
            gradient.square().sum().backward()
        results.append((gradient.detach(), conv.weight.grad.clone()))
    (eager_grad, eager_weight), (fused_grad, fused_weight) = results
    torch.testing.assert_close(fused_grad, eager_grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fused_weight, eager_weight, rtol=1e-4, atol=1e-5)
    assert eager_weight.abs().sum() > 0


@pytest.mark.parametrize("mode", BACKWARD_MODES)
@pytest.mark.parametrize("fused", [False, True])
def test_channels_last_gradients_stay_channels_last(mode, fused, fused_everywhere):
    op = _operator(alpha=0.5, backward_mode=mode)
    x = torch.randn(3, 6, 5, 5).contiguous(memory_format=torch.channels_last).requires_grad_()
    with fused_kernels(fused):
        out = op(x)
        (gradient,) = torch.autograd.grad(out.sum(), x)  # sum's gradient is an expanded, unstrided tensor
    assert gradient.is_contiguous(memory_format=torch.channels_last)
    reference = x.detach().clone().requires_grad_()
    with fused_kernels(False):
        (expected,) = torch.autograd.grad(op(reference.contiguous()).sum(), reference)
    assert torch.equal(gradient.contiguous(), expected.contiguous())


@pytest.mark.parametrize("mode", BACKWARD_MODES)
def test_torch_func_grad_and_vmap(mode):
    op = _operator(alpha=0.5, backward_mode=mode)
    x = torch.randn(4, 6, 3, 3)
    reference = x.clone().requires_grad_()
    (expected,) = torch.autograd.grad((op(reference) ** 2).sum(), reference)
    gradient = torch.func.grad(lambda t: (op(t) ** 2).sum())(x)
    assert torch.equal(gradient, expected)
    stacked = torch.randn(3, 4, 6, 3, 3)
    batched = torch.func.vmap(op)(stacked)
    assert torch.equal(batched, torch.stack([op(s) for s in stacked]))
    per_sample = torch.func.vmap(torch.func.grad(lambda t: (op(t) ** 2).sum()))(stacked)
    assert per_sample.shape == stacked.shape


# ------------------------------------------------------------------------------------ devices, syncs
class TwoDevices(nn.Module):
    """The second half of the network on another device (here "meta", the only second device a CPU has)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
        self.second = nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x).to(self.second[0].weight.device))


def test_moments_stay_on_each_operators_device():
    model = sparsify(TwoDevices().eval(), (3, 4, 4))
    first, second = operators(model)
    second.to("meta")
    model.second.to("meta")
    calibrator = Calibrator(model)
    assert calibrator.device == torch.device("cpu")  # the images go to the input layer's device
    assert {g.device for g in calibrator.groups} == {torch.device("cpu"), torch.device("meta")}
    for group in calibrator.groups:
        assert group.moments.moments.device == group.device
        assert [calibrator.operators[i] for i in group.sites] == (
            [first] if group.device.type == "cpu" else [second]
        )
    with calibrator.observing():
        calibrator.observe(
            torch.rand(2, 3, 4, 4)
        )  # each operator hands its input to its own device's moments
    (cpu_group,) = [g for g in calibrator.groups if g.device.type == "cpu"]
    assert float(cpu_group.moments.moments[0]) == 2 * 16  # elements per channel seen at the first site


def test_calibration_makes_no_host_sync_per_batch():
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 48, 8, seed=4)
    counts = []
    for n in (2, 6):
        with HostSyncCounter() as syncs:
            calibrate(model, batches[:n], progress=False)
        counts.append(syncs.total)
    assert counts[0] == counts[1] > 0  # the checks at the end, the same for any number of batches


def test_the_evaluation_loop_syncs_once_per_attack_and_batch():
    """Per batch and attack only the attack's own input check reads the device (one host read); the loop's
    bookkeeping (sample indices, cascade survivors, alphas, progress lines) reads none. Before: one sync per
    sample (int(index)) and one per operator per task (set_alpha)."""
    torch.manual_seed(5)
    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    calibrate(model, make_batches((3, 8, 8), 16, 8, seed=5), progress=False)
    data = TensorDataset(torch.rand(24, 3, 8, 8), torch.randint(0, 3, (24,)))
    threat = ThreatModel("Linf", 0.03)
    tasks = [
        EvaluationTask("clean", "clean", threat, alpha=0.3),
        EvaluationTask("base", "clean", threat, alpha=0.0),
        EvaluationTask("cascade", "clean", threat, alpha=0.5, after=("clean",)),
    ]
    counts = []
    for n in (8, 24):  # one batch, three batches
        with HostSyncCounter() as syncs:
            run_tasks(model, Subset(data, range(n)), tasks, batch_size=8)
        counts.append(syncs.total)
    per_batch = (counts[1] - counts[0]) / 2
    # at most one per attack run (a cascade step with no survivor in a batch runs nothing); the loop itself
    # would add 8 per batch for the indices alone
    assert len(tasks) - 1 <= per_batch <= len(tasks)


def test_the_operator_forward_and_set_alpha_read_nothing_back():
    op = _operator(alpha=0.3)
    x = torch.randn(4, 6, 3, 3)
    op(x)  # band built once
    with HostSyncCounter() as syncs:
        for alpha in (0.1, 0.2, 0.3):
            op.set_alpha(alpha)
            op(x)
            op(x.requires_grad_()).sum().backward()
    assert syncs.total == 0


def test_a_deterministic_trainer_also_turns_tf32_off(monkeypatch):
    """The CLI adds to Lightning's ``deterministic`` what it leaves: float32 convolutions and matrix products in
    full float32 (TF32 is on by default for cuDNN convolutions on Ampere and newer GPUs)."""
    import sys
    from pathlib import Path

    from meansparse_pl.cli import MeanSparseCLI
    from meansparse_pl.determinism import float32_reference_math, tf32_enabled

    monkeypatch.setattr(sys, "argv", ["cli.py"])
    demo = Path(__file__).resolve().parents[1] / "configs" / "fashion_mnist_demo.yaml"
    float32_reference_math(False)
    try:
        assert tf32_enabled()
        MeanSparseCLI(["--config", str(demo), "--trainer.logger=false", "--trainer.callbacks=[]"], run=False)
        assert not tf32_enabled()
    finally:
        float32_reference_math(False)
