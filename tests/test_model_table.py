"""The whole Python API over a table of torchvision and timm architectures the other tests never saw, built
without weights at small inputs: sparsify, calibrate, alpha 0 is the identity, statistics equal a float64 brute
force of each operator's input, every site's channel axis is a layer width of the model (not a token or head
count), the straight-through gradient equals an independent BPDA formula, the checkpoint round-trips, and
``torch.export`` matches eager (fx-placed models), and the original's plain attributes and stochastic depth in
``train()`` survive.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from conftest import capture_operator_inputs
from timm.models.mlp_mixer import MlpMixer
from torch import nn

from meansparse_pl import (
    backward_mode,
    calibrate,
    load_checkpoint,
    operators,
    save_checkpoint,
    set_alpha,
    sparsify,
)

TV = torchvision.models


# name -> (factory, input shape); small widths / inputs keep the table within a minute on 2 CPU cores
TABLE = {
    "tv-resnet18": (lambda: TV.resnet18(num_classes=10), (3, 32, 32)),
    "tv-mobilenet_v3_small": (lambda: TV.mobilenet_v3_small(num_classes=10), (3, 32, 32)),
    "tv-efficientnet_b0": (lambda: TV.efficientnet_b0(num_classes=10), (3, 32, 32)),
    "tv-shufflenet_v2_x0_5": (lambda: TV.shufflenet_v2_x0_5(num_classes=10), (3, 32, 32)),
    "tv-regnet_y_400mf": (lambda: TV.regnet_y_400mf(num_classes=10), (3, 32, 32)),
    "tv-squeezenet1_1": (lambda: TV.squeezenet1_1(num_classes=10), (3, 64, 64)),
    "tv-densenet121": (lambda: TV.densenet121(num_classes=10), (3, 32, 32)),
    "tv-vit": (
        lambda: TV.VisionTransformer(
            32, 8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=48, num_classes=10
        ),
        (3, 32, 32),
    ),
    "tv-convnext_tiny": (lambda: TV.convnext_tiny(num_classes=10), (3, 32, 32)),
    "tv-swin_t": (lambda: TV.swin_t(num_classes=10), (3, 64, 64)),
    "tv-googlenet": (
        lambda: _kaiming(TV.googlenet(num_classes=10, aux_logits=False, init_weights=True)),
        (3, 64, 64),
    ),
    "timm-resnet10t": (lambda: timm.create_model("resnet10t", num_classes=10), (3, 32, 32)),
    "timm-resnet18d": (lambda: timm.create_model("resnet18d", num_classes=10), (3, 32, 32)),
    "timm-efficientformer_l1": (
        lambda: timm.create_model("efficientformer_l1", num_classes=10),
        (3, 224, 224),
    ),
    # its linear attention's ReLU sees (B, heads, N, d) after a reshape: the axis is stated, not guessed
    "timm-efficientvit_b0 (hooks)": (
        lambda: timm.create_model("efficientvit_b0", num_classes=10),
        (3, 128, 128),
        {"channel_dims": {"*.kernel_func": -1}},
    ),
    # at 224 pixels its token counts (196, 49, 16) differ from its widths: a token axis read as channels shows
    "timm-levit_128s": (lambda: timm.create_model("levit_128s", num_classes=10), (3, 224, 224)),
    "timm-mixer": (
        lambda: MlpMixer(num_classes=10, img_size=64, patch_size=16, num_blocks=2, embed_dim=32),
        (3, 64, 64),
    ),
    "timm-vit_tiny": (
        lambda: timm.create_model(
            "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=2, drop_path_rate=0.5
        ),
        (3, 32, 32),
    ),
    "timm-poolformer": (
        lambda: timm.create_model("poolformer_s12", num_classes=10, layers=(1, 1, 1, 1)),
        (3, 32, 32),
    ),
    "timm-mobilevit_xxs (hooks)": (lambda: timm.create_model("mobilevit_xxs", num_classes=10), (3, 64, 64)),
}


def _kaiming(model: nn.Module) -> nn.Module:
    """GoogLeNet's own initialisation (std 0.01) makes every logit its bias at these sizes."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            nn.init.kaiming_normal_(module.weight)
    return model


def _no_zero_layers(model: nn.Module) -> nn.Module:
    """Zero-initialised linear layers (torchvision's and timm's classifier heads) get random weights: constant
    logits would hide every difference the checks look for."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and not module.weight.any():
            nn.init.normal_(module.weight, std=0.2)
    return model


def _layer_widths(model: nn.Module) -> set[int]:
    """Every channel count a conv / linear / norm layer of the model produces (an independent list: the sites'
    channels must be among them, whatever the axis inference did)."""
    widths = set()
    for module in model.modules():
        for attribute in ("out_channels", "out_features", "num_features", "num_channels"):
            value = getattr(module, attribute, None)
            if isinstance(value, int):
                widths.add(value)
        if isinstance(module, nn.LayerNorm):
            widths.add(int(module.normalized_shape[-1]))
        for attribute, value in vars(module).items():  # head widths of attention blocks (val_attn_dim, ...)
            if attribute.endswith("dim") and isinstance(value, int) and not isinstance(value, bool):
                widths.add(value)
    return widths


def _bpda_gradient(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The straight-through gradient by its textbook formula, independent of the operators' own backward: each
    operator's output is ``x + (op(x) - x).detach()``."""
    handles = []
    for op in operators(model):

        def bpda(module, args, output):
            inp = args[0]
            # the value is output's exactly ((inp - inp) is exactly 0), the gradient flows to inp unchanged
            return (inp - inp.detach()) + output.detach() if module.activation is None else None

        handles.append(op.register_forward_hook(bpda))
    try:
        xi = x.clone().requires_grad_()
        with backward_mode(model, "exact"):
            model(xi).sum().backward()
        return xi.grad
    finally:
        for handle in handles:
            handle.remove()


@pytest.mark.parametrize("name", list(TABLE))
def test_the_python_api_on_an_architecture(name, tmp_path):
    factory, shape, *options = TABLE[name]
    torch.manual_seed(0)
    base = _no_zero_layers(factory().eval())
    g = torch.Generator().manual_seed(1)
    batches = [torch.rand(2, *shape, generator=g) for _ in range(2)]
    sparse = sparsify(copy.deepcopy(base), shape, fuse_activations=False, **(options[0] if options else {}))
    ops = operators(sparse)
    assert ops, name
    assert ("hooks" in name) == (sparse.meansparse_placement.strategy == "hooks")
    # every site's channels are a layer width (before: LeViT's token counts 196 / 49 passed as channels)
    widths = _layer_widths(base)
    assert all(op.num_channels in widths for op in ops), [
        (op.site_name, op.channel_dim, op.num_channels) for op in ops if op.num_channels not in widths
    ]
    calibrate(sparse, batches, progress=False)
    x = batches[0]
    with torch.no_grad():
        assert torch.equal(sparse(x), base(x))  # alpha 0: the base model, bit for bit
    # statistics: a float64 brute force of every operator's input on its axis
    for op, inputs in capture_operator_inputs(sparse, batches).items():
        flat = inputs.double().movedim(op.channel_dim % inputs.dim(), -1).reshape(-1, op.num_channels)
        torch.testing.assert_close(op.mean.double(), flat.mean(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(op.var.double(), flat.var(0, unbiased=False), rtol=1e-4, atol=1e-6)
    set_alpha(sparse, 0.3)
    with torch.no_grad():
        changed = sparse(x)
    assert not torch.equal(changed, base(x))
    # straight-through backward equals the BPDA formula
    xi = x.clone().requires_grad_()
    with backward_mode(sparse, "straight_through"):
        sparse(xi).sum().backward()
    torch.testing.assert_close(xi.grad, _bpda_gradient(sparse, x), rtol=1e-5, atol=1e-6)
    # checkpoint round trip onto a fresh instance of the architecture
    save_checkpoint(sparse, tmp_path / "m.pt")
    torch.manual_seed(5)
    loaded = load_checkpoint(tmp_path / "m.pt", _no_zero_layers(factory().eval()))
    with torch.no_grad():
        assert torch.equal(loaded(x), changed)
    # the original's interface: plain attributes carried over, stochastic depth still stochastic in train()
    for attribute in ("num_classes", "pretrained_cfg", "num_features"):
        if hasattr(base, attribute):
            assert getattr(sparse, attribute) == getattr(base, attribute), attribute
    if any(
        getattr(m, "drop_prob", getattr(m, "p", 0)) > 0 for m in base.modules() if "Drop" in type(m).__name__
    ):
        trained = copy.deepcopy(sparse)  # train() updates BatchNorm statistics: on a copy
        with torch.no_grad():
            assert not torch.equal(trained.train()(x), trained.eval()(x))  # before: frozen to eval
    if sparse.meansparse_placement.strategy == "fx":
        exported = torch.export.export(sparse, (x,))
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), changed, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------ channel axes from data flow
class LinearNormTokens(nn.Module):
    """LeViT's pattern: ``Linear -> flatten(0, 1) -> BatchNorm1d -> reshape_as -> act`` on (B, N, C) tokens,
    with N != C; the channels are the last axis, although BatchNorm1d reads axis 1 of the flattened tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.linear, self.bn, self.act, self.head = (
            nn.Linear(8, 12),
            nn.BatchNorm1d(12),
            nn.Hardswish(),
            nn.Linear(12, 3),
        )

    def forward(self, x):  # x: (B, 5, 8)
        y = self.linear(x)
        return self.head(self.act(self.bn(y.flatten(0, 1)).reshape_as(y)).mean(1))


class UntraceableConv1d(nn.Module):
    """(N, C, L) signals with L > C, in a model torch.fx cannot trace (hook placement)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.act, self.head = nn.Conv1d(2, 8, 3, padding=1), nn.ReLU(), nn.Linear(8, 3)

    def forward(self, x):  # x: (N, 2, 50)
        if x.sum() > -1e9:  # data-dependent control flow
            x = self.act(self.conv(x))
        return self.head(x.mean(-1))


class UntraceableHeads(nn.Module):
    """(B, heads, N, d) after a reshape, in a model torch.fx cannot trace: no layer feeds the activation
    directly and the shape has no square pair, so the channel axis cannot be read."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.act, self.head = nn.Linear(8, 12), nn.ReLU(), nn.Linear(12, 3)

    def forward(self, x):  # x: (B, 5, 8)
        if x.sum() > -1e9:
            q = self.act(self.qkv(x).reshape(x.shape[0], 5, 2, 6).transpose(1, 2))  # (B, 2 heads, 5, 6)
            x = q.transpose(1, 2).reshape(x.shape[0], 5, 12)
        return self.head(x.mean(1))


def test_channel_axes_follow_the_data_flow():
    from meansparse_pl.errors import PlacementError

    sparse = sparsify(LinearNormTokens().eval(), (5, 8))
    (op,) = operators(sparse)
    assert (sparse.meansparse_placement.strategy, op.channel_dim, op.num_channels) == ("fx", -1, 12)
    sparse = sparsify(UntraceableConv1d().eval(), (2, 50))
    (op,) = operators(sparse)
    assert (sparse.meansparse_placement.strategy, op.channel_dim, op.num_channels) == ("hooks", 1, 8)
    with pytest.raises(PlacementError, match=r"give it with channel_dims=\{'act': <axis>\}"):
        sparsify(UntraceableHeads().eval(), (5, 8))
    (op,) = operators(sparsify(UntraceableHeads().eval(), (5, 8), channel_dims={"act": -1}))
    assert (op.channel_dim, op.num_channels) == (-1, 6)
    batches = [torch.rand(4, 2, 50) for _ in range(2)]
    model = sparsify(UntraceableConv1d().eval(), (2, 50))
    calibrate(model, batches, progress=False)
    inputs = torch.cat([model.conv(b) for b in batches]).detach().double()
    torch.testing.assert_close(operators(model)[0].mean.double(), inputs.mean((0, 2)), rtol=0, atol=1e-6)


class UntraceableInPlace(nn.Module):
    """In-place activations under hook placement, one of them used as a statement (the model keeps reading the
    tensor the activation mutated)."""

    def __init__(self, inplace: bool) -> None:
        super().__init__()
        self.inplace = inplace
        self.conv, self.bn, self.act = (
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(inplace=inplace),
        )
        self.conv2, self.act2, self.head = (
            nn.Conv2d(8, 8, 3, padding=1),
            nn.SiLU(inplace=inplace),
            nn.Linear(8, 4),
        )

    def forward(self, x):
        if x.sum() > -1e9:  # data-dependent control flow: hook placement
            y = self.bn(self.conv(x))
            if self.inplace:
                self.act(y)
            else:
                y = self.act(y)
            y = self.act2(self.conv2(y))
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize("size", [8, 128])  # 2 x 8 x 128 x 128 = 2^18 elements: the fused kernels' size
@pytest.mark.parametrize("mode", ["exact", "straight_through", "surrogate"])
def test_hook_placement_with_in_place_activations_in_every_backward_mode(size, mode):
    """The operator may keep its input for the backward (the fused exact kernel, the surrogate): the in-place
    activation must not overwrite it. Outputs and input gradients equal the same model without in-place ops."""
    torch.manual_seed(0)
    inplace, plain = UntraceableInPlace(True).eval(), UntraceableInPlace(False).eval()
    plain.load_state_dict(inplace.state_dict())
    x = torch.rand(2, 3, size, size)
    results = []
    for model in (inplace, plain):
        sparse = sparsify(model, x[:1])
        assert sparse.meansparse_placement.strategy == "hooks" and len(operators(sparse)) == 2
        calibrate(sparse, [x], progress=False)
        set_alpha(sparse, 0.3)
        xi = x.clone().requires_grad_()
        with backward_mode(sparse, mode):
            out = sparse(xi)
            out.sum().backward()
        results.append((out.detach(), xi.grad))
    assert torch.equal(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1], rtol=0, atol=1e-7)


def test_a_shape_check_traced_into_the_graph_reads_as_a_sentence():
    """Before: "Input height (Proxy(getitem_2)) doesn't match model (32)", fx's placeholders in the message."""
    model = timm.create_model(
        "vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8, depth=1
    ).eval()
    sparse = sparsify(model, (3, 32, 32))
    calibrate(sparse, [torch.rand(2, 3, 32, 32)], progress=False)
    with pytest.raises(AssertionError) as error:
        sparse(torch.rand(1, 3, 64, 64))
    assert "Proxy(" not in str(error.value)
    assert "traced for inputs of shape (3, 32, 32); sparsify the model again" in str(error.value)


def test_a_hook_registered_after_sparsify_on_a_fused_activation_fires():
    """Before: the fused ReLU module was no longer called, so a hook registered on it later never fired."""
    model = TV.resnet18(num_classes=10).eval()
    sparse = sparsify(model, (3, 32, 32))
    calibrate(sparse, [torch.rand(4, 3, 32, 32)], progress=False)
    set_alpha(sparse, 0.2)
    fused = [op for op in operators(sparse) if op.activation is not None]
    assert fused and fused[0].site_name.endswith("in relu)")
    x = torch.rand(2, 3, 32, 32)
    seen = []
    relu = sparse.get_submodule("layer1.0.relu")  # called twice per forward by torchvision's BasicBlock
    handle = relu.register_forward_hook(lambda module, args, out: seen.append(out.detach().clone()))
    with torch.no_grad():
        hooked = sparse(x)
    handle.remove()
    with torch.no_grad():
        assert torch.equal(sparse(x), hooked)  # the same numbers with and without the hook
    assert len(seen) == 2 and all(bool((out >= 0).all()) for out in seen)  # ReLU outputs, one per call
    with torch.no_grad():
        first = operators(sparse)[1]
        inputs = []
        pre = first.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach().clone()))
        sparse(x)
        pre.remove()
        assert torch.equal(seen[0], torch.relu(first.without_activation(inputs[0])))
