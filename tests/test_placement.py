"""Tests of operator placement: call-site discovery (fx and hooks), channel layout, selection rules, errors."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import (
    AmbiguousLayoutNet,
    ConvNeXtBlockNet,
    DataDependentFunctionalNet,
    DataDependentNet,
    FunctionalResNet,
    MethodReluNet,
    NoActivationNet,
    ReusedActivationNet,
    SENet,
    SquareplusNet,
    TransformerBlockNet,
    WideResNetTiny,
    capture_operator_inputs,
    make_batches,
    randomize_batchnorm,
)
from torch import nn

from meansparse_pl import calibrate, describe, find_sites, register_activation, set_alpha, sparsify
from meansparse_pl.errors import ConfigurationError, PlacementError
from meansparse_pl.ops import operators
from meansparse_pl.placement import Placement, layout, placement_of, registry

pytestmark = pytest.mark.usefixtures("single_thread")


def resnet18() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10))


RESNET18_SITES = [(1, 64)] * 5 + [(1, 128)] * 4 + [(1, 256)] * 4 + [(1, 512)] * 4

# name -> (factory, input shape without batch, expected [(channel_dim, channels)] per site in forward order,
#          expected module path per site, expected call per site)
ARCHITECTURES = {
    "torchvision-resnet18": (
        resnet18,
        (3, 32, 32),
        RESNET18_SITES,
        ["relu"] + [f"layer{i}.{j}.relu" for i in range(1, 5) for j in range(2) for _ in range(2)],
        ["nn.ReLU"] * 17,
    ),
    "functional-resnet": (
        lambda: randomize_batchnorm(FunctionalResNet()),
        (3, 8, 8),
        [(1, 6)] * 5,
        ["", "layer1", "layer1", "layer2", "layer2"],
        ["F.relu"] * 5,
    ),
    "tensor-relu-and-torch-relu": (
        MethodReluNet,
        (3, 8, 8),
        [(1, 5), (1, 7)],
        ["", ""],
        ["Tensor.relu", "torch.relu"],
    ),
    "reused-activation-module": (
        ReusedActivationNet,
        (3, 8, 8),
        [(1, 4), (1, 6), (1, 5)],
        ["act"] * 3,
        ["nn.ReLU"] * 3,
    ),
    "wideresnet-silu": (
        lambda: randomize_batchnorm(WideResNetTiny()),
        (3, 8, 8),
        [(1, 4), (1, 8), (1, 8)],
        ["block.act1", "block.act2", "act"],
        ["nn.SiLU"] * 3,
    ),
    "transformer-NLC-gelu": (
        TransformerBlockNet,
        (6, 8),  # L = 6 tokens of width C = 8, MLP hidden width 12
        [(-1, 12)],
        ["act"],
        ["nn.GELU"],
    ),
    "convnext-channels-last": (
        ConvNeXtBlockNet,
        (3, 12, 12),  # features (N, 8, 6, 6) and MLP (N, 6, 6, 16): H == W, C != W
        [(1, 8), (-1, 16)],
        ["stem_act", "act"],
        ["nn.ReLU", "nn.GELU"],
    ),
    "ambiguous-H-W-C": (
        AmbiguousLayoutNet,
        (4, 4, 4),  # H == W == C == 4: the producer decides (Conv -> 1, Linear -> -1)
        [(1, 4), (-1, 4)],
        ["relu", "gelu"],
        ["nn.ReLU", "nn.GELU"],
    ),
    "squeeze-excitation": (
        SENet,
        (3, 8, 8),
        [(1, 6), (1, 2), (1, 6)],
        ["relu", "block.se.relu", "block.relu"],
        ["nn.ReLU"] * 3,
    ),
}


def _batches(shape, n=24, batch_size=8, seed=0):
    return make_batches(shape, n, batch_size, seed=seed)


def _reference_moments(x: torch.Tensor, channel_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    channel_dim = channel_dim % x.dim()
    flat = x.double().movedim(channel_dim, -1).reshape(-1, x.shape[channel_dim])
    return flat.mean(0), flat.var(0, unbiased=False)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_placement_on_architecture(name):
    factory, shape, expected, paths, calls = ARCHITECTURES[name]
    model = factory().eval()
    batches = _batches(shape, n=16)
    with torch.no_grad():
        reference = [model(b) for b in batches]

    sites = find_sites(model, shape)
    assert [(s.channel_dim, s.num_channels) for s in sites] == expected
    assert [s.module_path for s in sites] == paths
    assert [s.call for s in sites] == calls
    assert [s.index for s in sites] == list(range(len(expected)))

    sparse = sparsify(model, shape)
    ops = operators(sparse)
    assert len(ops) == len(expected)
    assert len({id(op) for op in ops}) == len(ops)  # a reused activation gets one operator per call site
    assert placement_of(sparse).strategy == "fx"
    assert [(op.channel_dim, op.num_channels) for op in ops] == expected

    summary = calibrate(sparse, batches, progress=False)
    assert summary.sites == len(expected) and summary.images == 16 and summary.batches == 2
    assert all(op.is_calibrated for op in ops)

    # alpha 0 (the default after calibration): no output bit changes
    with torch.no_grad():
        for batch, ref in zip(batches, reference, strict=True):
            assert torch.equal(sparse(batch), ref)

    # the statistics were taken on the channel axis placement chose (checks the layout numerically)
    captured = capture_operator_inputs(sparse, batches)
    for op in ops:
        mean, var = _reference_moments(captured[op], op.channel_dim)
        torch.testing.assert_close(op.mean.double(), mean, rtol=1e-6, atol=1e-6 * var.sqrt().max().item())
        torch.testing.assert_close(op.var.double(), var, rtol=1e-6, atol=0)

    # alpha > 0 changes the outputs, and every operator takes part
    set_alpha(sparse, 0.5)
    with torch.no_grad():
        changed = [not torch.equal(sparse(b), ref) for b, ref in zip(batches, reference, strict=True)]
    assert all(changed)
    for op in ops:
        x = captured[op][:8]
        assert not torch.equal(op(x), x)


def test_torchvision_resnet_reused_relu_gets_separate_statistics():
    model = resnet18().eval()
    sparse = sparsify(model, (3, 32, 32))
    calibrate(sparse, _batches((3, 32, 32), n=8, batch_size=4), progress=False)
    sites = placement_of(sparse).sites
    by_name = dict(sparse.named_modules())
    # layer1.0.relu is called twice in BasicBlock: sites 1 (main path) and 2 (after the residual sum)
    assert sites[1].module_path == sites[2].module_path == "layer1.0.relu"
    first, second = by_name[sites[1].operator_name], by_name[sites[2].operator_name]
    assert first is not second
    assert not torch.allclose(first.mean, second.mean)
    # the parameters are shared with the original model (no copy)
    assert sparse.conv1.weight is model.conv1.weight


def test_convnext_hook_strategy_also_finds_channels_last():
    # without the producer information the hook strategy relies on the shape rule: (N, 6, 6, 16) -> dim -1
    sites = find_sites(ConvNeXtBlockNet(), (3, 12, 12), strategy="hooks")
    assert [(s.channel_dim, s.num_channels) for s in sites] == [(1, 8), (-1, 16)]


def test_shape_rule_for_channel_dim():
    infer = layout.infer_channel_dim_from_shape
    assert infer((2, 7)) == 1
    assert infer((2, 9, 5)) == -1
    assert infer((2, 16, 8, 8)) == 1  # (N, C, H, W)
    assert infer((2, 8, 8, 16)) == -1  # (N, H, W, C) with H == W, C != W
    assert infer((2, 16, 8, 5)) == 1  # nothing square: channels-first default


def test_channel_dims_override():
    sites = find_sites(AmbiguousLayoutNet(), (4, 4, 4), channel_dims={"gelu": 1})
    assert [s.channel_dim for s in sites] == [1, 1]


# -------------------------------------------------------------------------------------------- selection
def test_exclude_squeeze_excitation():
    model = SENet().eval()
    sparse = sparsify(model, (3, 8, 8), exclude=["*.se.*"])
    sites = placement_of(sparse).sites
    assert [s.module_path for s in sites] == ["relu", "block.relu"]
    assert [s.index for s in sites] == [0, 2]
    assert len(operators(sparse)) == 2
    batches = _batches((3, 8, 8))
    calibrate(sparse, batches, progress=False)
    # the SE ReLU has no operator in front of it: its input is untouched even at a large alpha
    set_alpha(sparse, 2.0)
    se_inputs = []
    handle = model.block.se.relu.register_forward_pre_hook(lambda m, args: se_inputs.append(args[0]))
    with torch.no_grad():
        sparse(batches[0])
    handle.remove()
    with torch.no_grad():
        y = model.relu(operators(sparse)[0](model.stem(batches[0])))
        conv = model.block.conv(y)
        expected = model.block.se.reduce(conv.mean(dim=(2, 3), keepdim=True))
    torch.testing.assert_close(se_inputs[0], expected, rtol=0, atol=0)


def test_include_patterns():
    sparse = sparsify(SENet(), (3, 8, 8), include=["block.*"])
    assert [s.module_path for s in placement_of(sparse).sites] == ["block.se.relu", "block.relu"]
    sparse = sparsify(SENet(), (3, 8, 8), include=["block.*"], exclude=["*.se.*"])
    assert [s.module_path for s in placement_of(sparse).sites] == ["block.relu"]


def test_include_matching_nothing_is_an_error():
    with pytest.raises(PlacementError, match="nomatch"):
        sparsify(SENet(), (3, 8, 8), include=["nomatch.*"])
    with pytest.raises(PlacementError, match="no activation site"):
        sparsify(SENet(), (3, 8, 8), exclude=["*"])


def test_site_indices_selection():
    model = randomize_batchnorm(FunctionalResNet()).eval()
    sparse = sparsify(model, (3, 8, 8), sites=[0, 2, 4])
    sites = placement_of(sparse).sites
    assert [s.index for s in sites] == [0, 2, 4]
    assert [s.operator_name for s in sites] == ["meansparse_0", "meansparse_2", "meansparse_4"]
    assert len(operators(sparse)) == 3
    batches = _batches((3, 8, 8))
    calibrate(sparse, batches, progress=False)
    with torch.no_grad():
        assert torch.equal(sparse(batches[0]), model(batches[0]))
    with pytest.raises(PlacementError, match="out of range"):
        sparsify(FunctionalResNet(), (3, 8, 8), sites=[5])
    with pytest.raises(PlacementError):
        sparsify(FunctionalResNet(), (3, 8, 8), sites=[])


def test_model_without_activation_is_an_error():
    with pytest.raises(PlacementError, match="no activation"):
        sparsify(NoActivationNet(), (3, 8, 8))


def test_already_sparsified_model_is_an_error():
    sparse = sparsify(MethodReluNet(), (3, 8, 8))
    with pytest.raises(PlacementError, match="already"):
        sparsify(sparse, (3, 8, 8))
    hooked = sparsify(DataDependentNet(), (3, 8, 8))
    with pytest.raises(PlacementError, match="already"):
        sparsify(hooked, (3, 8, 8))


def test_invalid_arguments():
    with pytest.raises(ConfigurationError):
        sparsify(MethodReluNet(), (3, 8, 8), alpha=-1.0)
    with pytest.raises(ConfigurationError):
        sparsify(MethodReluNet(), (3, 8, 8), strategy="magic")
    with pytest.raises(ConfigurationError):
        register_activation(42)


# ---------------------------------------------------------------------------------------- hook fallback
def _data_dependent_site_inputs(model: DataDependentNet, batches):
    """The three call-site inputs of DataDependentNet computed by hand from its submodules."""
    with torch.no_grad():
        first = torch.cat([model.conv(b) for b in batches])
        second = 3.0 * torch.relu(first) + 2.0
        third = model.fc(torch.relu(second).mean(dim=(2, 3)))
    return first, second, third


def test_hook_fallback_for_untraceable_model():
    model = DataDependentNet().eval()
    batches = _batches((3, 8, 8))
    with torch.no_grad():
        reference = [model(b) for b in batches]
    with pytest.raises(PlacementError, match="cannot trace"):
        sparsify(DataDependentNet(), (3, 8, 8), strategy="fx")

    sparse = sparsify(model, (3, 8, 8))
    assert sparse is model
    placement = placement_of(sparse)
    assert placement.strategy == "hooks"
    assert [s.module_path for s in placement.sites] == ["act", "act", "out_act"]
    ops = operators(sparse)
    assert len(ops) == 3
    calibrate(sparse, batches, progress=False)

    # the reused module's two call sites have their own statistics, equal to the brute force
    for op, x in zip(ops, _data_dependent_site_inputs(model, batches), strict=True):
        mean, var = _reference_moments(x, 1)
        torch.testing.assert_close(op.mean.double(), mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(op.var.double(), var, rtol=1e-6, atol=0)
    assert (ops[1].mean - ops[0].mean).abs().min() > 1.0  # 3 * relu(x) + 2 >= 2, x itself is centred

    with torch.no_grad():
        for batch, ref in zip(batches, reference, strict=True):
            assert torch.equal(sparse(batch), ref)
        set_alpha(sparse, 0.5)
        assert all(not torch.equal(sparse(b), ref) for b, ref in zip(batches, reference, strict=True))
        # repeated forwards dispatch from the first call site again (the call counter is reset per forward)
        assert torch.equal(sparse(batches[0]), sparse(batches[0]))


def test_hook_strategy_with_site_selection_keeps_call_order():
    model = DataDependentNet().eval()
    sparse = sparsify(model, (3, 8, 8), sites=[1])
    ops = operators(sparse)
    assert len(ops) == 1 and placement_of(sparse).sites[0].index == 1
    batches = _batches((3, 8, 8))
    calibrate(sparse, batches, progress=False)
    mean, var = _reference_moments(_data_dependent_site_inputs(model, batches)[1], 1)
    torch.testing.assert_close(ops[0].mean.double(), mean, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(ops[0].var.double(), var, rtol=1e-6, atol=0)


def test_untraceable_model_with_functional_relu_names_the_module():
    with pytest.raises(PlacementError, match="`body` calls F.relu"):
        sparsify(DataDependentFunctionalNet(), (3, 8, 8))


# ------------------------------------------------------------------------------------------- describe
@pytest.mark.parametrize("factory", [lambda: randomize_batchnorm(FunctionalResNet()), DataDependentNet])
def test_describe_lists_every_site(factory):
    sparse = sparsify(factory().eval(), (3, 8, 8), alpha=0.25)
    sites = placement_of(sparse).sites
    before = describe(sparse)
    calibrate(sparse, _batches((3, 8, 8)), progress=False)
    text = describe(sparse)
    rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(sites)
    for row, site in zip(rows, sites, strict=True):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(site.index)
        assert cells[1] == (site.module_path or "(root)")
        assert cells[2] == site.call + (" (fused)" if site.fused_activation else "")
        assert cells[3] == str(site.channel_dim) and cells[4] == str(site.num_channels)
        assert cells[6] == "0.25"
        assert cells[7] == "yes"
    assert "| no |" in before and "| yes |" not in before
    assert f"{len(sites)} operators" in text


def test_placement_record_round_trips():
    sparse = sparsify(SENet(), (3, 8, 8), exclude=["*.se.*"])
    placement = placement_of(sparse)
    assert Placement.from_dict(placement.to_dict()) == placement
    with pytest.raises(PlacementError):
        placement_of(SENet())


# ---------------------------------------------------------------------------------- probe side effects
@pytest.mark.parametrize("strategy", ["fx", "hooks"])
def test_probe_forward_leaves_batchnorm_and_modes_alone(strategy):
    model = randomize_batchnorm(WideResNetTiny())
    model.train()
    model.block.eval()  # a mixed train / eval state must come back exactly
    modes = {name: m.training for name, m in model.named_modules()}
    state = copy.deepcopy(model.state_dict())
    sparse = sparsify(model, torch.randn(4, 3, 8, 8), strategy=strategy)
    assert {name: m.training for name, m in model.named_modules() if name in modes} == modes
    assert sparse.training
    after = model.state_dict()
    assert state.keys() <= after.keys()
    for key, value in state.items():
        assert torch.equal(after[key], value), key


# --------------------------------------------------------------------------------- custom activations
def test_registered_custom_activation_is_found(monkeypatch):
    monkeypatch.setattr(registry, "ACTIVATION_MODULES", list(registry.ACTIVATION_MODULES))
    with pytest.raises(PlacementError, match="register"):
        sparsify(SquareplusNet(), (3, 8, 8))
    from conftest import Squareplus

    register_activation(Squareplus)
    model = SquareplusNet().eval()
    sites = find_sites(model, (3, 8, 8))
    assert [(s.module_path, s.call, s.num_channels) for s in sites] == [("act", "nn.Squareplus", 4)]
    sparse = sparsify(model, (3, 8, 8))
    batches = _batches((3, 8, 8))
    calibrate(sparse, batches, progress=False)
    with torch.no_grad():
        assert torch.equal(sparse(batches[0]), model(batches[0]))


def test_registered_custom_activation_function_is_found(monkeypatch):
    monkeypatch.setattr(registry, "ACTIVATION_FUNCTIONS", dict(registry.ACTIVATION_FUNCTIONS))

    class TanhNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            return torch.tanh(self.conv(x)).mean(dim=(2, 3))

    assert find_sites(TanhNet(), (3, 8, 8)) == []
    with pytest.raises(PlacementError, match="no activation"):
        sparsify(TanhNet(), (3, 8, 8))
    register_activation(torch.tanh, "torch.tanh")
    sites = find_sites(TanhNet(), (3, 8, 8))
    assert [(s.call, s.channel_dim, s.num_channels) for s in sites] == [("torch.tanh", 1, 4)]


def test_operators_are_created_on_the_model_device():
    # the meta device stands in for a GPU: operators created on the CPU next to a CUDA model would fail at the
    # first forward (and calibration would move the images to the wrong device)
    sparse = sparsify(MethodReluNet().to("meta"), (3, 8, 8))
    assert {b.device.type for op in operators(sparse) for b in op.buffers()} == {"meta"}


@pytest.mark.parametrize("factory", [lambda: randomize_batchnorm(FunctionalResNet()), DataDependentNet])
def test_copy_and_pickle_keep_the_placement_and_outputs(factory):
    sparse = sparsify(factory().eval(), (3, 8, 8))
    batches = _batches((3, 8, 8))
    calibrate(sparse, batches, progress=False)
    set_alpha(sparse, 0.4)
    buffer = io.BytesIO()
    torch.save(sparse, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(sparse), torch.load(buffer, weights_only=False)):
        assert placement_of(clone) == placement_of(sparse)
        assert describe(clone) == describe(sparse)
        with torch.no_grad():
            assert torch.equal(clone(batches[0]), sparse(batches[0]))
        set_alpha(clone, 0.0)  # the clone owns its operators
        assert float(operators(sparse)[0].alpha) == pytest.approx(0.4)


# ------------------------------------------------------------------------------------ in-place activations
class InplaceStatementNet(nn.Module):
    """In-place activations used as statements: the model keeps reading the mutated input tensor."""

    def __init__(self, traceable: bool = True) -> None:
        super().__init__()
        self.traceable = traceable
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x)
        if not self.traceable and y.sum() > 0:  # data-dependent: forces the hook strategy
            y = y * 1.0
        self.act(y)  # result discarded, y itself is activated
        z = self.conv2(y)
        if self.traceable:
            F.relu(z, True)  # positional inplace flag
            z.relu_()  # a second, idempotent in-place call site
        else:
            self.act(z)
        return self.fc(z.mean(dim=(2, 3)))


def _inplace_reference(model: InplaceStatementNet, ops, x: torch.Tensor) -> torch.Tensor:
    """The intended sparsified forward, written out of place by hand."""
    y = torch.relu(ops[0](model.conv1(x)))
    z = model.conv2(y)
    for op in ops[1:]:
        z = torch.relu(op(z))
    return model.fc(z.mean(dim=(2, 3)))


@pytest.mark.parametrize("traceable", [True, False], ids=["fx", "hooks"])
def test_inplace_activation_used_as_a_statement(traceable):
    model = InplaceStatementNet(traceable).eval()
    batches = _batches((3, 8, 8))
    with torch.no_grad():
        reference = model(batches[0])
    sparse = sparsify(model, (3, 8, 8))
    assert placement_of(sparse).strategy == ("fx" if traceable else "hooks")
    ops = operators(sparse)
    assert len(ops) == (3 if traceable else 2)
    calibrate(sparse, batches, progress=False)
    with torch.no_grad():
        assert torch.equal(sparse(batches[0]), reference)
    set_alpha(sparse, 0.5)
    for mode in ("exact", "straight_through"):
        for op in ops:
            op.backward_mode = mode
        x1 = batches[0].clone().requires_grad_()
        x2 = batches[0].clone().requires_grad_()
        out = sparse(x1)
        expected = _inplace_reference(model, ops, x2)
        assert not torch.allclose(expected, reference)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
        out.square().sum().backward()
        expected.square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad)
