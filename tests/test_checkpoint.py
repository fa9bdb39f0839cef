"""Checkpoints: round trip, Lightning prefix, and a clear error for every kind of bad file."""

from __future__ import annotations

import pickle

import pytest
import torch
import torchvision
from torch import nn

from meansparse_pl import calibrate, get_alpha, operators, set_alpha, sparsify
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.errors import CheckpointError
from meansparse_pl.io import safe_load
from meansparse_pl.models import create_model


def _sparse_resnet(alpha: float = 0.25) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.rand(6, 3, 32, 32)
    sparse = sparsify(model, x[:1])
    calibrate(sparse, [x], progress=False)
    set_alpha(sparse, alpha)
    return sparse, x


def test_round_trip_rebuilds_operators_on_a_fresh_instance(tmp_path):
    sparse, x = _sparse_resnet()
    path = save_checkpoint(sparse, tmp_path / "m.pt")
    loaded = load_checkpoint(path, torchvision.models.resnet18(num_classes=10)).eval()
    assert torch.equal(loaded(x), sparse(x))
    assert get_alpha(loaded) == 0.25
    for a, b in zip(operators(loaded), operators(sparse), strict=True):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var) and a.count == b.count
    assert not list(tmp_path.glob(".*.tmp")), "atomic write left a temporary file behind"


def test_architecture_record_builds_the_model_itself(tmp_path):
    torch.manual_seed(0)
    kwargs = {"num_classes": 10, "in_channels": 1, "normalization": ((0.5,), (0.25,))}
    model = create_model("small_cnn", **kwargs).eval()
    x = torch.rand(4, 1, 28, 28)
    sparse = sparsify(model, x[:1])
    calibrate(sparse, [x], progress=False)
    set_alpha(sparse, 0.3)
    save_checkpoint(sparse, tmp_path / "m.pt", architecture={"name": "small_cnn", "kwargs": kwargs})
    loaded = load_checkpoint(tmp_path / "m.pt").eval()
    assert torch.equal(loaded(x), sparse(x))


def test_lightning_style_prefixed_state_dict_loads(tmp_path):
    sparse, x = _sparse_resnet()
    save_checkpoint(sparse, tmp_path / "m.pt")
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    payload["state_dict"] = {f"model.{k}": v for k, v in payload["state_dict"].items()}
    payload["state_dict"]["train_acc.tp"] = torch.zeros(1)  # a LightningModule's other entries are ignored
    torch.save(payload, tmp_path / "lightning.ckpt")
    loaded = load_checkpoint(tmp_path / "lightning.ckpt", torchvision.models.resnet18(num_classes=10)).eval()
    assert torch.equal(loaded(x), sparse(x))


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: None, "no checkpoint file"),
        (lambda p: p.write_bytes(b""), "corrupt or truncated"),
        (lambda p: p.write_bytes(b"not a zip file at all" * 10), "corrupt or truncated"),
        (lambda p: torch.save({"state_dict": {"w": torch.zeros(1)}}, p), "not a meansparse_pl checkpoint"),
        (lambda p: torch.save([1, 2, 3], p), "not a checkpoint dictionary"),
        (lambda p: p.write_bytes(pickle.dumps({"x": _Evil()})), "refusing"),
    ],
    ids=["missing", "empty", "garbage", "foreign", "list", "pickled-code"],
)
def test_bad_files_give_one_clear_error(tmp_path, make, message, capsys):
    path = tmp_path / "bad.pt"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path, torchvision.models.resnet18(num_classes=10))
    assert "this must never run" not in capsys.readouterr().out


def test_pickled_code_inside_torch_save_is_refused(tmp_path, capsys):
    torch.save({"state_dict": {}, "evil": _Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing"):
        safe_load(tmp_path / "evil.pt")
    assert "this must never run" not in capsys.readouterr().out


def test_truncated_real_checkpoint(tmp_path):
    sparse, _ = _sparse_resnet()
    save_checkpoint(sparse, tmp_path / "m.pt")
    data = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(tmp_path / "cut.pt", torchvision.models.resnet18(num_classes=10))


def test_wrong_architecture_is_named(tmp_path):
    sparse, _ = _sparse_resnet()
    save_checkpoint(sparse, tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match="another architecture|do not fit"):
        load_checkpoint(tmp_path / "m.pt", torchvision.models.resnet34(num_classes=10))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_checkpoint(tmp_path / "m.pt", torchvision.models.resnet18(num_classes=7))
