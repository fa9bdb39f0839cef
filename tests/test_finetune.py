"""MeanSparse-aware adversarial fine-tuning and its equal-budget control: starting from a MeanSparse checkpoint,
training through the straight-through backward (checked against the classic detach trick), recalibration at fit
end, and the two configs run tiny on Fashion-MNIST end to end, then compared."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl import alphas_of, calibrate, operators, save_checkpoint, set_alpha, sparsify
from meansparse_pl.checkpoint import load_checkpoint
from meansparse_pl.cli import main
from meansparse_pl.config import ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.errors import CheckpointError, ConfigurationError
from meansparse_pl.models import create_model
from meansparse_pl.module import AdversarialClassifier

ROOT = Path(__file__).parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
GREY = ((0.5,), (0.25,))
TINY_NET = {"channels": [4, 8], "hidden": 16}


def _sparse_checkpoint(path: Path, alpha: float = 0.2) -> nn.Module:
    torch.manual_seed(0)
    network = create_model("small_cnn", num_classes=10, in_channels=1, normalization=GREY, **TINY_NET).eval()
    sparse = sparsify(network, (1, 28, 28))
    calibrate(sparse, [torch.rand(32, 1, 28, 28)], progress=False)
    set_alpha(sparse, alpha)
    architecture = {
        "name": "small_cnn",
        "kwargs": {"num_classes": 10, "in_channels": 1, "normalization": GREY, **TINY_NET},
    }
    save_checkpoint(sparse, path, architecture=architecture)
    return sparse


def _module(**options) -> AdversarialClassifier:
    return AdversarialClassifier(
        backbone="small_cnn",
        backbone_kwargs=TINY_NET,
        in_channels=1,
        normalization=GREY,
        threat=ThreatModel("Linf", 0.1),
        step_size=0.05,
        attack_steps=2,
        **options,
    )


def test_fine_tuning_starts_from_the_checkpoint_once_with_the_alpha_asked_for(tmp_path):
    saved = _sparse_checkpoint(tmp_path / "ms.pt")
    module = _module(init_checkpoint=str(tmp_path / "ms.pt"), operator_alpha=0.35)
    module.configure_model()
    assert len(operators(module.model)) == 3 and alphas_of(module.model) == pytest.approx([0.35] * 3)
    for key, value in saved.state_dict().items():
        if not key.endswith(".alpha"):
            torch.testing.assert_close(module.model.state_dict()[key], value, rtol=0, atol=0)
    with torch.no_grad():  # a second set-up (fit, then test) must not reload and undo the training
        next(module.model.parameters()).add_(1.0)
    changed = next(module.model.parameters()).clone()
    module.configure_model()
    torch.testing.assert_close(next(module.model.parameters()), changed, rtol=0, atol=0)
    # a Lightning checkpoint of the fine-tuned module rebuilds its operators without reading init_checkpoint
    assert module.started_from == str(tmp_path / "ms.pt")


def test_fine_tuning_options_are_checked_with_one_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match="operator_alpha sets the alpha"):
        _module(operator_alpha=0.2)
    with pytest.raises(ConfigurationError, match="backward mode"):
        _module(operator_backward="sideways")
    with pytest.raises(ConfigurationError, match="alpha"):
        _module(init_checkpoint="x.pt", operator_alpha=-1)
    missing = _module(init_checkpoint=str(tmp_path / "missing.pt"))
    with pytest.raises(ConfigurationError, match="is not a file"):
        missing.configure_model()
    plain = tmp_path / "plain.pt"
    torch.save(_module().model.state_dict(), plain)
    with pytest.raises(ConfigurationError, match="has no MeanSparse operators"):
        _module(init_checkpoint=str(plain), operator_alpha=0.2).configure_model()
    # plain weights without operator_alpha: ordinary fine-tuning of the base network
    base = _module(init_checkpoint=str(plain))
    base.configure_model()
    assert not operators(base.model)
    torch.save({"state_dict": {"model.nonsense": torch.zeros(1)}}, tmp_path / "wrong.ckpt")
    with pytest.raises(CheckpointError, match="do not fit"):
        _module(init_checkpoint=str(tmp_path / "wrong.ckpt")).configure_model()


class _HandMade(nn.Module):
    """Linear -> MeanSparse+ReLU -> Linear, written out with plain tensors: the straight-through gradient by the
    classic detach trick, s = h + (band(h) - h).detach(), independent of the package's autograd Functions."""

    def __init__(self, sparse: nn.Module) -> None:
        super().__init__()
        self.sparse = sparse

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, last = [m for m in self.sparse.modules() if isinstance(m, nn.Linear)]
        op = operators(self.sparse)[0]
        h = first(x.flatten(1))
        sigma = op.var.double().sqrt().float()
        inside = (h - op.mean).abs() < float(op.alpha) * sigma
        banded = torch.where(inside, op.mean.expand_as(h), h)
        return last(F.relu(h + (banded - h).detach()))


def test_the_training_loss_differentiates_through_the_operators_straight_through():
    torch.manual_seed(1)
    network = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x, y = torch.rand(64, 12), torch.randint(0, 3, (64,))
    sparse = sparsify(network, x[:1])
    calibrate(sparse, [x], progress=False)
    set_alpha(sparse, 0.8)  # a wide band: many features inside it, where the exact gradient is zero
    gradients = {}
    for mode in ("straight_through", "exact"):
        module = _module(objective="standard", operator_backward=mode)
        module.model = sparse
        sparse.zero_grad()
        loss, _ = module.training_loss(x, y)
        loss.backward()
        gradients[mode] = [p.grad.clone() for p in sparse.parameters()]
    reference = _HandMade(sparse)
    sparse.zero_grad()
    torch.testing.assert_close(F.cross_entropy(reference(x), y), loss, rtol=1e-6, atol=1e-6)
    F.cross_entropy(reference(x), y).backward()
    for ours, theirs in zip(
        gradients["straight_through"], [p.grad for p in sparse.parameters()], strict=True
    ):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    first_layer = 0
    assert not torch.allclose(gradients["exact"][first_layer], gradients["straight_through"][first_layer])


def test_the_attack_and_the_loss_see_the_operators_in_the_chosen_mode_and_it_is_restored():
    module = _module(operator_backward="surrogate")
    network = sparsify(module.model.eval(), (1, 28, 28))
    calibrate(network, [torch.rand(16, 1, 28, 28)], progress=False)
    module.model = network
    seen: list[str] = []
    operators(network)[0].register_forward_pre_hook(lambda op, args: seen.append(op.backward_mode))
    x, y = torch.rand(4, 1, 28, 28), torch.randint(0, 10, (4,))
    module.attack(x, y, steps=1)
    module.training_loss(x, y)
    assert seen and set(seen) == {"surrogate"}
    assert {op.backward_mode for op in operators(network)} == {"exact"}


# ------------------------------------------------------------------------------------- the configs, tiny
TINY = [
    "--data.init_args.train_subset=256",
    "--data.init_args.val_subset=64",
    "--data.init_args.test_subset=64",
    "--data.init_args.val_size=500",
    "--data.init_args.batch_size=64",
    "--data.init_args.eval_batch_size=64",
    "--model.backbone_kwargs={'channels': [8, 16], 'hidden': 32, 'activation': 'relu'}",
    "--model.attack_steps=2",
    "--model.val_attack_steps=2",
    "--trainer.enable_progress_bar=false",
]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def test_the_fine_tuning_config_and_its_control_run_and_compare_on_fashion_mnist(tmp_path):
    base = tmp_path / "base"
    main(["fit", f"--config={ROOT}/configs/fashion_mnist_demo.yaml", *TINY, "--trainer.max_epochs=1",
          f"--trainer.default_root_dir={base}", f"--trainer.logger.init_args.save_dir={base}",
          f"--trainer.callbacks.dirpath={base}/ckpt"])  # fmt: skip
    start = base / "meansparse.pt"
    runs = {}
    for name, extra in (
        ("finetune", []),
        ("control", [f"--config={ROOT}/configs/fashion_mnist_finetune_control.yaml"]),
    ):
        out = tmp_path / name
        cli = main(["fit", f"--config={ROOT}/configs/fashion_mnist_finetune.yaml", *extra, *TINY,
                    f"--model.init_checkpoint={start}", f"--trainer.default_root_dir={out}"])  # fmt: skip
        runs[name] = (out, cli.trainer.global_step, cli.model)
    (ft_dir, ft_steps, ft_module), (ctl_dir, ctl_steps, ctl_module) = runs["finetune"], runs["control"]
    assert ft_steps == ctl_steps == 4  # the equal budget: 256 images in batches of 64, one epoch each
    assert ft_module.started_from == ctl_module.started_from == str(start)
    finetuned, control = load_checkpoint(ft_dir / "meansparse.pt"), load_checkpoint(ctl_dir / "meansparse.pt")
    assert alphas_of(finetuned) == pytest.approx([0.25] * 3) and alphas_of(control) == [0.0] * 3
    weights = [k for k in finetuned.state_dict() if k.endswith("weight")]
    original = load_checkpoint(start).state_dict()
    for model in (finetuned, control):
        assert any(not torch.equal(model.state_dict()[k], original[k]) for k in weights)  # both trained
    assert any(not torch.equal(finetuned.state_dict()[k], control.state_dict()[k]) for k in weights)
    # recalibrated at fit end: the statistics of the fine-tuned weights, computed here independently
    best = next((ft_dir / "lightning_logs").glob("version_*/checkpoints/*.ckpt"))
    reference = AdversarialClassifier.load_from_checkpoint(best, weights_only=True).model.eval()
    data = FashionMNISTDataModule(
        FMNIST, train_subset=256, val_subset=64, test_subset=64, val_size=500, batch_size=64
    )
    data.setup("fit")
    calibrate(reference, data.calibration_dataloader(), progress=False)
    for a, b in zip(operators(finetuned), operators(reference), strict=True):
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.var, b.var, rtol=1e-6, atol=1e-7)
    assert not torch.allclose(operators(finetuned)[0].mean, operators(load_checkpoint(start))[0].mean)

    models = (
        f"[{{label: base, checkpoint: {start}, alpha: 0}}, {{label: control, checkpoint: {ctl_dir}/meansparse.pt, "
        f"alpha: 0}}, {{label: fine-tuned, checkpoint: {ft_dir}/meansparse.pt}}]"
    )
    main(["compare", "--data.class_path=meansparse_pl.data.FashionMNISTDataModule", f"--data.data_dir={FMNIST}",
          "--data.test_subset=64", "--data.eval_batch_size=64", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
          f"--models={models}", "--control=control", "--attacks.names=[clean, apgd-ce]", "--attacks.n_iter=3",
          "--attacks.cascade=[bpda-apgd-ce]", "--threat.eps=0.1", "--limit_samples=64", "--batch_size=64",
          f"--output_dir={tmp_path}/compare"])  # fmt: skip
    report = json.loads((tmp_path / "compare" / "comparison.json").read_text())
    assert list(report["accuracy"]) == ["base", "control", "fine-tuned"] and report["control"] == "control"
    assert (tmp_path / "compare" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # clean accuracy of the control, computed here with a plain forward pass on the same 64 test images
    data.setup("test")
    images, labels = next(iter(data.test_dataloader()))
    with torch.no_grad():
        expected = 100.0 * (control.eval()(images).argmax(1) == labels).float().mean().item()
    assert report["accuracy"]["control"]["clean"] == pytest.approx(expected)
    gap = report["versus_control"]["fine-tuned"]["clean"]["difference"]
    assert gap == pytest.approx(report["accuracy"]["fine-tuned"]["clean"] - expected)
