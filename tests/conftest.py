"""Shared small test models and fixtures for the operator / placement / statistics tests.

Every model is tiny (a few thousand parameters, inputs of at most 32x32) so the whole core suite stays fast
on two CPU cores. The models cover the call-site patterns placement must handle: activation modules,
functional ``F.relu``, ``torch.relu`` / ``Tensor.relu``, a reused activation module, SiLU WideResNet blocks,
``(N, L, C)`` transformer tokens, channels-last ConvNeXt MLPs, an ambiguous ``H == W == C`` layout, a
squeeze-and-excitation submodule and models torch.fx cannot trace.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.ops import MeanSparse, kernels, operators


# ------------------------------------------------------------------------------------------ CNN models
class FunctionalBlock(nn.Module):
    """ResNet basic block that only uses ``F.relu`` (two call sites, one after the residual sum)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + x)


class FunctionalResNet(nn.Module):
    """Stem + two functional blocks: 5 activation sites, all ``F.relu``, channels on dim 1."""

    def __init__(self, channels: int = 6, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.layer1 = FunctionalBlock(channels)
        self.layer2 = FunctionalBlock(channels)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.stem(x)))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


class MethodReluNet(nn.Module):
    """Activations through ``Tensor.relu()`` and ``torch.relu``: 2 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(5, 7, 3, padding=1)
        self.fc = nn.Linear(7, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x).relu()
        x = torch.relu(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


class ReusedActivationNet(nn.Module):
    """One ``nn.ReLU`` module called at three places (two conv features, one vector): 3 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1)
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 3)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.conv1(x))
        x = self.act(self.conv2(x))
        x = self.act(self.fc1(x.mean(dim=(2, 3))))
        return self.fc2(x)


class WideBlock(nn.Module):
    """Pre-activation WideResNet block with BatchNorm + SiLU (as in DMWideResNet): 2 sites."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.act1 = nn.SiLU()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.act2 = nn.SiLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.act1(self.bn1(x))
        shortcut = self.shortcut(out)
        out = self.conv2(self.act2(self.bn2(self.conv1(out))))
        return out + shortcut


class WideResNetTiny(nn.Module):
    """Stem, one wide block, final BN + SiLU: 3 SiLU sites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.block = WideBlock(4, 8)
        self.bn = nn.BatchNorm2d(8)
        self.act = nn.SiLU()
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.block(self.stem(x))))
        return self.fc(x.mean(dim=(2, 3)))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, hidden: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, hidden, 1)
        self.relu = nn.ReLU()
        self.expand = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.expand(self.relu(self.reduce(x.mean(dim=(2, 3), keepdim=True))))
        return x * torch.sigmoid(scale)


class SEBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()
        self.se = SqueezeExcite(channels, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.se(self.conv(x)) + x)


class SENet(nn.Module):
    """Stem ReLU, a block with a squeeze-and-excitation submodule (ReLU inside ``block.se``): 3 sites."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 6, 3, padding=1)
        self.relu = nn.ReLU()
        self.block = SEBlock(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(self.relu(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


# ---------------------------------------------------------------------------------- token / MLP models
class TransformerBlockNet(nn.Module):
    """Pre-norm transformer block on ``(N, L, C)`` tokens, GELU MLP of width ``hidden``: 1 site on dim -1."""

    def __init__(self, dim: int = 8, hidden: int = 12, num_classes: int = 3) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, num_classes)
        self.scale = dim**-0.5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        attention = torch.softmax(q @ k.transpose(-2, -1) * self.scale, dim=-1)
        x = x + self.proj(attention @ v)
        x = x + self.fc2(self.act(self.fc1(self.norm2(x))))
        return self.head(x.mean(dim=1))


class ConvNeXtBlockNet(nn.Module):
    """Conv stem (ReLU on ``(N, C, H, W)``) and a ConvNeXt block whose Linear -> GELU MLP runs on channels-last
    ``(N, H, W, C)`` after a permute, with ``H == W`` and ``C != W``: sites on dim 1 then dim -1."""

    def __init__(self, dim: int = 8, hidden: int = 16, num_classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dim, 2, stride=2)
        self.stem_act = nn.ReLU()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.norm = nn.LayerNorm(dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(hidden, dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem_act(self.stem(x))
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.pwconv2(self.act(self.pwconv1(self.norm(y))))
        x = x + y.permute(0, 3, 1, 2)
        return self.head(x.mean(dim=(2, 3)))


class AmbiguousLayoutNet(nn.Module):
    """Features with ``H == W == C == 4`` everywhere: only the producer tells the layout (Conv -> dim 1 for the
    ReLU, Linear -> dim -1 for the GELU on the channels-last branch)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.linear = nn.Linear(4, 4)
        self.gelu = nn.GELU()
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(x))
        y = self.gelu(self.linear(x.permute(0, 2, 3, 1))).permute(0, 3, 1, 2)
        return self.head((x + y).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------ special-case models
class NoActivationNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


class DataDependentNet(nn.Module):
    """Not traceable by torch.fx (``if x.sum() > 0``); activation modules only; ``self.act`` is called twice
    on features with very different statistics, so its two call sites must get different statistics."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(4, 3)
        self.out_act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:  # data-dependent control flow: fx raises a TraceError here
            x = x * 1.0
        x = self.act(x)
        x = self.act(3.0 * x + 2.0)
        return self.out_act(self.fc(x.mean(dim=(2, 3))))


class DataDependentFunctionalInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 1.0
        return F.relu(x)


class DataDependentFunctionalNet(nn.Module):
    """Untraceable, and ``body`` calls ``F.relu``: hook placement cannot reach it."""

    def __init__(self) -> None:
        super().__init__()
        self.body = DataDependentFunctionalInner()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean(dim=(2, 3)))


class Squareplus(nn.Module):
    """A custom activation module, found only after ``register_activation(Squareplus)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x + torch.sqrt(x * x + 4.0))


class SquareplusNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.act = Squareplus()
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.act(self.conv(x)).mean(dim=(2, 3)))


# ------------------------------------------------------------------------------------------- helpers
def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters (so eval mode is not an
    identity and a changed buffer would show)."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.num_features, generator=g))
                m.bias.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.num_batches_tracked.fill_(5)
    return model


def make_batches(shape: tuple[int, ...], n: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
    """``n`` deterministic random inputs of ``shape`` (no batch dim) split into batches."""
    g = torch.Generator().manual_seed(seed)
    data = torch.rand(n, *shape, generator=g)  # pixels in [0, 1], as every image path requires
    return list(data.split(batch_size))


def capture_operator_inputs(model: nn.Module, batches) -> dict[MeanSparse, torch.Tensor]:
    """Every operator's exact input over ``batches`` (forward pre-hooks, no_grad), concatenated on N; a copy, so an
    in-place activation after the operator cannot change it."""
    seen: dict[MeanSparse, list[torch.Tensor]] = {op: [] for op in operators(model)}
    handles = [
        op.register_forward_pre_hook(lambda m, args: seen[m].append(args[0].detach().clone()))
        for op in operators(model)
    ]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for h in handles:
            h.remove()
    return {op: torch.cat(values) for op, values in seen.items()}


@pytest.fixture
def in_tmp_path(tmp_path, monkeypatch):
    """Run the test in its own tmp_path: LightningCLI saves each run's config.yaml (and runs/ folders) in the
    working directory, which must stay out of the repository."""
    monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="module")
def single_thread():
    """One intra-op thread: the test models are tiny, and on a shared 2-core machine OpenMP barriers of two
    threads make each small op up to 100x slower than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(autouse=True)
def _deterministic_seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def image_batches() -> list[torch.Tensor]:
    """Six batches of 8 random 3x8x8 images (48 images)."""
    return make_batches((3, 8, 8), 48, 8, seed=1)


@pytest.fixture
def fused_everywhere(monkeypatch):
    """Fused kernels for every input size (the default threshold skips the tiny test tensors), and a record
    of which fused kernels actually ran."""
    monkeypatch.setattr(kernels, "FUSED_MIN_NUMEL", 0)
    calls: list[str] = []
    original = kernels.run_compiled

    def recording(fn, *args):
        calls.append(fn.__name__)
        return original(fn, *args)

    monkeypatch.setattr(kernels, "run_compiled", recording)
    previous = kernels.set_fused_kernels(True)
    yield calls
    kernels.set_fused_kernels(previous)
