"""Backbone registry, architectures, input normalisation and activations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.models import (
    Normalize,
    NormalizedClassifier,
    PSiLU,
    PSSiLU,
    _registry,
    activations,
    create_model,
    get_activation,
    list_activations,
    list_models,
    register_backbone_activation,
    register_model,
)

# (name, architecture kwargs that keep the net tiny, input channels, input side)
TINY_MODELS = [
    ("resnet18", {"base_width": 4}, 3, 32),
    ("resnet18", {"base_width": 4}, 1, 28),
    ("preact_resnet18", {"base_width": 4}, 3, 32),
    ("wrn_28_10", {"depth": 10, "widen_factor": 1}, 3, 32),
    ("wrn_34_10", {"depth": 10, "widen_factor": 1}, 3, 32),
    ("wrn_70_16", {"depth": 10, "widen_factor": 1}, 3, 32),
    ("small_cnn", {}, 1, 28),
    ("small_cnn", {"channels": (4, 8), "hidden": 16, "input_size": 32}, 3, 32),
]
ACTIVATION_TYPES = (
    nn.ReLU,
    nn.ELU,
    nn.GELU,
    nn.SiLU,
    nn.LeakyReLU,
    nn.Softplus,
    nn.Mish,
    nn.Hardswish,
    PSiLU,
    PSSiLU,
)


def test_list_models_has_every_architecture() -> None:
    assert list_models() == [
        "preact_resnet18",
        "resnet18",
        "robustbench",
        "small_cnn",
        "wrn_28_10",
        "wrn_34_10",
        "wrn_70_16",
    ]


@pytest.mark.parametrize(("name", "kwargs", "channels", "side"), TINY_MODELS)
def test_model_builds_and_returns_logits(name: str, kwargs: dict, channels: int, side: int) -> None:
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, in_channels=channels, **kwargs).eval()
    logits = model(torch.rand(3, channels, side, side))
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(("name", "kwargs", "channels", "side"), TINY_MODELS)
def test_every_activation_module_is_used_exactly_once(
    name: str, kwargs: dict, channels: int, side: int
) -> None:
    """MeanSparse goes in front of each activation module, so no module may serve two call sites."""
    model = create_model(name, in_channels=channels, activation="silu", **kwargs).eval()
    calls: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, ACTIVATION_TYPES):
            calls[module_name] = 0
            module.register_forward_hook(
                lambda m, i, o, key=module_name: calls.__setitem__(key, calls[key] + 1)
            )
    model(torch.rand(2, channels, side, side))
    assert calls, "no activation modules found"
    assert all(isinstance(m, nn.SiLU) for m in model.modules() if isinstance(m, ACTIVATION_TYPES))
    assert set(calls.values()) == {1}, calls


@pytest.mark.parametrize(
    ("name", "blocks_per_stage", "final_width"),
    [("wrn_28_10", 4, 64), ("wrn_34_10", 5, 64), ("wrn_70_16", 11, 64)],
)
def test_wide_resnet_default_depth(name: str, blocks_per_stage: int, final_width: int) -> None:
    """depth = 6n + 4 gives n blocks per stage; widen_factor=1 keeps it small while depth stays default."""
    model = create_model(name, widen_factor=1)
    assert len(model.block1.layer) == len(model.block2.layer) == len(model.block3.layer) == blocks_per_stage
    assert model.fc.in_features == final_width


def test_wrn_28_10_has_the_published_parameter_count() -> None:
    # Zagoruyko & Komodakis (2016), Table 3: WRN-28-10 has 36.5M parameters.
    model = create_model("wrn_28_10")
    assert model.fc.in_features == 640
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == 36.5


def test_resnet18_parameter_count_matches_cifar_resnet18() -> None:
    # The CIFAR ResNet-18 of the adversarial-training literature has 11,173,962 parameters for 10 classes.
    assert sum(p.numel() for p in create_model("resnet18").parameters()) == 11_173_962


def test_wide_resnet_state_dict_uses_the_trades_robustbench_names() -> None:
    keys = set(create_model("wrn_28_10", depth=10, widen_factor=2).state_dict())
    expected = {
        "conv1.weight",
        "block1.layer.0.bn1.running_mean",
        "block1.layer.0.conv1.weight",
        "block1.layer.0.convShortcut.weight",  # 16 -> 32 channels
        "block2.layer.0.conv2.weight",
        "block3.layer.0.convShortcut.weight",
        "bn1.weight",
        "fc.weight",
        "fc.bias",
    }
    assert expected <= keys
    assert sum(k.endswith("convShortcut.weight") for k in keys) == 3


def test_wide_resnet_rejects_bad_depth() -> None:
    with pytest.raises(ConfigurationError, match="6n \\+ 4"):
        create_model("wrn_28_10", depth=27, widen_factor=1)


def test_normalization_is_inside_the_model() -> None:
    torch.manual_seed(0)
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    model = create_model("resnet18", base_width=4, normalization=(mean, std)).eval()
    assert isinstance(model, NormalizedClassifier)
    assert isinstance(model[0], Normalize) and model[0] is model.normalize
    x = torch.rand(4, 3, 32, 32)
    manual = torch.empty_like(x)
    for c in range(3):
        manual[:, c] = (x[:, c] - mean[c]) / std[c]
    torch.testing.assert_close(model(x), model.backbone(manual))
    # The statistics travel with the checkpoint.
    state = model.state_dict()
    torch.testing.assert_close(state["normalize.mean"].flatten(), torch.tensor(mean))
    torch.testing.assert_close(state["normalize.std"].flatten(), torch.tensor(std))


def test_without_normalization_the_bare_backbone_is_returned() -> None:
    model = create_model("small_cnn", in_channels=1)
    assert not any(isinstance(m, Normalize) for m in model.modules())


def test_normalize_values_and_broadcast() -> None:
    layer = Normalize([0.5], [0.25], num_channels=3)
    x = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1)
    torch.testing.assert_close(layer(x).flatten(), torch.tensor([-2.0, 0.0, 2.0]))
    assert layer.mean.shape == layer.std.shape == (1, 3, 1, 1)


@pytest.mark.parametrize(
    "normalization",
    [
        ((0.5, 0.5), (0.2, 0.2)),
        ((0.5,), (0.0,)),
        ((0.5,), (-1.0,)),
        ((float("nan"),), (1.0,)),
        ((), ()),
        "bad",
    ],
)
def test_bad_normalization_is_rejected(normalization: object) -> None:
    with pytest.raises(ConfigurationError):
        create_model("small_cnn", in_channels=3, normalization=normalization)


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        create_model("resnet19")
    message = str(info.value)
    assert "\n" not in message
    assert "resnet19" in message
    for name in list_models():
        assert name in message


def test_misspelt_option_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="widen_factr"):
        create_model("wrn_28_10", widen_factr=2)


@pytest.mark.parametrize("bad", [{"num_classes": 0}, {"in_channels": 0}, {"activation": "relu6"}])
def test_bad_common_arguments(bad: dict) -> None:
    with pytest.raises(ConfigurationError):
        create_model("small_cnn", **bad)


def test_torchvision_model_by_name() -> None:
    torch.manual_seed(0)
    model = create_model("torchvision:resnet18", num_classes=7).eval()
    from torchvision.models import ResNet

    assert isinstance(model, ResNet)
    assert model.fc.out_features == 7
    assert model(torch.rand(2, 3, 64, 64)).shape == (2, 7)


def test_torchvision_model_with_normalization_and_other_activation() -> None:
    model = create_model(
        "torchvision:resnet18", num_classes=5, activation="gelu", normalization=((0.5,) * 3, (0.25,) * 3)
    )
    assert isinstance(model[0], Normalize)
    assert not any(isinstance(m, nn.ReLU) for m in model.modules())
    assert any(isinstance(m, nn.GELU) for m in model.modules())
    assert model.eval()(torch.rand(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("torchvision:resnet19", {}, "resnet50"),  # the message lists the valid names
        ("torchvision:resnet18", {"in_channels": 1}, "3 input channels"),
        ("torchvision:resnet18", {"weights": "DEFAULT"}, "weights=None"),
        ("torchvision:efficientnet_b0", {"activation": "gelu"}, "no nn.ReLU"),
    ],
)
def test_torchvision_errors(name: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        create_model(name, **kwargs)


def test_register_model_decorator() -> None:
    @register_model("tiny_linear_for_test")
    def tiny(*, num_classes: int, in_channels: int, activation: str, hidden: int = 3) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(in_channels * 4, hidden), get_activation(activation),
                             nn.Linear(hidden, num_classes))  # fmt: skip

    try:
        assert "tiny_linear_for_test" in list_models()
        model = create_model("tiny_linear_for_test", num_classes=2, in_channels=1, hidden=5)
        assert model(torch.rand(3, 1, 2, 2)).shape == (3, 2)
        assert model[2].__class__ is nn.ReLU
        with pytest.raises(ConfigurationError, match="already registered"):
            register_model("tiny_linear_for_test")(tiny)
    finally:
        _registry._MODELS.pop("tiny_linear_for_test", None)
    with pytest.raises(ConfigurationError, match="reserved"):
        register_model("torchvision:mine")


def test_small_cnn_learns() -> None:
    """Thirty full-batch steps on a fixed batch must drive the loss well down: the net is trainable."""
    torch.manual_seed(0)
    model = create_model("small_cnn", in_channels=1, normalization=((0.286,), (0.353,)))
    x, y = torch.rand(32, 1, 28, 28), torch.randint(0, 10, (32,))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    first = None
    for _ in range(30):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        first = loss.item() if first is None else first
    assert first > 2.0
    assert loss.item() < 0.5 * first


# ---- activations -------------------------------------------------------------------------------------


def test_activation_names_and_fresh_instances() -> None:
    expected = [
        "elu",
        "gelu",
        "hardswish",
        "leaky_relu",
        "mish",
        "psilu",
        "pssilu",
        "relu",
        "silu",
        "softplus",
    ]
    assert set(expected) <= set(list_activations())
    for name in expected:
        first, second = get_activation(name), get_activation(name)
        assert isinstance(first, nn.Module)
        assert first is not second


@pytest.mark.parametrize(
    ("name", "reference"),
    [
        ("relu", lambda v: max(v, 0.0)),
        ("elu", lambda v: v if v > 0 else math.exp(v) - 1),
        ("silu", lambda v: v / (1 + math.exp(-v))),
        ("softplus", lambda v: math.log1p(math.exp(v))),
        ("mish", lambda v: v * math.tanh(math.log1p(math.exp(v)))),
        ("hardswish", lambda v: v * min(max(v + 3, 0.0), 6.0) / 6),
        ("gelu", lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2)))),
    ],
)
def test_fixed_activations_match_their_formulas(name: str, reference) -> None:
    values = [-2.5, -0.7, 0.0, 0.3, 1.9]
    out = get_activation(name)(torch.tensor(values, dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([reference(v) for v in values], dtype=torch.float64))


def _sigmoid(v: float) -> float:
    return 1.0 / (1.0 + math.exp(-v))


def test_psilu_formula_and_gradient() -> None:
    layer = PSiLU().double()
    assert layer.beta.item() == 1.0
    with torch.no_grad():
        layer.beta.fill_(1.5)
    values = [-2.0, -0.5, 0.0, 0.8, 3.0]
    x = torch.tensor(values, dtype=torch.float64)
    out = layer(x)
    torch.testing.assert_close(
        out, torch.tensor([v * _sigmoid(1.5 * v) for v in values], dtype=torch.float64)
    )
    out.sum().backward()
    # d/dbeta x*s(beta x) = x^2 s(beta x) (1 - s(beta x))
    expected = sum(v * v * _sigmoid(1.5 * v) * (1 - _sigmoid(1.5 * v)) for v in values)
    assert layer.beta.grad is not None
    assert layer.beta.grad.item() == pytest.approx(expected, rel=1e-10)
    # Hand-computed value at beta = 1 (plain SiLU): 1 * sigmoid(1) = 0.7310585786.
    assert PSiLU()(torch.tensor([1.0])).item() == pytest.approx(0.7310585786, rel=1e-6)


def test_pssilu_formula_and_gradients() -> None:
    layer = PSSiLU().double()
    assert layer.beta.item() == 1.0
    assert layer.alpha.item() == pytest.approx(0.01)
    alpha, beta = 0.2, 2.0
    with torch.no_grad():
        layer.alpha.fill_(alpha)
        layer.beta.fill_(beta)
    values = [-2.0, -0.3, 0.0, 0.1, 1.7]
    x = torch.tensor(values, dtype=torch.float64)
    out = layer(x)
    expected = [v * (_sigmoid(beta * v) - alpha) / (1 - alpha) for v in values]
    torch.testing.assert_close(out, torch.tensor(expected, dtype=torch.float64))
    # Hand-computed: x = 0.1 gives 0.1 * (sigmoid(0.2) - 0.2) / 0.8 = 0.1 * (0.549834 - 0.2) / 0.8 = 0.0437293
    assert out[3].item() == pytest.approx(0.0437293, rel=1e-5)
    out.sum().backward()
    # d/dalpha = x (s - 1) / (1 - alpha)^2 ; d/dbeta = x^2 s (1 - s) / (1 - alpha)
    d_alpha = sum(v * (_sigmoid(beta * v) - 1) / (1 - alpha) ** 2 for v in values)
    d_beta = sum(v * v * _sigmoid(beta * v) * (1 - _sigmoid(beta * v)) / (1 - alpha) for v in values)
    assert layer.alpha.grad.item() == pytest.approx(d_alpha, rel=1e-10)
    assert layer.beta.grad.item() == pytest.approx(d_beta, rel=1e-10)


def test_pssilu_alpha_is_clamped_to_zero_one() -> None:
    x = torch.linspace(-3, 3, 13, dtype=torch.float64)
    layer = PSSiLU().double()
    with torch.no_grad():
        layer.alpha.fill_(-0.5)  # clamped to 0: exactly PSiLU with the same beta
    torch.testing.assert_close(layer(x), x * torch.sigmoid(x))
    with torch.no_grad():
        layer.alpha.fill_(3.0)  # clamped just below 1: still finite
    a = PSSiLU.ALPHA_MAX
    torch.testing.assert_close(layer(x), x * (torch.sigmoid(x) - a) / (1 - a))
    assert torch.isfinite(layer(x)).all()
    with pytest.raises(ConfigurationError):
        PSSiLU(alpha_init=1.0)


def test_parametric_activations_train_inside_a_model() -> None:
    torch.manual_seed(0)
    model = create_model("wrn_28_10", depth=10, widen_factor=1, activation="pssilu")
    F.cross_entropy(model(torch.rand(4, 3, 32, 32)), torch.tensor([0, 1, 2, 3])).backward()
    layers = [m for m in model.modules() if isinstance(m, PSSiLU)]
    assert len(layers) == 2 * 3 + 1  # two per block, one block per stage at depth 10, plus the final one
    assert all(m.alpha.grad is not None and m.alpha.grad.abs().item() > 0 for m in layers)
    assert all(m.beta.grad is not None and m.beta.grad.abs().item() > 0 for m in layers)


def test_unknown_activation_lists_valid_names() -> None:
    with pytest.raises(ConfigurationError) as info:
        get_activation("swish2")
    message = str(info.value)
    assert "\n" not in message and "swish2" in message
    for name in list_activations():
        assert name in message


def test_register_backbone_activation() -> None:
    try:
        register_backbone_activation("relu6_for_test", nn.ReLU6)
        assert isinstance(get_activation("relu6_for_test"), nn.ReLU6)
        model = create_model("small_cnn", in_channels=1, activation="relu6_for_test")
        assert sum(isinstance(m, nn.ReLU6) for m in model.modules()) == 3
        with pytest.raises(ConfigurationError, match="already registered"):
            register_backbone_activation("relu6_for_test", nn.ReLU6)
    finally:
        activations._ACTIVATIONS.pop("relu6_for_test", None)
