"""Published MeanSparse models: conversion, state-dict import and export reproduce the published logits bit
for bit.

The published module classes are re-implemented here line by line from the released architecture files
(robustbench 1.1.1 ``Meansparse_wrn_70_16.py``, ``Meansparse_swin_L.py`` and ``sparsified_model.py``, see
``/work/shared/reference/published-placement.md``), so these tests need no download and no robustbench.
Buffers are random and alpha is large enough that many features are replaced, so "equal" is not trivially
"the identity"; every comparison is ``torch.equal``.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl import operators, set_alpha, sparsify
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.errors import CheckpointError, PlacementError, StatisticsError, UncalibratedOperatorError
from meansparse_pl.ops import MeanSparse
from meansparse_pl.placement import placement_of
from meansparse_pl.published import (
    convert_published,
    find_published_modules,
    load_published_state_dict,
    published_names,
    published_state_dict,
)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Small models on a shared 2-core machine: one thread is faster and deterministic."""


# ------------------------------------------------------------------------- published classes, verbatim
class PublishedMeanSparse(nn.Module):
    """``MeanSparse`` of the released CIFAR WideResNets (statistics over dims (0, 2, 3))."""

    def __init__(self, in_planes: int) -> None:
        super().__init__()
        self.register_buffer("running_mean", torch.zeros(in_planes))
        self.register_buffer("running_var", torch.zeros(in_planes))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("flag_update_statistics", torch.tensor(0))
        self.register_buffer("batch_num", torch.tensor(0.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.flag_update_statistics:
            self.running_mean += torch.mean(input.detach().clone(), dim=(0, 2, 3)) / self.batch_num
            self.running_var += torch.var(input.detach().clone(), dim=(0, 2, 3)) / self.batch_num
        bias = self.running_mean.view(1, self.running_mean.shape[0], 1, 1)
        crop = self.threshold * torch.sqrt(self.running_var).view(1, self.running_var.shape[0], 1, 1)
        diff = input - bias
        if self.threshold == 0:
            output = input
        else:
            output = torch.where(torch.abs(diff) < crop, bias * torch.ones_like(input), input)
        return output


class PublishedMeanSparseTokens(PublishedMeanSparse):
    """``MeanSparse`` of the released Swin-L: the same buffers, on ``(B, L, C)`` tokens (dims (0, 1))."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.flag_update_statistics:
            self.running_mean += torch.mean(input.detach().clone(), dim=(0, 1)) / self.batch_num
            self.running_var += torch.var(input.detach().clone(), dim=(0, 1)) / self.batch_num
        bias = self.running_mean.view(1, 1, self.running_mean.shape[0])
        crop = self.threshold * torch.sqrt(self.running_var).view(1, 1, self.running_var.shape[0])
        diff = input - bias
        if self.threshold == 0:
            output = input
        else:
            output = torch.where(torch.abs(diff) < crop, bias * torch.ones_like(input), input)
        return output


class PublishedMeanSparseImageNet(nn.Module):
    """``MeanSparse_imagenet``: two unused buffers more, layout decided per call by ``x.shape[1] == C``."""

    def __init__(self, in_planes: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.register_buffer("momentum", torch.tensor(momentum))
        self.register_buffer("epsilon", torch.tensor(1.0e-10))
        self.register_buffer("running_mean", torch.zeros(in_planes))
        self.register_buffer("running_var", torch.zeros(in_planes))
        self.register_buffer("threshold", torch.tensor(0.0))
        self.register_buffer("flag_update_statistics", torch.tensor(0))
        self.register_buffer("batch_num", torch.tensor(0.0))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.shape[1] == self.running_mean.shape[0]:
            if self.flag_update_statistics:
                self.running_mean += torch.mean(input.detach().clone(), dim=(0, 2, 3)) / self.batch_num
                self.running_var += torch.var(input.detach().clone(), dim=(0, 2, 3)) / self.batch_num
            bias = self.running_mean.view(1, self.running_mean.shape[0], 1, 1)
            crop = self.threshold * torch.sqrt(self.running_var).view(1, self.running_var.shape[0], 1, 1)
        else:
            if self.flag_update_statistics:
                self.running_mean += torch.mean(input.detach().clone(), dim=(0, 1, 2)) / self.batch_num
                self.running_var += torch.var(input.detach().clone(), dim=(0, 1, 2)) / self.batch_num
            bias = self.running_mean.view(1, 1, 1, self.running_mean.shape[0])
            crop = self.threshold * torch.sqrt(self.running_var).view(1, 1, 1, self.running_var.shape[0])
        diff = input - bias
        if self.threshold == 0:
            output = input
        else:
            output = torch.where(torch.abs(diff) < crop, bias * torch.ones_like(input), input)
        return output


# ------------------------------------------------------- DeepMind WideResNet (robustbench dm_wide_resnet)
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2471, 0.2435, 0.2616)


class _Block(nn.Module):
    """``dm_wide_resnet._Block``; with ``published`` the three operators of ``Meansparse_wrn_70_16._Block``."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, activation_fn, published: bool) -> None:
        super().__init__()
        ms = PublishedMeanSparse if published else (lambda c: nn.Identity())
        self.batchnorm_0 = nn.BatchNorm2d(in_planes)
        self.meansparse_0 = ms(in_planes)
        self.relu_0 = activation_fn()
        self.conv_0 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.batchnorm_1 = nn.BatchNorm2d(out_planes)
        self.meansparse_1 = ms(out_planes)
        self.relu_1 = activation_fn()
        self.conv_1 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = in_planes != out_planes
        self.shortcut = (
            nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
            if self.has_shortcut
            else None
        )
        self._stride = stride
        self.meansparse_2 = ms(out_planes)
        if not published:  # the base architecture has no such attributes (identities would add nothing)
            del self.meansparse_0, self.meansparse_1, self.meansparse_2

    def _ms(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return getattr(self, name)(x) if hasattr(self, name) else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.has_shortcut:
            x = self.relu_0(self._ms("meansparse_0", self.batchnorm_0(x)))
        else:
            out = self.relu_0(self._ms("meansparse_0", self.batchnorm_0(x)))
        v = x if self.has_shortcut else out
        v = F.pad(v, (1, 1, 1, 1)) if self._stride == 1 else F.pad(v, (0, 1, 0, 1))
        out = self.conv_0(v)
        out = self.relu_1(self._ms("meansparse_1", self.batchnorm_1(out)))
        out = self.conv_1(out)
        out = torch.add(self.shortcut(x) if self.has_shortcut else x, out)
        return self._ms("meansparse_2", out)


class _BlockGroup(nn.Module):
    def __init__(self, num_blocks, in_planes, out_planes, stride, activation_fn, published) -> None:
        super().__init__()
        self.block = nn.Sequential(
            *[
                _Block(
                    i == 0 and in_planes or out_planes,
                    out_planes,
                    i == 0 and stride or 1,
                    activation_fn,
                    published,
                )
                for i in range(num_blocks)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x)


class DMWideResNet(nn.Module):
    """``robustbench.model_zoo.architectures.dm_wide_resnet.DMWideResNet`` (SiLU as in the published
    models); ``published=True`` adds the operators of ``Meansparse_wrn_70_16.DMWideResNet`` (3 per block,
    ``meansparse_end`` before the final activation)."""

    def __init__(
        self, depth: int = 10, width: int = 1, num_classes: int = 10, published: bool = False
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(3, 1, 1), persistent=False)
        num_channels = [16, 16 * width, 32 * width, 64 * width]
        num_blocks = (depth - 4) // 6
        self.init_conv = nn.Conv2d(3, num_channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.layer = nn.Sequential(
            _BlockGroup(num_blocks, num_channels[0], num_channels[1], 1, nn.SiLU, published),
            _BlockGroup(num_blocks, num_channels[1], num_channels[2], 2, nn.SiLU, published),
            _BlockGroup(num_blocks, num_channels[2], num_channels[3], 2, nn.SiLU, published),
        )
        self.batchnorm = nn.BatchNorm2d(num_channels[3])
        if published:
            self.meansparse_end = PublishedMeanSparse(num_channels[3])
        self.relu = nn.SiLU()
        self.logits = nn.Linear(num_channels[3], num_classes)
        self.num_channels = num_channels[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = (x - self.mean) / self.std
        out = self.init_conv(out)
        out = self.layer(out)
        out = self.batchnorm(out)
        if hasattr(self, "meansparse_end"):
            out = self.meansparse_end(out)
        out = self.relu(out)
        out = F.avg_pool2d(out, 8)
        out = out.view(-1, self.num_channels)
        return self.logits(out)


# --------------------------------------------------------------------- a channels-last published network
class ChannelsLastNet(nn.Module):
    """A ConvNeXt block with robustbench's ImageNet operators (``act`` -> ``Sequential(MeanSparse, act)`` on
    ``(N, H, W, 4C)``, ``drop_path`` -> ``Sequential(drop_path, MeanSparse)`` on ``(N, C, H, W)``) followed
    by a Swin block with the Swin operators on ``(B, L, C)`` tokens. H = 8 differs from 4C = 16 and from C."""

    def __init__(self, channels: int = 4) -> None:
        super().__init__()
        c = channels
        self.stem = nn.Conv2d(3, c, 4, stride=4)
        self.conv_dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.act = nn.Sequential(PublishedMeanSparseImageNet(4 * c), nn.GELU())
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)
        self.drop_path = nn.Sequential(nn.Identity(), PublishedMeanSparseImageNet(c))
        # Swin block: x + attn-ish(norm1(x)) -> meansparse1; x + mlp(norm2(x)) -> meansparse2
        self.norm1 = nn.LayerNorm(c)
        self.proj = nn.Linear(c, c)
        self.meansparse1 = PublishedMeanSparseTokens(c)
        self.norm2 = nn.LayerNorm(c)
        self.mlp_fc1 = nn.Linear(c, 3 * c)
        self.mlp_meansparse1 = PublishedMeanSparseTokens(3 * c)
        self.mlp_act = nn.GELU()
        self.mlp_fc2 = nn.Linear(3 * c, c)
        self.mlp_meansparse2 = PublishedMeanSparseTokens(c)
        self.meansparse2 = PublishedMeanSparseTokens(c)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        shortcut = x
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.fc2(self.act(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        y = y.mul(self.gamma.reshape(1, -1, 1, 1))
        x = self.drop_path(y) + shortcut
        t = x.flatten(2).transpose(1, 2)  # (B, L, C)
        t = self.meansparse1(t + self.proj(self.norm1(t)))
        m = self.mlp_fc2(self.mlp_act(self.mlp_meansparse1(self.mlp_fc1(self.norm2(t)))))
        t = self.meansparse2(t + self.mlp_meansparse2(m))
        return self.head(t.mean(1))


# ------------------------------------------------------------------------------------------- helpers
def randomize(model: nn.Module, alpha: float = 0.6, seed: int = 0) -> nn.Module:
    """Random weights, BatchNorm statistics and published buffers (a calibrated published model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.weight.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=gen) * 0.2)
            elif hasattr(module, "flag_update_statistics"):
                c = module.running_mean.numel()
                module.running_mean.copy_(torch.randn(c, generator=gen) * 0.3)
                module.running_var.copy_(torch.rand(c, generator=gen) * 0.8 + 0.1)
                module.threshold.fill_(alpha)
                module.batch_num.fill_(7.0)
    return model.eval()


def images(n: int = 2, size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def published_wrn(alpha: float = 0.6) -> DMWideResNet:
    torch.manual_seed(0)
    return randomize(DMWideResNet(depth=16, width=1, published=True), alpha)


def published_channels_last(alpha: float = 0.6) -> ChannelsLastNet:
    torch.manual_seed(0)
    return randomize(ChannelsLastNet(), alpha)


def same_without_threshold(model: nn.Module) -> nn.Module:
    """The published model with every threshold at 0 (its base model)."""
    base = copy.deepcopy(model)
    for _, module in find_published_modules(base):
        module.threshold.zero_()
    return base


# --------------------------------------------------------------------------------- convert_published
def test_convert_channels_first_reproduces_published_logits_exactly():
    published = published_wrn()
    x = images()
    with torch.no_grad():
        expected = published(x)
        base = same_without_threshold(published)(x)
    assert not torch.equal(expected, base)  # the operators really replace features at this alpha
    converted = convert_published(copy.deepcopy(published), x)
    ops = operators(converted)
    assert len(ops) == 3 * 6 + 1 and not find_published_modules(converted)
    assert {op.channel_dim for op in ops} == {1}
    with torch.no_grad():
        assert torch.equal(converted(x), expected)
    # the operators are ours: switching alpha to 0 gives the base model, BPDA works
    set_alpha(converted, 0.0)
    with torch.no_grad():
        assert torch.equal(converted(x), base)


def test_convert_channels_last_and_tokens_reproduce_published_logits_exactly():
    published = published_channels_last()
    x = images(size=32)
    with torch.no_grad():
        expected = published(x)
        assert not torch.equal(expected, same_without_threshold(published)(x))
    converted = convert_published(copy.deepcopy(published), x)
    layout = {s.module_path: (s.call, s.channel_dim) for s in placement_of(converted).sites}
    assert layout == {
        "act.0": ("MeanSparse_imagenet", -1),  # (N, 8, 8, 16): shape[1] = 8 != 16 channels
        "drop_path.1": ("MeanSparse_imagenet", 1),  # (N, 4, 8, 8): shape[1] == 4 channels
        "meansparse1": ("MeanSparse", -1),
        "mlp_meansparse1": ("MeanSparse", -1),
        "mlp_meansparse2": ("MeanSparse", -1),
        "meansparse2": ("MeanSparse", -1),
    }
    with torch.no_grad():
        assert torch.equal(converted(x), expected)


def test_straight_through_backward_after_conversion():
    """The published class has no BPDA; the converted operators do: identity backward in the band."""
    published = published_wrn(alpha=2.0)  # a wide band: many zero gradients under the exact backward
    x = images(2).requires_grad_(True)
    converted = convert_published(copy.deepcopy(published), x.detach())
    grads = {}
    for mode in ("exact", "straight_through"):
        for op in operators(converted):
            op.backward_mode = mode
        (grad,) = torch.autograd.grad(converted(x).sum(), x)
        grads[mode] = grad
    with torch.no_grad():
        assert torch.equal(converted(x), published(x))
    assert not torch.equal(grads["exact"], grads["straight_through"])


def test_converted_checkpoint_round_trip(tmp_path):
    published = published_channels_last()
    x = images()
    converted = convert_published(copy.deepcopy(published), x)
    path = save_checkpoint(converted, tmp_path / "converted.pt")
    fresh = ChannelsLastNet()  # random weights, zero published buffers: the checkpoint fills everything
    loaded = load_checkpoint(path, fresh)
    assert placement_of(loaded).strategy == "published"
    with torch.no_grad():
        assert torch.equal(loaded(x), published(x))


# ------------------------------------------------------------------------------------------- export
def test_export_round_trip_gives_the_published_state_dict_back():
    published = published_channels_last()
    x = images()
    original = published.state_dict()
    converted = convert_published(copy.deepcopy(published), x)
    exported = published_state_dict(converted)
    assert set(exported) == set(original)
    for key, value in original.items():
        if key.endswith("batch_num"):  # published averages are final: batch_num is written as 1
            assert float(exported[key]) == 1.0
        else:
            assert exported[key].dtype == value.dtype, key
            assert torch.equal(exported[key], value), key
    reloaded = ChannelsLastNet()
    reloaded.load_state_dict(exported, strict=True)
    reloaded.eval()
    # and into a converted fresh instance (zero published buffers: uncalibrated operators until loaded)
    fresh = convert_published(ChannelsLastNet().eval(), x)
    load_published_state_dict(fresh, exported)
    with torch.no_grad():
        assert torch.equal(reloaded(x), published(x))
        assert torch.equal(fresh(x), published(x))


# --------------------------------------------------------------------------------- state-dict route
def test_published_state_dict_into_preset_placement_on_the_base_architecture():
    published = published_wrn()
    x = images()
    torch.manual_seed(1)
    base = DMWideResNet(depth=16, width=1, published=False).eval()  # other random weights
    sparse = sparsify(base, x, preset="published_wrn")
    names = published_names(sparse)
    assert sorted(name for name, _ in names.values()) == sorted(
        p for p, _ in find_published_modules(published)
    )
    load_published_state_dict(sparse, published.state_dict())
    with torch.no_grad():
        assert torch.equal(sparse(x), published(x))
    # and back: the export is the published state dict (mean / std are non-persistent, as published)
    exported = published_state_dict(sparse)
    original = published.state_dict()
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items() if not k.endswith("batch_num"))


def test_state_dict_with_a_published_module_the_placement_lacks_is_refused():
    published = published_wrn()
    x = images()
    sparse = sparsify(
        DMWideResNet(depth=16, width=1).eval(), x, preset="published_wrn", sites=list(range(10))
    )
    with pytest.raises(CheckpointError, match="complete preset placement"):
        load_published_state_dict(sparse, published.state_dict())
    state = dict(published.state_dict())
    for buffer in ("running_mean", "running_var", "threshold", "flag_update_statistics", "batch_num"):
        state[f"extra.meansparse_9.{buffer}"] = torch.tensor(0.0)
    full = sparsify(DMWideResNet(depth=16, width=1).eval(), x, preset="published_wrn")
    with pytest.raises(CheckpointError, match="extra.meansparse_9"):
        load_published_state_dict(full, state)


def test_activations_preset_has_no_published_names():
    sparse = sparsify(DMWideResNet(depth=10, width=1).eval(), images(1))
    with pytest.raises(CheckpointError, match="no published counterpart"):
        published_names(sparse)


# ------------------------------------------------------------------------------------ statistics / errors
def test_published_statistics_are_kept_as_an_average_of_batch_variances():
    """Run the published calibration (flag on, batch_num batches): the converted operator keeps exactly the
    averaged per-batch unbiased variance, which differs from the population variance of all the data."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PublishedMeanSparse(4), nn.ReLU()).eval()
    module = model[1]
    batches = [torch.randn(5, 3, 6, 6) * (1 + i) for i in range(3)]
    module.flag_update_statistics.fill_(1)
    module.batch_num.fill_(len(batches))
    with torch.no_grad():
        features = [model[0](b) for b in batches]
        for b in batches:
            model(b)
    module.flag_update_statistics.fill_(0)
    module.threshold.fill_(0.5)
    averaged = sum(torch.var(f, dim=(0, 2, 3)) for f in features) / len(batches)
    population = torch.cat([f.transpose(0, 1).flatten(1) for f in features], 1).var(1, unbiased=False)
    assert torch.allclose(module.running_var, averaged)
    assert not torch.allclose(averaged, population, rtol=1e-2)
    converted = convert_published(model, batches[0])
    (op,) = operators(converted)
    assert torch.equal(op.var, module.running_var) and int(op.count) == 1


def test_flag_still_set_is_refused():
    published = published_wrn()
    published.layer[0].block[0].meansparse_1.flag_update_statistics.fill_(1)
    with pytest.raises(StatisticsError, match="flag_update_statistics"):
        convert_published(published, images(1))


def test_never_calibrated_published_module_becomes_an_uncalibrated_operator():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), PublishedMeanSparse(4), nn.ReLU()).eval()
    converted = convert_published(model, (3, 8, 8))
    assert not operators(converted)[0].is_calibrated
    with pytest.raises(UncalibratedOperatorError):
        converted(torch.rand(1, 3, 8, 8))


def test_model_without_published_modules_is_refused():
    with pytest.raises(PlacementError, match="no published-style"):
        convert_published(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), (3, 8, 8))


def test_batchnorm_is_not_mistaken_for_a_published_module():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), PublishedMeanSparse(4), nn.ReLU())
    assert [path for path, _ in find_published_modules(model)] == ["2"]
    assert isinstance(convert_published(model.eval(), (3, 8, 8))[2], MeanSparse)
