"""Placement fuses an operator with the piecewise-linear activation after it; nothing observable changes.

The reference for every check is the same placement with ``fuse_activations=False`` (operator, then the
model's own activation call) and, independently, a float64 brute force of ``act(where(|x - mu| < a*s, mu, x))``
on the operator's captured input. Outputs, input gradients in both backward modes, calibration statistics and
state dicts must be identical; hooks on activation modules and non-fusable activations keep their calls.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.ops import backward_mode, fused_kernels, operators
from meansparse_pl.placement import Placement, describe, placement_of, sparsify_like


class ConvAct(nn.Module):
    """conv -> bn -> activation -> conv -> bn -> (input of the activation reused) -> activation -> head."""

    def __init__(self, activation: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.kind = activation
        modules = {
            "nn.ReLU": nn.ReLU(),
            "nn.ReLU(inplace)": nn.ReLU(inplace=True),
            "nn.ReLU6": nn.ReLU6(),
            "nn.LeakyReLU": nn.LeakyReLU(0.2),
        }
        if activation in modules:
            self.act = modules[activation]
        self.head = nn.Linear(16, 5)
        for bn in (self.bn1, self.bn2):  # eval-mode BatchNorm with non-trivial statistics
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)

    def activate(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "F.relu":
            return F.relu(x)
        if self.kind == "torch.relu_":
            return torch.relu_(x)
        if self.kind == "Tensor.relu":
            return x.relu()
        return self.act(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.bn1(self.conv1(x))
        out = self.activate(features)
        # `features` is read again: after an in-place activation it holds the activated values
        out = self.activate(self.bn2(self.conv2(out)) + features)
        return self.head(out.mean(dim=(2, 3)))


KINDS = ["nn.ReLU", "nn.ReLU(inplace)", "nn.ReLU6", "nn.LeakyReLU", "F.relu", "torch.relu_"]
KINDS += ["Tensor.relu"]
BRUTE_FORCE = {
    "nn.ReLU6": lambda t: t.clamp(0.0, 6.0),
    "nn.LeakyReLU": lambda t: torch.where(t > 0, t, 0.2 * t),
}


def _pair(kind: str, alpha: float = 0.3) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    base = ConvAct(kind).eval()
    example = torch.rand(2, 3, 32, 32)
    fused = sparsify(copy.deepcopy(base), example)
    separate = sparsify(copy.deepcopy(base), example, fuse_activations=False)
    calibrate(fused, [torch.rand(16, 3, 32, 32) for _ in range(2)], progress=False)
    separate.load_state_dict(fused.state_dict())
    for model in (fused, separate):
        set_alpha(model, alpha)
    return fused, separate


def _activation_calls(model: nn.Module) -> int:
    """Activation calls left in the fx graph (module, function and method calls)."""
    count = 0
    for node in model.graph.nodes:
        if node.op == "call_module" and not node.target.startswith("meansparse"):
            count += isinstance(
                model.get_submodule(node.target), (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.LeakyReLU)
            )
        count += node.op == "call_function" and node.target in (F.relu, torch.relu_)
        count += node.op == "call_method" and node.target == "relu"
    return count


@pytest.mark.parametrize("kind", KINDS)
def test_fused_activation_gives_the_separate_calls_values_and_gradients(kind, fused_everywhere):
    fused, separate = _pair(kind)
    assert _activation_calls(fused) == 0 and _activation_calls(separate) == 2
    assert all(site.fused_activation for site in placement_of(fused).sites)
    assert not any(site.fused_activation for site in placement_of(separate).sites)
    assert "(fused)" in describe(fused)
    x = torch.rand(8, 3, 32, 32)
    with torch.no_grad():
        reference = separate(x)
        fused_everywhere.clear()
        assert torch.equal(fused(x), reference)
        assert fused_everywhere == ["sparsify_then_activate"] * 2  # one pass per site did both
        with fused_kernels(False):
            assert torch.equal(fused(x), reference)
    for mode in ("exact", "straight_through"):
        grads = []
        for model in (fused, separate):
            xi = x.clone().requires_grad_()
            with backward_mode(model, mode):
                model(xi).square().sum().backward()
            grads.append(xi.grad)
        assert torch.equal(grads[0], grads[1]), mode


@pytest.mark.parametrize("kind", ["nn.ReLU", "nn.ReLU6", "nn.LeakyReLU"])
def test_fused_operator_matches_a_float64_brute_force(kind, fused_everywhere):
    fused, _ = _pair(kind)
    op = operators(fused)[0]
    captured = {}
    op.register_forward_pre_hook(lambda module, args: captured.setdefault("x", args[0].clone()))
    outputs = {}
    op.register_forward_hook(lambda module, args, out: outputs.setdefault("y", out.clone()))
    with torch.no_grad():
        fused(torch.rand(8, 3, 32, 32))
    x = captured["x"].double()
    mean, std = op.mean.double().view(1, -1, 1, 1), op.var.double().sqrt().view(1, -1, 1, 1)
    sparsified = torch.where((x - mean).abs() < 0.3 * std, mean, x)
    expected = BRUTE_FORCE.get(kind, lambda t: t.clamp_min(0.0))(sparsified)
    assert op.activation is not None
    assert (sparsified != x).float().mean() > 0.05  # the band is not empty: the check means something
    torch.testing.assert_close(outputs["y"].double(), expected, rtol=1e-6, atol=1e-6)


def test_activation_names_carry_their_constants():
    fused, _ = _pair("nn.LeakyReLU")
    assert operators(fused)[0].activation.name == "leaky_relu(negative_slope=0.2)"
    assert "then leaky_relu(negative_slope=0.2)" in repr(operators(fused)[0])
    fused, _ = _pair("nn.ReLU6")
    assert operators(fused)[0].activation.name == "relu6"


def test_alpha_zero_and_calibration_are_unchanged_by_fusion():
    torch.manual_seed(0)
    base = ConvAct("nn.ReLU(inplace)").eval()
    example = torch.rand(2, 3, 32, 32)
    fused = sparsify(copy.deepcopy(base), example)
    separate = sparsify(copy.deepcopy(base), example, fuse_activations=False)
    batches = [torch.rand(16, 3, 32, 32) for _ in range(2)]
    calibrate(fused, batches, progress=False)
    calibrate(separate, batches, progress=False)
    for a, b in zip(operators(fused), operators(separate), strict=True):
        assert torch.equal(a.mean, b.mean) and torch.equal(
            a.var, b.var
        )  # the second site sees activated values
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(fused(x), base(x.clone()))  # alpha 0: the trained network, bit for bit


def test_hooked_subclassed_and_smooth_activations_keep_their_calls():
    torch.manual_seed(0)
    hooked = ConvAct("nn.ReLU").eval()
    fired = []
    hooked.act.register_forward_hook(lambda module, args, out: fired.append(1))
    model = sparsify(hooked, torch.rand(2, 3, 32, 32))
    assert _activation_calls(model) == 2 and not any(s.fused_activation for s in placement_of(model).sites)
    calibrate(model, [torch.rand(8, 3, 32, 32)], progress=False)
    fired.clear()
    model(torch.rand(2, 3, 32, 32))
    assert len(fired) == 2

    class MyReLU(nn.ReLU):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * 2

    for activation in (MyReLU(), nn.GELU(), nn.SiLU()):
        base = ConvAct("nn.ReLU").eval()
        base.act = activation
        model = sparsify(base, torch.rand(2, 3, 32, 32))
        assert not any(s.fused_activation for s in placement_of(model).sites), type(activation)
        assert all(op.activation is None for op in operators(model))


def test_rebuilt_and_old_placement_records_agree_with_the_fused_model(fused_everywhere):
    fused, _ = _pair("nn.ReLU")
    record = placement_of(fused).to_dict()
    assert record["fuse_activations"] is True
    rebuilt = sparsify_like(ConvAct("nn.ReLU").eval(), Placement.from_dict(record))
    rebuilt.load_state_dict(fused.state_dict())
    old_record = {k: v for k, v in record.items() if k != "fuse_activations"}
    old_record["sites"] = [{k: v for k, v in s.items() if k != "fused_activation"} for s in record["sites"]]
    from_old = sparsify_like(ConvAct("nn.ReLU").eval(), Placement.from_dict(old_record))
    from_old.load_state_dict(fused.state_dict())
    unfused_record = Placement.from_dict({**record, "fuse_activations": False})
    unfused = sparsify_like(ConvAct("nn.ReLU").eval(), unfused_record)
    unfused.load_state_dict(fused.state_dict())
    assert _activation_calls(unfused) == 2 and _activation_calls(rebuilt) == 0
    x = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        reference = fused(x)
        for model in (rebuilt, from_old, unfused):
            assert torch.equal(model(x), reference)


def test_without_activation_gives_the_operator_output_alone(fused_everywhere):
    fused, separate = _pair("nn.LeakyReLU")
    x = torch.randn(8, 16, 32, 32)
    for op_fused, op_separate in zip(operators(fused), operators(separate), strict=True):
        assert op_separate.activation is None
        with torch.no_grad():
            alone = op_fused.without_activation(x)
            assert torch.equal(alone, op_separate(x))
            assert torch.equal(op_fused(x), F.leaky_relu(alone, 0.2))
        assert (alone < 0).any()  # the activation really was left out
