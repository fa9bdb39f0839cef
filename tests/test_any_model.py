"""Any model through every step: a network class the package has never seen (tests/custom_networks.py), saved as
plain weights, goes through postprocess, alpha_search and evaluate from the command line; the numbers equal the
Python API's on the same images, and reach the user's Lightning logger (metrics.csv)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from custom_networks import TinyNet

from meansparse_pl import AlphaSearch, AttackConfig, ThreatModel, load_checkpoint, run_attack, set_alpha
from meansparse_pl.cli import main
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.io import safe_load

FMNIST = "/usr/share/datasets/fashion-mnist"
DATA = [
    "--data=meansparse_pl.data.FashionMNISTDataModule",
    f"--data.data_dir={FMNIST}",
    "--data.val_size=200",
    "--data.val_subset=32",
    "--data.test_subset=32",
    "--data.calibration_subset=256",
    "--data.eval_batch_size=64",
]
QUIET = ["--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false"]
NETWORK = ["--network=custom_networks.TinyNet", "--network.init_args.width=6"]
SEARCH = [
    "--alphas=[0, 0.5]",
    "--threat.eps=0.1",
    "--attacks.n_iter=3",
    "--limit_samples=32",
    "--batch_size=32",
]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def _datamodule() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(FMNIST, val_size=200, val_subset=32, test_subset=32, calibration_subset=256)
    dm.setup("fit")
    return dm


def _plain_weights(path: Path) -> None:
    """TinyNet trained for a few steps on Fashion-MNIST (so the numbers are not chance), saved as a state dict."""
    torch.manual_seed(0)
    net = TinyNet(width=6)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.01)
    loader = torch.utils.data.DataLoader(_datamodule().calibration_dataloader().dataset, batch_size=64)
    for images, labels in loader:
        optimiser.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimiser.step()
    torch.save(net.state_dict(), path)


def _csv_rows(folder: Path) -> list[dict[str, str]]:
    """Every row of every metrics.csv under ``folder`` (CSVLogger writes one per run, in version_N)."""
    rows: list[dict[str, str]] = []
    for path in sorted(folder.rglob("metrics.csv")):
        with open(path) as handle:
            rows += list(csv.DictReader(handle))
    return rows


def test_a_network_the_package_never_saw_goes_through_every_step(tmp_path, capsys):
    weights = tmp_path / "weights.pt"
    _plain_weights(weights)
    sparse_path = tmp_path / "sparse.pt"
    main(["postprocess", *DATA, *QUIET, "--trainer.logger=false", *NETWORK, f"--checkpoint={weights}",
          f"--output={sparse_path}"])  # fmt: skip
    record = safe_load(sparse_path)["meansparse"]["architecture"]
    assert record == {"class_path": "custom_networks.TinyNet", "init_args": {"width": 6, "num_classes": 10}}

    # the checkpoint names its network; nothing is imported from the file: the error says what to pass
    with pytest.raises(SystemExit) as info:
        main(
            ["alpha_search", *DATA, *QUIET, "--trainer.logger=false", f"--checkpoint={sparse_path}", *SEARCH]
        )
    assert info.value.code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert (
        "--network custom_networks.TinyNet --network.init_args.width 6 --network.init_args.num_classes 10"
        in line
    )

    logger = [
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
    ]
    main(["alpha_search", *DATA, *QUIET, *logger, *NETWORK, f"--checkpoint={sparse_path}", *SEARCH,
          f"--output_dir={tmp_path / 'search'}", "--write_alpha=false", "--max_clean_drop=100"])  # fmt: skip
    cli_search = json.loads((tmp_path / "search" / "alpha_search.json").read_text())
    model = load_checkpoint(sparse_path, TinyNet(width=6))
    dataset = torch.utils.data.Subset(_datamodule().val_dataloader().dataset, range(32))
    python_search = AlphaSearch(
        alphas=[0, 0.5],
        threat=ThreatModel("Linf", 0.1),
        attacks=AttackConfig(names=["apgd-ce", "apgd-dlr", "bpda-apgd-ce"], n_iter=3),
        max_clean_drop=100,
        batch_size=32,
    ).run(model, dataset)
    assert cli_search["accuracy"] == {f"{a:g}": row for a, row in python_search.accuracy.items()}
    assert cli_search["suggestion"] == python_search.suggestion()
    rows = _csv_rows(tmp_path)
    logged = {
        float(r["alpha_search/alpha"]): float(r["alpha_search/worst_case"])
        for r in rows
        if r.get("alpha_search/alpha")
    }
    assert logged == {a: python_search.accuracy[a]["worst_case"] for a in (0.0, 0.5)}
    assert [float(r["alpha_search/suggestion"]) for r in rows if r.get("alpha_search/suggestion")] == [
        python_search.suggestion()
    ]

    evaluate = ["--attacks.names=[clean, apgd-ce]", "--attacks.n_iter=3", "--alpha=0.5", "--threat.eps=0.1",
                "--limit_samples=32", "--batch_size=32", "--compare_base=false", f"--output_dir={tmp_path / 'evaluate'}"]  # fmt: skip
    main(["evaluate", *DATA, *QUIET, *logger, *NETWORK, f"--checkpoint={sparse_path}", *evaluate])
    report = json.loads((tmp_path / "evaluate" / "evaluation.json").read_text())
    (result,) = report["results"]
    images = torch.stack([_datamodule().test_dataloader().dataset[i][0] for i in range(32)])
    labels = torch.stack([torch.as_tensor(_datamodule().test_dataloader().dataset[i][1]) for i in range(32)])
    set_alpha(model, 0.5)
    clean = run_attack("clean", model, images, labels, eps=0.1, seed=0)
    apgd = run_attack("apgd-ce", model, images, labels, eps=0.1, seed=0, n_iter=3)
    assert result["accuracy"]["clean"] == pytest.approx(100.0 * clean.float().mean().item())
    assert result["accuracy"]["apgd-ce"] == pytest.approx(100.0 * apgd.float().mean().item())
    assert result["accuracy"]["best_known"] == pytest.approx(100.0 * (clean & apgd).float().mean().item())
    logged = [r for r in _csv_rows(tmp_path) if r.get("evaluate/meansparse/eps=0.1/best_known")]
    assert [float(r["evaluate/meansparse/eps=0.1/best_known"]) for r in logged] == [
        result["accuracy"]["best_known"]
    ]


def test_validate_takes_the_same_network_option(tmp_path, capsys):
    main(["validate", *DATA, *QUIET, "--trainer.logger=false", *NETWORK, "--model.threat.eps=0.1",
          "--model.val_attack_steps=1"])  # fmt: skip
    assert "val/pgd_acc" in capsys.readouterr().out
