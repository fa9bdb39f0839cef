"""Placement presets: the published sites, their counts, and bit-exact agreement with the released code.

Counts are derived by hand from the architectures (full depth, tiny widths: the depth decides the count):

* DeepMind WideResNet-d-16 (S-WRN): (d - 4) / 6 blocks per stage, 3 stages, 3 operators per block (2 before
  activations, 1 after the residual sum) + 1 before the final activation: d = 70 -> 3 * 33 + 1 = 100,
  d = 94 -> 3 * 45 + 1 = 136.
* RaWideResNet-70-16: stage depths (30, 31, 10) = 71 blocks, same 3 per block, none inside the
  squeeze-and-excitation module, + 1: 3 * 71 + 1 = 214.
* ConvNeXt-L: depths (3, 3, 27, 3) = 36 blocks x 2 (MLP activation, after drop_path) = 72.
* Swin-L: depths (2, 2, 18, 2) = 24 blocks x 4 (2 residual sums, MLP activation, after fc2) = 96.

The released architectures (robustbench 1.1.1's ``Meansparse_*`` files and ``add_custom_layer_imagenet``)
are then loaded with random buffers and compared with our preset placement on the base architecture:
outputs must be ``torch.equal``.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import importlib.util

import pytest
import torch
from test_published import DMWideResNet, images, randomize
from torch import nn

from meansparse_pl import calibrate, operators, sparsify
from meansparse_pl.checkpoint import save_checkpoint
from meansparse_pl.errors import ConfigurationError, PlacementError
from meansparse_pl.io import safe_load
from meansparse_pl.placement import (
    PRESETS,
    Placement,
    PlacementPreset,
    Site,
    find_sites,
    placement_of,
    register_preset,
    sparsify_like,
)
from meansparse_pl.published import load_published_state_dict, published_state_dict


@pytest.fixture(scope="module")
def timm_models():
    """timm's ConvNeXt and SwinTransformer classes (the architectures of the released ImageNet models)."""
    if importlib.util.find_spec("timm") is None:
        pytest.fail("timm is not installed: run scripts/setup.sh (the robustbench extra)")
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    return ConvNeXt, SwinTransformer


IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Small models on a shared 2-core machine: one thread is faster and deterministic."""


@pytest.fixture(scope="module")
def rb():
    """robustbench's model zoo, imported through the adapter's contained environment."""
    if importlib.util.find_spec("robustbench") is None:  # not importorskip: a plain import needs the shims
        pytest.fail(
            "robustbench is not installed: run scripts/setup.sh (pip install robustbench==1.1.1 --no-deps)"
        )
    from meansparse_pl import robustbench

    robustbench.import_model_zoo()
    return robustbench


def kinds(sites: list[Site]) -> collections.Counter:
    return collections.Counter(s.kind for s in sites)


def tiny_swin(swin_class: type, **overrides) -> nn.Module:
    """Swin-L's depths with an 8-wide embedding: 32x32 input, 4x4 patches, 2x2 windows."""
    kwargs = dict(
        img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(2, 2, 18, 2), num_heads=(1, 1, 1, 1)
    )
    return swin_class(**{**kwargs, **overrides}, num_classes=10).eval()


def normalize_model(model: nn.Module) -> nn.Module:
    """RobustBench's ImageNet wrapper ``Sequential(normalize=ImageNormalizer, model=...)``."""
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model as wrap

    return wrap(model, IMAGENET_MEAN, IMAGENET_STD).eval()


# ------------------------------------------------------------------------------------------- counts
@pytest.mark.parametrize(("depth", "blocks"), [(70, 33), (94, 45)])
def test_swrn_counts(depth, blocks):
    sites = find_sites(DMWideResNet(depth=depth, width=1).eval(), (3, 32, 32), preset="published_wrn")
    assert len(sites) == {70: 100, 94: 136}[depth] == 3 * blocks + 1
    assert kinds(sites) == {"activation": 2 * blocks + 1, "residual_add": blocks}
    assert {s.channel_dim for s in sites} == {1}
    # the paper's rule alone misses the residual sums
    assert len(find_sites(DMWideResNet(depth=depth, width=1).eval(), (3, 32, 32))) == 2 * blocks + 1


def test_ra_wrn_70_16_count_leaves_squeeze_excitation_out(rb):
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import NormalizedWideResNet

    model = NormalizedWideResNet(
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        stem_width=4,
        depth=[30, 31, 10],  # the real Ra-WRN-70-16 depths
        stage_width=[8, 16, 32],
        groups=[1, 1, 1],
        activation_fn=nn.SiLU,
        se_ratio=0.25,
        se_activation=nn.ReLU,
        se_order=2,
        num_classes=10,
    )
    model = rb.make_traceable(model).eval()
    sites = find_sites(model, (3, 32, 32), preset="published_wrn")
    assert len(sites) == 214 == 3 * 71 + 1
    assert kinds(sites) == {"activation": 143, "residual_add": 71}
    assert not any(".se." in s.module_path for s in sites)
    # "before every activation" also counts 214 here, but 71 of them are the SE module's ReLUs
    plain = find_sites(model, (3, 32, 32))
    assert len(plain) == 214 and sum(".se." in s.module_path for s in plain) == 71


@pytest.mark.parametrize("drop_path_rate", [0.0, 0.1])
def test_convnext_l_count(timm_models, drop_path_rate):
    """With drop_path_rate > 0 timm's DropPath (traced through by default) is still one site: preset
    after_modules are traced as leaves."""
    convnext, _ = timm_models
    model = convnext(depths=(3, 3, 27, 3), dims=(8, 8, 8, 8), num_classes=10, drop_path_rate=drop_path_rate)
    sites = find_sites(model.eval(), (3, 32, 32), preset="published_convnext")
    assert len(sites) == 72
    assert collections.Counter((s.kind, s.channel_dim) for s in sites) == {
        ("activation", -1): 36,  # (N, H, W, 4C) MLP features
        ("after_module", 1): 36,  # (N, C, H, W) residual branch
    }
    assert all(s.module_path.endswith((".mlp.act", ".drop_path")) for s in sites)


def test_swin_l_count(timm_models):
    sites = find_sites(tiny_swin(timm_models[1]), (3, 32, 32), preset="published_swin")
    assert len(sites) == 96
    assert kinds(sites) == {"residual_add": 48, "activation": 24, "after_module": 24}
    assert {s.channel_dim for s in sites} == {-1}
    # per block, in forward order: first sum, MLP activation, fc2, second sum
    first_block = [(s.kind, s.module_path) for s in sites[:4]]
    assert first_block == [
        ("residual_add", "layers.0.blocks.0"),
        ("activation", "layers.0.blocks.0.mlp.act"),
        ("after_module", "layers.0.blocks.0.mlp.fc2"),
        ("residual_add", "layers.0.blocks.0"),
    ]


# ------------------------------------------------------------------------ bit-exact vs released code
def _assert_published_equal(published: nn.Module, base: nn.Module, preset: str, x: torch.Tensor) -> nn.Module:
    """Preset placement on ``base`` + the published state dict == the released model, bit for bit; and the
    export gives the published state dict back."""
    sparse = sparsify(base.eval(), x, preset=preset)
    assert len(operators(sparse)) == sum(k.endswith(".threshold") for k in published.state_dict())
    load_published_state_dict(sparse, published.state_dict())
    with torch.no_grad():
        expected = published(x)
        assert torch.equal(sparse(x), expected)
    exported, original = published_state_dict(sparse), published.state_dict()
    assert set(exported) == set(original)
    assert all(torch.equal(exported[k], v) for k, v in original.items() if not k.endswith("batch_num"))
    return sparse


def test_published_swrn_sites_match_released_code(rb):
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet as Base
    from robustbench.model_zoo.architectures.Meansparse_wrn_94_16 import MeanSparse_DMWideResNet

    torch.manual_seed(0)
    published = randomize(MeanSparse_DMWideResNet(depth=16, width=1, activation_fn=nn.SiLU), alpha=0.5)
    _assert_published_equal(
        published, Base(depth=16, width=1, activation_fn=nn.SiLU), "published_wrn", images()
    )


def test_published_ra_wrn_sites_match_released_code(rb):
    from robustbench.model_zoo.architectures.Meansparse_ra_wrn_70_16 import NormalizedWideResNet as Published
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import NormalizedWideResNet as Base

    kwargs = dict(
        mean=(0.49, 0.48, 0.45),
        std=(0.25, 0.24, 0.26),
        stem_width=4,
        depth=[2, 2, 2],
        stage_width=[8, 16, 32],
        groups=[1, 1, 1],
        activation_fn=nn.SiLU,
        se_ratio=0.25,
        se_activation=nn.ReLU,
        se_order=2,
    )
    torch.manual_seed(0)
    published = randomize(Published(**kwargs), alpha=0.5)
    _assert_published_equal(published, rb.make_traceable(Base(**kwargs)), "published_wrn", images())


def test_published_convnext_sites_match_released_code(rb, timm_models):
    """robustbench's ``add_custom_layer_imagenet`` hard-codes ConvNeXt-L's widths, so the real widths with one
    block per stage; a single 32x32 image keeps it fast."""
    from robustbench.model_zoo.architectures.sparsified_model import (
        MeanSparse_imagenet,
        add_custom_layer_imagenet,
    )

    def convnext() -> nn.Module:
        return normalize_model(
            timm_models[0](depths=(1, 1, 1, 1), dims=(192, 384, 768, 1536), num_classes=10)
        )

    torch.manual_seed(0)
    published = convnext()
    add_custom_layer_imagenet(published, MeanSparse_imagenet)
    randomize(published, alpha=0.5)
    torch.manual_seed(1)
    _assert_published_equal(published, convnext(), "published_convnext", images(1))


def test_published_swin_sites_match_released_code(rb, timm_models):
    from robustbench.model_zoo.architectures.Meansparse_swin_L import (
        swin_large_patch4_window7_224_with_MeanSparse,
    )

    tiny = dict(img_size=32, window_size=2, embed_dim=8, num_heads=(1, 1, 1, 1))
    torch.manual_seed(0)
    published = randomize(
        swin_large_patch4_window7_224_with_MeanSparse(pretrained=False, num_classes=10, **tiny), alpha=0.5
    )
    torch.manual_seed(1)
    _assert_published_equal(published, normalize_model(tiny_swin(timm_models[1])), "published_swin", images())


# -------------------------------------------------------------------------------- residual-sum rule
class SumsNet(nn.Module):
    """Four additions, two of them residual sums (x + f(x), and an in-place ``+=``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos_embed = nn.Parameter(torch.randn(1, 6, 8))
        self.bias = nn.Parameter(torch.randn(8))
        self.fc1 = nn.Linear(8, 8)
        self.fc2 = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.pos_embed  # a parameter: not a residual sum
        x = x + self.fc1(x)  # residual
        y = self.fc2(x)
        y = y + self.bias  # a broadcast bias: not a residual sum
        y += x  # residual (in place)
        scores = (y @ y.transpose(1, 2)) + torch.ones(6, 6)  # a constant: not a residual sum
        return scores.mean(-1)


def test_only_input_dependent_same_shape_sums_are_residual():
    preset = PlacementPreset("sums", "residual sums only", activations=False, residual_adds=True)
    register_preset(preset)
    try:
        sites = find_sites(SumsNet(), (6, 8), preset="sums")
        # fx records ``y += x`` on a proxy as operator.add (Proxy has no __iadd__)
        assert [(s.call, s.module_path) for s in sites] == [("residual operator.add", "")] * 2
        model = SumsNet()
        x = torch.randn(3, 6, 8)
        sparse = sparsify(model, x, preset="sums")
        calibrate(sparse, [x], progress=False)
        # alpha 0: the operators see the sums and change nothing
        with torch.no_grad():
            assert torch.equal(sparse(x), model(x))
        first = operators(sparse)[0]
        with torch.no_grad():
            expected = (x + model.pos_embed + model.fc1(x + model.pos_embed)).mean(dim=(0, 1))
        assert torch.allclose(first.mean, expected, atol=1e-6)
    finally:
        PRESETS.pop("sums")


# ----------------------------------------------------------------------------- records and rebuilding
def test_preset_is_recorded_and_rebuilds_the_same_sites(tmp_path):
    x = images()
    sparse = sparsify(DMWideResNet(depth=10, width=1).eval(), x, preset="published_wrn")
    calibrate(sparse, [x], progress=False)
    for op in operators(sparse):
        op.set_alpha(0.7)
    placement = placement_of(sparse)
    assert placement.config.preset == "published_wrn"
    path = save_checkpoint(sparse, tmp_path / "wrn.pt")
    record = Placement.from_dict(safe_load(path)["meansparse"]["placement"])
    assert record == placement
    rebuilt = sparsify_like(DMWideResNet(depth=10, width=1).eval(), record)
    rebuilt.load_state_dict(safe_load(path)["state_dict"])
    with torch.no_grad():
        assert torch.equal(rebuilt(x), sparse(x))
    clone = copy.deepcopy(sparse)
    assert placement_of(clone) == placement


class TensorAttributeNet(nn.Module):
    """A plain tensor attribute (not a buffer), as RobustArch's WideResNet keeps its mean / std."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.tensor([2.0, 3.0, 4.0]).view(3, 1, 1)
        self.conv = nn.Conv2d(3, 4, 3)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x * self.scale))


def test_tensors_fx_turns_into_buffers_are_recorded_and_survive_deepcopy():
    model = TensorAttributeNet()
    sparse = sparsify(model, (3, 6, 6))
    assert "scale" not in model.state_dict() and "scale" in sparse.state_dict()
    assert sparse.meansparse_fx_constants == ("scale",)
    assert copy.deepcopy(sparse).meansparse_fx_constants == ("scale",)


def test_records_without_preset_or_site_kind_still_load():
    old = {
        "strategy": "fx",
        "input_shape": [3, 8, 8],
        "include": None,
        "exclude": None,
        "site_indices": None,
        "channel_dims": None,
        "leaf_modules": None,
        "centre": "channel_mean",
        "sites": [
            {
                "index": 0,
                "module_path": "relu",
                "call": "nn.ReLU",
                "input_shape": [1, 4, 8, 8],
                "channel_dim": 1,
                "num_channels": 4,
                "operator_name": "meansparse_0",
            }
        ],
    }
    placement = Placement.from_dict(old)
    assert placement.config.preset == "activations" and placement.sites[0].kind == "activation"
    rebuilt = sparsify_like(ConvReLU(), placement)
    # the old record predates activation fusion: the rebuilt sites say which ReLU the operator took over
    assert [s.fused_activation for s in placement_of(rebuilt).sites] == ["relu"]
    assert [
        dataclasses.replace(s, fused_activation="") for s in placement_of(rebuilt).sites
    ] == placement.sites


class ConvReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.conv(x))


def test_preset_errors():
    model = DMWideResNet(depth=10, width=1).eval()
    with pytest.raises(ConfigurationError, match="unknown placement preset"):
        sparsify(model, (3, 32, 32), preset="published_vit")
    with pytest.raises(PlacementError, match="only the fx strategy"):
        sparsify(model, (3, 32, 32), preset="published_wrn", strategy="hooks")
    with pytest.raises(ConfigurationError, match="selects no site kind"):
        register_preset(PlacementPreset("nothing", "no kinds", activations=False))
