"""The offline RobustBench adapter: contained import, RobustBench's file layout and state-dict conventions,
safe loading, and the import script.

Real RobustBench architectures are built with tiny widths (the model-zoo entry's factory is swapped for the
same class with small arguments), written as local RobustBench checkpoints, loaded back offline, sparsified
and calibrated. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from test_published import images, randomize
from torch import nn

from meansparse_pl import calibrate, operators, sparsify
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.errors import CheckpointError, ConfigurationError, DataNotFoundError
from meansparse_pl.models import create_model
from meansparse_pl.models import robustbench_zoo as architectures
from meansparse_pl.placement import placement_of
from meansparse_pl.published import convert_published

if importlib.util.find_spec("robustbench") is None or importlib.util.find_spec("timm") is None:
    pytest.fail(
        "robustbench / timm not installed: run scripts/setup.sh (it installs the robustbench extra)",
        pytrace=False,
    )

# meansparse_pl.robustbench, imported by the `zoo` fixture rather than at collection: importing it registers the
# architecture name "robustbench", which must not leak into other modules' registry listings collected earlier
rb: Any = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _one_thread(single_thread):
    """Small models on a shared 2-core machine: one thread is faster and deterministic."""


@pytest.fixture(scope="module")
def zoo():
    global rb
    rb = importlib.import_module("meansparse_pl.robustbench")
    return rb.import_model_zoo()


def tiny(monkeypatch, name: str, dataset: str, threat_model: str, factory) -> None:
    """Swap the zoo entry's architecture for the same class at tiny width (the test's only deviation)."""
    monkeypatch.setitem(rb.model_entry(name, dataset, threat_model), "model", factory)


def tiny_dm_wrn(published: bool = False) -> nn.Module:
    from robustbench.model_zoo.architectures.dm_wide_resnet import DMWideResNet
    from robustbench.model_zoo.architectures.Meansparse_wrn_94_16 import MeanSparse_DMWideResNet

    cls = MeanSparse_DMWideResNet if published else DMWideResNet
    return cls(num_classes=10, depth=10, width=1, activation_fn=nn.SiLU)


def tiny_ra_wrn() -> nn.Module:
    from robustbench.model_zoo.architectures.robustarch_wide_resnet import NormalizedWideResNet

    return NormalizedWideResNet(
        (0.49, 0.48, 0.45),
        (0.25, 0.24, 0.26),
        stem_width=4,
        depth=[1, 1, 1],
        stage_width=[8, 16, 32],
        groups=[1, 1, 1],
        activation_fn=nn.SiLU,
        se_ratio=0.25,
        se_activation=nn.ReLU,
        se_order=2,
        num_classes=10,
    )


def tiny_imagenet(kind: str) -> nn.Module:
    from robustbench.model_zoo.architectures.utils_architectures import normalize_model
    from timm.models.convnext import ConvNeXt
    from timm.models.swin_transformer import SwinTransformer

    if kind == "convnext":
        model = ConvNeXt(depths=(1, 1, 2, 1), dims=(8, 8, 8, 8), num_classes=1000)
    else:
        model = SwinTransformer(
            img_size=32, patch_size=4, window_size=2, embed_dim=8, depths=(1, 1, 2, 1), num_heads=(1, 1, 1, 1)
        )
    return normalize_model(model, IMAGENET_MEAN, IMAGENET_STD)


def write(model_dir: Path, name: str, dataset: str, threat_model: str, payload) -> Path:
    path = rb.checkpoint_path(model_dir, name, dataset, threat_model)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(payload, path)
    return path


def batches(n: int = 3, size: int = 32):
    return [torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(i)) for i in range(n)]


# ---------------------------------------------------------------------------------- contained import
def test_import_environment_is_contained_and_restored(zoo):
    missing_autoattack = not architectures.importable("autoattack")
    with architectures.import_environment() as added:
        if missing_autoattack:
            import autoattack
            import pyautoattack
            from autoattack.state import EvaluationState

            assert autoattack.AutoAttack is pyautoattack.AutoAttack
            assert EvaluationState.__module__ == "pyautoattack.state"
        if "pkg_resources" in added:
            import pkg_resources

            path = Path(pkg_resources.resource_filename("robustbench.loaders", "helper_files/x.json"))
            assert path == Path(importlib.util.find_spec("robustbench").origin).parent / "helper_files/x.json"
        for name in set(added) & set(architectures.OPTIONAL_MODULES):
            placeholder = importlib.import_module(name)
            with pytest.raises(ImportError, match="not installed"):
                placeholder.anything()
    assert not set(added) & set(sys.modules)
    if missing_autoattack:
        assert "autoattack" in added and importlib.util.find_spec("autoattack") is None


def test_import_environment_is_restored_after_an_error(zoo):
    with pytest.raises(RuntimeError), architectures.import_environment() as added:
        raise RuntimeError("import failed")
    assert not set(added) & set(sys.modules)


def test_an_older_model_zoo_under_the_release_name_is_refused(zoo, monkeypatch):
    """torchattacks 3.5.1's wheel bundles an old robustbench copy; installed after robustbench it silently
    replaces the 1.1.1 model zoo (the CI failure this guards against). The adapter names the fix."""
    enums = sys.modules["robustbench.model_zoo.enums"]
    cifar10_linf = zoo.model_dicts[enums.BenchmarkDataset("cifar10")][enums.ThreatModel("Linf")]
    monkeypatch.delitem(cifar10_linf, "Amini2024MeanSparse_S-WRN-94-16")
    with pytest.raises(ConfigurationError, match="older copy.*--force-reinstall 'robustbench==1.1.1'"):
        rb.model_entry("Wang2023Better_WRN-70-16")


def test_model_zoo_import_leaves_no_shims_behind(zoo):
    import pyautoattack

    assert sys.modules["robustbench.eval"].AutoAttack is pyautoattack.AutoAttack
    for name in ("autoattack", "pkg_resources", *architectures.OPTIONAL_MODULES):
        module = sys.modules.get(name)
        assert module is None or not isinstance(module, architectures.PlaceholderModule), name
    enums = sys.modules["robustbench.model_zoo.enums"]
    cifar10_linf = zoo.model_dicts[enums.BenchmarkDataset("cifar10")][enums.ThreatModel("Linf")]
    assert "Amini2024MeanSparse_S-WRN-94-16" in cifar10_linf


# ---------------------------------------------------------------------------------------- errors
def test_missing_checkpoint_says_where_it_must_be(zoo, tmp_path):
    with pytest.raises(DataNotFoundError) as info:
        rb.load_model("Bartoldson2024Adversarial_WRN-94-16", tmp_path, "cifar10", "Linf")
    message = str(info.value)
    assert str(tmp_path / "cifar10" / "Linf" / "Bartoldson2024Adversarial_WRN-94-16.pt") in message
    assert "never downloads" in message and "Google Drive id" in message


def test_unknown_names(zoo):
    with pytest.raises(ConfigurationError, match="did you mean Peng2023Robust"):
        rb.model_entry("Peng2023Robst", "cifar10", "Linf")
    with pytest.raises(ConfigurationError, match="unknown RobustBench dataset"):
        rb.checkpoint_path("m", "x", "mnist", "Linf")
    with pytest.raises(ConfigurationError, match="threat model"):
        rb.checkpoint_path("m", "x", "cifar10", "L1")


def test_pickled_model_file_is_refused(zoo, monkeypatch, tmp_path):
    name = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, name, "cifar10", "Linf", tiny_dm_wrn)
    write(tmp_path, name, "cifar10", "Linf", tiny_dm_wrn())  # a whole pickled module, not a state dict
    with pytest.raises(CheckpointError, match="arbitrary Python objects"):
        rb.load_model(name, tmp_path, "cifar10", "Linf")


def test_weights_of_another_architecture_are_refused(zoo, monkeypatch, tmp_path):
    name = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, name, "cifar10", "Linf", tiny_dm_wrn)
    other = tiny_ra_wrn().state_dict()
    write(tmp_path, name, "cifar10", "Linf", other)
    with pytest.raises(CheckpointError, match="do not fit"):
        rb.load_model(name, tmp_path, "cifar10", "Linf")


# ----------------------------------------------------------------------------------- offline loading
@pytest.mark.parametrize("convention", ["plain", "state_dict+module.", "model_state_dict+model."])
def test_cifar_model_loads_offline_sparsifies_and_calibrates(zoo, monkeypatch, tmp_path, convention):
    name = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, name, "cifar10", "Linf", tiny_dm_wrn)
    torch.manual_seed(0)
    source = randomize(tiny_dm_wrn())
    state = source.state_dict()
    payload = {
        "plain": state,
        "state_dict+module.": {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
        "model_state_dict+model.": {"model_state_dict": {f"model.{k}": v for k, v in state.items()}},
    }[convention]
    write(tmp_path, name, "cifar10", "Linf", payload)
    model = rb.load_model(name, tmp_path, "cifar-10", "linf")
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    sparse = sparsify(model, x, preset="published_wrn")
    assert len(operators(sparse)) == 3 * 3 + 1
    calibrate(sparse, batches(), progress=False)
    assert all(op.is_calibrated for op in operators(sparse))


def test_postprocess_cli_on_a_robustbench_file(zoo, monkeypatch, tmp_path):
    """`cli.py postprocess` with backbone robustbench reads a RobustBench file (state_dict + module. prefix)
    and never normalises the input a second time: at alpha 0 the output is the source model's, bit for bit,
    and the statistics equal a direct calibration on the same CIFAR-10 images."""
    from test_data import cifar_images, write_cifar_batch

    from meansparse_pl.cli import main
    from meansparse_pl.data import CIFAR10DataModule

    name = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, name, "cifar10", "Linf", tiny_dm_wrn)
    torch.manual_seed(0)
    source = randomize(tiny_dm_wrn())
    weights = write(
        tmp_path / "models",
        name,
        "cifar10",
        "Linf",
        {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}},
    )
    data = tmp_path / "cifar" / "cifar-10-batches-py"
    data.mkdir(parents=True)
    for batch in range(5):
        write_cifar_batch(
            data / f"data_batch_{batch + 1}", cifar_images(8, 8 * batch), {"labels": [0, 1] * 4}
        )
    write_cifar_batch(data / "test_batch", cifar_images(4, 100), {"labels": [0, 1, 2, 3]})
    output = tmp_path / "meansparse.pt"
    monkeypatch.chdir(tmp_path)
    main(
        [
            "postprocess",
            "--data=meansparse_pl.data.CIFAR10DataModule",
            f"--data.data_dir={tmp_path / 'cifar'}",
            "--data.val_size=8",
            "--data.eval_batch_size=16",
            "--model.backbone=robustbench",
            f"--model.backbone_kwargs={{model_name: {name}, dataset: cifar10, threat_model: Linf}}",
            "--placement.preset=published_wrn",
            f"--checkpoint={weights}",
            f"--output={output}",
            "--trainer.logger=false",
            "--trainer.enable_progress_bar=false",
        ]
    )
    sparse = load_checkpoint(output).eval()  # rebuilt from the recorded architecture ("robustbench")
    assert len(operators(sparse)) == 3 * 3 + 1
    x = images()
    with torch.no_grad():
        assert torch.equal(sparse(x), source(x))
    datamodule = CIFAR10DataModule(data_dir=str(tmp_path / "cifar"), val_size=8, eval_batch_size=16)
    datamodule.setup("fit")
    reference = sparsify(source, x, preset="published_wrn")
    calibrate(reference, datamodule.calibration_dataloader(), progress=False)
    for mine, theirs in zip(operators(sparse), operators(reference), strict=True):
        assert int(mine.count) == int(theirs.count) > 0
        torch.testing.assert_close(mine.mean, theirs.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mine.var, theirs.var, rtol=1e-5, atol=1e-7)


def test_ra_wrn_loads_offline_and_is_traceable(zoo, monkeypatch, tmp_path):
    name = "Peng2023Robust"
    tiny(monkeypatch, name, "cifar10", "Linf", tiny_ra_wrn)
    torch.manual_seed(0)
    source = randomize(tiny_ra_wrn())
    write(tmp_path, name, "cifar10", "Linf", {"state_dict": source.state_dict()})
    model = rb.load_model(name, tmp_path, "cifar10", "Linf")
    assert type(model).__name__ == "TraceableNormalizedWideResNet"
    assert set(model.state_dict()) == set(source.state_dict())  # mean / std stay out of the state dict
    x = images()
    with torch.no_grad():
        assert torch.equal(model(x), source(x))  # the original class's CPU branch, bit for bit
    sparse = sparsify(model, x, preset="published_wrn")
    assert len(operators(sparse)) == 3 * 3 + 1
    calibrate(sparse, batches(), progress=False)


@pytest.mark.parametrize(
    ("name", "kind", "preset", "count"),
    [
        ("Liu2023Comprehensive_ConvNeXt-L", "convnext", "published_convnext", 2 * 5),
        ("Liu2023Comprehensive_Swin-L", "swin", "published_swin", 4 * 5),
    ],
)
def test_imagenet_model_loads_offline(zoo, monkeypatch, tmp_path, name, kind, preset, count):
    """RobustBench's ImageNet files hold the bare network (no ``model.`` prefix); the adapter adds it for the
    ``Sequential(normalize, model)`` wrapper (and runs timm's Swin checkpoint filter, a no-op here)."""
    tiny(monkeypatch, name, "imagenet", "Linf", lambda: tiny_imagenet(kind))
    torch.manual_seed(0)
    source = tiny_imagenet(kind).eval()
    write(tmp_path, name, "imagenet", "Linf", {"state_dict": source.model.state_dict()})
    model = rb.load_model(name, tmp_path, "imagenet", "Linf")
    x = images(size=32)
    with torch.no_grad():
        assert torch.equal(model(x), source(x))
    sparse = sparsify(model, x, preset=preset)
    assert len(operators(sparse)) == count
    calibrate(sparse, batches(), progress=False)
    assert all(op.is_calibrated for op in operators(sparse))


def test_published_model_offline_to_checkpoint_and_back(zoo, monkeypatch, tmp_path):
    name = "Amini2024MeanSparse_S-WRN-94-16"
    tiny(monkeypatch, name, "cifar10", "Linf", lambda: tiny_dm_wrn(published=True))
    torch.manual_seed(0)
    source = randomize(tiny_dm_wrn(published=True), alpha=0.5)
    write(tmp_path, name, "cifar10", "Linf", {"state_dict": source.state_dict()})
    model = rb.load_model(name, tmp_path, "cifar10", "Linf")
    x = images()
    converted = convert_published(model, x)
    with torch.no_grad():
        expected = source(x)
        assert torch.equal(converted(x), expected)
    architecture = {
        "name": "robustbench",
        "kwargs": {"model_name": name, "dataset": "cifar10", "threat_model": "Linf"},
    }
    path = save_checkpoint(converted, tmp_path / "converted.pt", architecture=architecture)
    loaded = load_checkpoint(path)  # the architecture comes from the registry entry "robustbench"
    assert placement_of(loaded).strategy == "published"
    with torch.no_grad():
        assert torch.equal(loaded(x), expected)


def test_registry_builds_robustbench_architectures(zoo, monkeypatch):
    name = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, name, "cifar100", "Linf", tiny_dm_wrn)
    model = create_model("robustbench", model_name=name, dataset="cifar100", threat_model="Linf")
    assert type(model).__name__ == "DMWideResNet" and not model.training
    # RobustBench models normalise their own input: a normalization linked from the datamodule (the CLI
    # does so) must not be applied a second time
    linked = create_model(
        "robustbench",
        model_name=name,
        dataset="cifar100",
        threat_model="Linf",
        normalization=((0.5, 0.5, 0.5), (0.2, 0.2, 0.2)),
    )
    assert type(linked).__name__ == "DMWideResNet"
    linked.load_state_dict(model.state_dict())
    x = images()
    with torch.no_grad():
        assert torch.equal(linked(x), model(x))


# ------------------------------------------------------------------------------------ import script
def _script():
    spec = importlib.util.spec_from_file_location(
        "import_published", ROOT / "scripts" / "import_published.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_import_script_on_a_tiny_fake(zoo, monkeypatch, tmp_path, capsys):
    name = "Amini2024MeanSparse_S-WRN-70-16"
    tiny(monkeypatch, name, "cifar100", "Linf", lambda: tiny_dm_wrn(published=True))
    torch.manual_seed(0)
    source = randomize(tiny_dm_wrn(published=True), alpha=0.35)
    write(tmp_path / "models", name, "cifar100", "Linf", {"state_dict": source.state_dict()})
    out = tmp_path / "out" / "meansparse.pt"
    script = _script()
    argv = [name, "--model-dir", str(tmp_path / "models"), "--dataset", "cifar100", "--output", str(out)]
    assert script.main(argv) == 0
    assert "10 operators, published statistics, alpha 0.35" in capsys.readouterr().out
    loaded = load_checkpoint(out)
    x = images()
    with torch.no_grad():
        assert torch.equal(loaded(x), source(x))
    # a base model needs a preset, and a missing file is a one-line error with exit status 2
    base = "Wang2023Better_WRN-70-16"
    tiny(monkeypatch, base, "cifar100", "Linf", tiny_dm_wrn)
    write(tmp_path / "models", base, "cifar100", "Linf", tiny_dm_wrn().state_dict())
    base_args = [base, "--model-dir", str(tmp_path / "models"), "--dataset", "cifar100", "--output", str(out)]
    assert script.main(base_args) == 2
    assert "pass --preset" in capsys.readouterr().err
    assert script.main([*base_args, "--preset", "published_wrn"]) == 0
    assert "UNCALIBRATED" in capsys.readouterr().out
    assert script.main([base, "--model-dir", str(tmp_path / "nowhere"), "--output", str(out)]) == 2
    assert "never downloads" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- paper configs
# alpha per config, derived in docs/published_models.md (README clean accuracy -> the one Table 1 row with it);
# None: the paper text gives none, the published checkpoint's threshold is used
PAPER_ALPHAS = {
    "cifar10_linf_swrn_94_16": None,
    "cifar10_linf_ra_wrn_70_16": 0.25,
    "cifar10_linf_swrn_70_16": 0.20,
    "cifar10_l2_swrn_70_16": None,
    "cifar100_linf_swrn_70_16": None,
    "imagenet_linf_convnext_l": 0.30,
    "imagenet_linf_swin_l": None,
    "imagenet_linf_ra_wrn_101_2": 0.20,
}


def test_paper_configs_are_consistent(zoo):
    """Every main-results row has a config whose keys are `evaluate` options, whose import command names a
    RobustBench model that exists, and whose threat model, radius and alpha are the documented ones."""
    import inspect
    import re

    import yaml

    from meansparse_pl.trainer import MeanSparseTrainer

    options = set(inspect.signature(MeanSparseTrainer.evaluate).parameters) - {"self", "model", "datamodule"}
    files = {f.stem: f for f in (ROOT / "configs" / "paper").glob("*.yaml")}
    assert set(files) == set(PAPER_ALPHAS)
    for stem, file in files.items():
        text = file.read_text()
        config = yaml.safe_load(text)
        assert set(config) - {"seed_everything", "trainer", "model", "data"} <= options, stem
        imported = re.search(
            r"import_published\.py (\S+) --model-dir models --dataset (\S+) \\\n#\s+--threat-model (\S+)",
            text,
        )
        if imported:  # a published MeanSparse model, imported
            name, dataset, threat = imported.groups()
        else:  # re-made from the base model: step 1 is a postprocess config writing this row's checkpoint
            step1 = re.search(r"cli\.py postprocess --config (\S+)", text).group(1)
            statistics = yaml.safe_load((ROOT / step1).read_text())
            assert f"{statistics['output_dir']}/meansparse.pt" == config["checkpoint"], stem
            assert statistics["model"]["backbone"] == "robustbench", stem
            options_ = statistics["model"]["backbone_kwargs"]
            name, dataset, threat = options_["model_name"], options_["dataset"], options_["threat_model"]
            assert statistics["weights"] == f"models/{dataset}/{threat}/{name}.pt", stem
        rb.model_entry(name, dataset, threat)
        assert config["alpha"] == PAPER_ALPHAS[stem], stem
        assert config["checkpoint"] == f"runs/paper/{stem}/meansparse.pt"
        expected = {"l2": ("L2", 0.5), "linf": ("Linf", (4 if dataset == "imagenet" else 8) / 255)}
        norm, eps = expected[stem.split("_")[1]]
        assert config["threat"]["norm"] == norm and config["threat"]["eps"] == pytest.approx(
            eps, abs=1e-15
        ), stem
        assert config["data"]["class_path"].endswith(
            {
                "cifar10": "CIFAR10DataModule",
                "cifar100": "CIFAR100DataModule",
                "imagenet": "ImageNetDataModule",
            }["cifar100" if stem.startswith("cifar100") else dataset]
        )
        if dataset == "imagenet":  # the resize RobustBench scores the model with (its `preprocessing` entry)
            preprocessing = rb.model_entry(name, dataset, threat).get("preprocessing", "Res256Crop224")
            interpolation = config["data"]["init_args"].get("interpolation", "bilinear")
            assert (interpolation == "bicubic") == preprocessing.startswith("Bicubic"), (stem, preprocessing)
