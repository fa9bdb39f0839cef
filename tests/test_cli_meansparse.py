"""End to end through the CLI: fit with the MeanSparseCallback, postprocess, alpha_search, evaluate, and a
one-line error (never a traceback) for each kind of bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from meansparse_pl import alphas_of, calibrate, get_alpha, operators, sparsify
from meansparse_pl.checkpoint import load_checkpoint, save_checkpoint
from meansparse_pl.cli import main
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.module import AdversarialClassifier

ROOT = Path(__file__).parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
DATA = [
    "--data=meansparse_pl.data.FashionMNISTDataModule",
    f"--data.data_dir={FMNIST}",
    "--data.train_subset=256",
    "--data.val_subset=64",
    "--data.test_subset=64",
    "--data.val_size=500",
    "--data.batch_size=64",
    "--data.eval_batch_size=64",
]
QUIET = [
    "--trainer.logger=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
]
MODEL = [
    "--model.backbone=small_cnn",
    "--model.backbone_kwargs={'channels': [8, 16], 'hidden': 32}",
    "--model.threat.eps=0.1",
]


pytestmark = pytest.mark.usefixtures("in_tmp_path")


def _datamodule() -> FashionMNISTDataModule:
    dm = FashionMNISTDataModule(
        FMNIST,
        train_subset=256,
        val_subset=64,
        test_subset=64,
        val_size=500,
        batch_size=64,
        eval_batch_size=64,
    )
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def trained(tmp_path_factory, single_thread_module):
    """A one-epoch fit with the callback: the best Lightning checkpoint and the sparsified checkpoint."""
    out = tmp_path_factory.mktemp("fit")
    main(
        [
            "fit",
            *DATA,
            *QUIET,
            *MODEL,
            "--model.attack_steps=2",
            "--model.val_attack_steps=2",
            "--model.optimizer=adam",
            "--model.lr=0.003",
            "--trainer.max_epochs=1",
            f"--trainer.default_root_dir={out}",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks+=lightning.pytorch.callbacks.ModelCheckpoint",
            f"--trainer.callbacks.dirpath={out}/ckpt",
            "--trainer.callbacks.monitor=val/pgd_acc",
            "--trainer.callbacks.mode=max",
            "--trainer.callbacks+=meansparse_pl.callback.MeanSparseCallback",
            f"--trainer.callbacks.output_path={out}/sparse.pt",
        ]
    )
    best = next((out / "ckpt").glob("*.ckpt"))
    return {"dir": out, "best": best, "sparse": out / "sparse.pt"}


@pytest.fixture(scope="module")
def single_thread_module():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_callback_statistics_equal_a_direct_calibration_of_the_best_weights(trained):
    sparse = load_checkpoint(trained["sparse"])
    assert get_alpha(sparse) == 0.0 and len(operators(sparse)) == 3
    # independent: the best Lightning checkpoint, sparsified and calibrated directly on the same split
    module = AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True)
    reference = sparsify(module.model.eval(), (1, 28, 28))
    calibrate(reference, _datamodule().calibration_dataloader(), progress=False)
    sites = sparse.meansparse_placement.sites
    for site, a, b in zip(sites, operators(sparse), operators(reference), strict=True):
        spatial = int(torch.tensor(site.input_shape[2:]).prod()) if len(site.input_shape) > 2 else 1
        assert int(a.count) == int(b.count) == 256 * spatial  # every training image exactly once
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.var, b.var, rtol=1e-6, atol=1e-7)


def test_postprocess_from_a_lightning_checkpoint_with_limited_batches(trained, tmp_path):
    main(
        [
            "postprocess",
            *DATA,
            *QUIET,
            *MODEL,
            f"--weights={trained['best']}",
            f"--output_dir={tmp_path}",
            "--alpha=0.2",
            "--trainer.limit_predict_batches=2",
            "--placement.exclude=['backbone.act3']",
        ]
    )
    output = tmp_path / "meansparse.pt"
    sparse = load_checkpoint(output)
    payload = torch.load(output, weights_only=True)
    assert payload["metadata"]["calibration"]["images"] == 128  # 2 batches of 64, recorded in the output
    assert get_alpha(sparse) == pytest.approx(0.2) and len(operators(sparse)) == 2
    module = AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True)
    reference = sparsify(module.model.eval(), (1, 28, 28), exclude=["backbone.act3"])
    calibrate(reference, _datamodule().calibration_dataloader(), limit_batches=2, progress=False)
    for a, b in zip(operators(sparse), operators(reference), strict=True):
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)


def test_postprocess_limit_samples_counts_images_as_every_subcommand_does(trained, tmp_path):
    """--limit_samples N: the statistics of the first N calibration images (here 96 = a batch of 64 and one of 32),
    the same numbers as calibrate() over exactly those images."""
    main(["postprocess", *DATA, *QUIET, *MODEL, f"--weights={trained['best']}", f"--output_dir={tmp_path}",
          "--limit_samples=96"])  # fmt: skip
    sparse = load_checkpoint(tmp_path / "meansparse.pt")
    summary = torch.load(tmp_path / "meansparse.pt", weights_only=True)["metadata"]["calibration"]
    assert summary["images"] == 96 and summary["limit_samples"] == 96
    module = AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True)
    reference = sparsify(module.model.eval(), (1, 28, 28))
    calibration = _datamodule().calibration_dataloader()
    first = torch.utils.data.Subset(calibration.dataset, range(96))
    calibrate(reference, torch.utils.data.DataLoader(first, batch_size=64), progress=False)
    for a, b in zip(operators(sparse), operators(reference), strict=True):
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(a.var, b.var, rtol=1e-6, atol=1e-7)


def test_postprocess_old_option_names_still_work_for_one_release(trained, tmp_path, caplog, capsys):
    """--checkpoint / --output (a file) are postprocess's old names of --weights / --output_dir: the same file,
    one ``deprecated:`` line each; both names at once is one error line."""
    args = [*DATA, *QUIET, *MODEL, "--trainer.limit_predict_batches=1"]
    main(["postprocess", *args, f"--weights={trained['best']}", f"--output_dir={tmp_path}/new"])
    caplog.clear()
    main(["postprocess", *args, f"--checkpoint={trained['best']}", f"--output={tmp_path}/old.pt"])
    deprecations = [r.getMessage() for r in caplog.records if r.getMessage().startswith("deprecated:")]
    assert deprecations == [
        "deprecated: postprocess --checkpoint is now --weights (the old name is accepted until meansparse_pl 0.3).",
        "deprecated: postprocess --output is now --output_dir (the old name is accepted until meansparse_pl 0.3).",
    ]
    new, old = load_checkpoint(tmp_path / "new" / "meansparse.pt"), load_checkpoint(tmp_path / "old.pt")
    for a, b in zip(operators(new), operators(old), strict=True):
        assert torch.equal(a.mean, b.mean) and torch.equal(a.var, b.var)
    line = _cli_error(
        ["postprocess", *args, f"--checkpoint={trained['best']}", f"--weights={trained['best']}"], capsys
    )
    assert "--checkpoint is the old name of --weights; give --weights only" in line


def test_alpha_search_successive_halving_from_the_cli(trained, tmp_path):
    checkpoint = tmp_path / "sparse.pt"
    checkpoint.write_bytes(trained["sparse"].read_bytes())
    args = [*DATA, *QUIET, *MODEL, f"--checkpoint={checkpoint}", "--alphas=[0, 0.3, 8.0]", "--threat.eps=0.1"]
    args += ["--attacks.n_iter=2", "--limit_samples=64", "--batch_size=16", "--write_alpha=false"]
    main(["alpha_search", *args, "--schedule=SuccessiveHalving", "--schedule.elimination=clearly_worse", "--schedule.nonzero_finalists=1",
          "--selection=smallest_within_error", f"--output_dir={tmp_path}/halving"])  # fmt: skip
    result = json.loads((tmp_path / "halving" / "alpha_search.json").read_text())
    assert result["schedule"] == "successive_halving" and result["selection"] == "smallest_within_error"
    assert result["suggestion"] <= result["highest_eligible"]
    assert "one-standard-error rule" in (tmp_path / "halving" / "alpha_search.md").read_text()
    # alpha 8 replaces nearly every feature by its channel mean: its clean accuracy collapses, so it is
    # clearly ineligible after the first round and never sees the whole split
    assert result["samples_per_alpha"]["8"] < 64 == result["samples_per_alpha"]["0"]
    assert result["accuracy"]["8"]["clean"] < result["accuracy"]["0"]["clean"] - 10


def test_per_site_alpha_search_from_the_cli_writes_per_operator_alphas_that_evaluate(trained, tmp_path):
    checkpoint = tmp_path / "sparse.pt"
    checkpoint.write_bytes(trained["sparse"].read_bytes())
    args = [*DATA, *QUIET, *MODEL, f"--checkpoint={checkpoint}", "--threat.eps=0.1", "--batch_size=32"]
    main(["alpha_search", *args, "--alphas=[0, 0.3]", "--attacks.n_iter=2", "--limit_samples=64",
          "--schedule=PerSite", "--schedule.budget=3", f"--output_dir={tmp_path}/sites"])  # fmt: skip
    result = json.loads((tmp_path / "sites" / "alpha_search.json").read_text())
    count = len(operators(load_checkpoint(checkpoint)))
    assert result["schedule"] == "per_site" and len(result["site_alphas"]) == count
    assert sum(len(step["tried"]) for step in result["site_steps"]) <= 3  # the budget
    assert "Per-operator alphas" in (tmp_path / "sites" / "alpha_search.md").read_text()
    assert alphas_of(load_checkpoint(checkpoint)) == pytest.approx(result["site_alphas"])
    # the same 64 held-out images, evaluated from the written checkpoint: the search's clean accuracy again
    main(["evaluate", *args, "--attacks.names=[clean]", "--limit_samples=64", "--compare_base=false",
          "--split=val", f"--output_dir={tmp_path}/eval"])  # fmt: skip
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    (row,) = report["results"]
    assert row["accuracy"]["clean"] == pytest.approx(result["site_accuracy"]["clean"])


def test_alpha_search_writes_reports_and_the_chosen_alpha(trained, tmp_path):
    checkpoint = tmp_path / "sparse.pt"
    checkpoint.write_bytes(trained["sparse"].read_bytes())
    main(
        [
            "alpha_search",
            *DATA,
            *QUIET,
            *MODEL,
            f"--checkpoint={checkpoint}",
            "--alphas=[0, 0.3, 2.0]",
            "--threat.eps=0.1",
            "--attacks.n_iter=2",
            "--limit_samples=32",
            "--batch_size=32",
            "--max_clean_drop=100",
            f"--output_dir={tmp_path}/as",
        ]
    )
    result = json.loads((tmp_path / "as" / "alpha_search.json").read_text())
    assert result["num_samples"] == 32 and set(result["accuracy"]) == {"0", "0.3", "2"}
    assert (tmp_path / "as" / "alpha_search.png").read_bytes()[:4] == b"\x89PNG"
    assert "Rule:" in (tmp_path / "as" / "alpha_search.md").read_text()
    assert get_alpha(load_checkpoint(checkpoint)) == pytest.approx(result["suggestion"])
    # independent check of the clean column at alpha 0: the trained network itself on the same 32 images
    module = AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True).eval()
    images, labels = next(
        iter(torch.utils.data.DataLoader(_datamodule().val_dataloader().dataset, batch_size=32))
    )
    with torch.no_grad():
        expected = 100.0 * (module(images).argmax(1) == labels).float().mean().item()
    assert result["accuracy"]["0"]["clean"] == pytest.approx(expected)


def test_evaluate_reports_base_and_meansparse_side_by_side(trained, tmp_path):
    checkpoint = tmp_path / "sparse.pt"
    sparse = load_checkpoint(trained["sparse"])
    for op in operators(sparse):
        op.set_alpha(0.5)
    save_checkpoint(
        sparse,
        checkpoint,
        architecture=torch.load(trained["sparse"], weights_only=True)["meansparse"]["architecture"],
    )
    main(
        [
            "evaluate",
            *DATA,
            *QUIET,
            *MODEL,
            f"--checkpoint={checkpoint}",
            "--attacks.names=[clean, apgd-ce, bpda-apgd-ce]",
            "--threat.eps=0.05",
            "--extra_eps=[0.1]",
            "--large_eps=0.5",
            "--attacks.n_iter=3",
            "--limit_samples=32",
            "--batch_size=32",
            f"--output_dir={tmp_path}/ev",
            "--histogram_site=0",
        ]
    )
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    variants = {(r["name"], r["eps"]) for r in report["results"]}
    assert variants == {("meansparse", 0.05), ("meansparse", 0.1), ("base", 0.05), ("base", 0.1)}
    for r in report["results"]:
        acc = r["accuracy"]
        assert acc["best_known"] <= min(acc["clean"], acc["apgd-ce"], acc["bpda-apgd-ce"]) + 1e-9
        if r["name"] == "base":  # identity operators: BPDA is exact-gradient APGD
            assert acc["bpda-apgd-ce"] == acc["apgd-ce"]
    assert any("accuracy falls as epsilon grows" in line for line in report["sanity_checks"])
    assert (tmp_path / "ev" / "histogram_site0.png").read_bytes()[:4] == b"\x89PNG"
    assert "best known" in (tmp_path / "ev" / "evaluation.md").read_text()
    # the indicators of attack failure, per variant and eps: probes at eps 0.05, per-sample ones at both radii
    entries = report["diagnostics"]
    assert all({"indicator", "variant", "eps", "measured", "fired"} <= set(e) for e in entries)
    probed = {(e["indicator"], e["variant"]) for e in entries if e["eps"] == 0.05}
    for variant in ("meansparse", "base"):
        assert {("randomness", variant), ("operator_band", variant), ("attack_budget", variant)} <= probed
        assert ("adaptive_beats_exact", variant) in {
            (e["indicator"], e["variant"]) for e in entries if e["eps"] == 0.1
        }
        assert ("not_monotone_in_eps", variant) in {
            (e["indicator"], e["variant"]) for e in entries if e["eps"] == 0.1
        }
    # attacked with 3 iterations: the stopped-early attack is what the diagnostics must notice
    assert any(e["fired"] for e in entries if e["indicator"] == "incomplete_optimisation")
    assert "## Can this number be trusted?" in (tmp_path / "ev" / "evaluation.md").read_text()


def test_diagnose_subcommand_probes_a_large_alpha_and_writes_its_report(trained, tmp_path):
    main(["diagnose", *DATA, *QUIET, *MODEL, f"--checkpoint={trained['sparse']}", "--alpha=1.0",
          "--threat.eps=0.1", "--attacks.n_iter=20", "--diagnostics.subset=64", "--diagnostics.expensive=false",
          f"--output_dir={tmp_path}/diag"])  # fmt: skip
    entries = json.loads((tmp_path / "diag" / "diagnostics.json").read_text())
    fired = {(e["indicator"], e["variant"]) for e in entries if e["fired"]}
    assert ("operator_band", "meansparse") in fired  # alpha 1: the band misdirects the gradient
    assert ("operator_band", "base") not in fired  # alpha 0: no band
    assert "attack_budget" not in {e["indicator"] for e in entries}  # expensive probes off
    assert (tmp_path / "diag" / "diagnostics.md").read_text().startswith("## Can this number be trusted?")


def test_bad_diagnostics_options_are_one_line_before_loading(trained, tmp_path, capsys):
    base = [*DATA, *QUIET, *MODEL, f"--checkpoint={trained['sparse']}", f"--output_dir={tmp_path}/x"]
    assert "at least 2" in _cli_error(["diagnose", *base, "--diagnostics.forwards=1"], capsys)
    assert "diagnostics.subset" in _cli_error(["evaluate", *base, "--diagnostics.subset=0"], capsys)
    assert "eot_iter" in _cli_error(["evaluate", *base, "--attacks.eot_iter=0"], capsys)
    assert not (tmp_path / "x").exists()


def _cli_error(args: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error:"), err
    return err[-1]


def test_bad_inputs_are_one_line_errors(trained, tmp_path, capsys):
    base = [*DATA, *QUIET, *MODEL]
    line = _cli_error(
        ["alpha_search", *base, f"--checkpoint={trained['sparse']}", "--alphas=[0, -0.1]"], capsys
    )
    assert "alpha" in line and "-0.1" in line
    line = _cli_error(["evaluate", *base, f"--checkpoint={trained['sparse']}", "--threat.eps=0"], capsys)
    assert "eps" in line
    # a plain trained model (no operators) given to alpha_search
    line = _cli_error(["alpha_search", *base, f"--checkpoint={trained['best']}"], capsys)
    assert "not a meansparse_pl checkpoint" in line and "postprocess" in line
    # sparsified but never calibrated
    module = AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True)
    uncalibrated = tmp_path / "uncalibrated.pt"
    save_checkpoint(sparsify(module.model, (1, 28, 28)), uncalibrated, architecture=module.architecture())
    line = _cli_error(["alpha_search", *base, f"--checkpoint={uncalibrated}"], capsys)
    assert "uncalibrated" in line and "postprocess" in line
    line = _cli_error(["evaluate", *base, f"--checkpoint={tmp_path}/missing.pt"], capsys)
    assert "no checkpoint file" in line
    line = _cli_error(
        ["postprocess", *base, f"--data.data_dir={tmp_path}/nowhere", f"--output={tmp_path}/x.pt"], capsys
    )
    assert "needs trained weights and got no --weights" in line and "--allow_untrained" in line
    line = _cli_error(
        ["postprocess", *base, f"--data.data_dir={tmp_path}/nowhere", f"--output={tmp_path}/x.pt"]
        + ["--allow_untrained=true"],
        capsys,
    )
    assert "nowhere" in line


def test_no_traceback_from_the_real_command_line(trained):
    done = subprocess.run(
        [sys.executable, "cli.py", "alpha_search", *DATA, *QUIET, f"--checkpoint={trained['best']}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error:")


def test_postprocess_any_module_by_class_path_and_plain_weights(tmp_path):
    from meansparse_pl.models.small_cnn import SmallCNN

    torch.manual_seed(1)
    network = SmallCNN(channels=(4, 8), hidden=16).eval()
    torch.save(network.state_dict(), tmp_path / "weights.pt")
    output = tmp_path / "post.pt"
    main(
        [
            "postprocess",
            *DATA,
            *QUIET,
            "--network=meansparse_pl.models.small_cnn.SmallCNN",
            "--network.channels=[4, 8]",
            "--network.hidden=16",
            f"--checkpoint={tmp_path / 'weights.pt'}",
            f"--output={output}",
            "--trainer.limit_predict_batches=2",  # 1 would parse as 1.0 = 100% (Lightning convention)
        ]
    )
    # the file records no architecture (an arbitrary class is never imported from a checkpoint): pass a model
    sparse = load_checkpoint(output, SmallCNN(channels=(4, 8), hidden=16)).eval()
    images = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(sparse(images), network(images))  # alpha 0: bit-identical to the given weights
    reference = sparsify(network, (1, 28, 28))
    calibrate(reference, _datamodule().calibration_dataloader(), limit_batches=2, progress=False)
    for a, b in zip(operators(sparse), operators(reference), strict=True):
        torch.testing.assert_close(a.mean, b.mean, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "config", sorted((ROOT / "configs" / "imagenet").glob("*.yaml")), ids=lambda p: p.name
)
def test_imagenet_statistics_configs_parse(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["postprocess", "--config", str(config), "--print_config"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "strategy: ddp" in printed and "precision: 32-true" in printed


class _PublishedSmallCNN(torch.nn.Module):
    """The SmallCNN with a published-style MeanSparse module (the released models' buffer layout) before each of
    its activations, as the released models carry them."""

    def __init__(self, base: torch.nn.Module) -> None:
        super().__init__()
        from test_published import PublishedMeanSparse

        self.base = base
        self.ms1, self.ms2 = PublishedMeanSparse(8), PublishedMeanSparse(16)
        self.ms3 = PublishedMeanSparse(32)
        self.ms3.forward = lambda x: (
            x
        )  # the fc feature: the published class reduces over (0, 2, 3); an identity here
        for ms in (self.ms1, self.ms2, self.ms3):
            ms.running_var.fill_(1.0)
            ms.batch_num.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base.backbone
        out = b.pool1(b.act1(self.ms1(b.bn1(b.conv1(self.base.normalize(x))))))
        out = b.pool2(b.act2(self.ms2(b.bn2(b.conv2(out)))))
        return b.fc2(b.act3(self.ms3(b.fc1(torch.flatten(out, 1)))))


def test_one_placement_config_gives_the_same_sites_through_all_four_entry_points(trained, tmp_path):
    """sparsify, the callback (its public step, without a Trainer), `cli.py postprocess` and convert_published
    all take the same PlacementConfig and place the same sites."""
    import typing

    from meansparse_pl import MeanSparseCallback, PlacementConfig, convert_published, placement_of
    from meansparse_pl.trainer import MeanSparseTrainer

    for entry, parameter in (
        (sparsify, "config"),
        (convert_published, "config"),
        (MeanSparseCallback.__init__, "placement"),
        (MeanSparseTrainer.postprocess, "placement"),
    ):
        hint = typing.get_type_hints(entry)[parameter]
        assert PlacementConfig in (hint, *typing.get_args(hint)), entry

    config = PlacementConfig(sites=[0, 2], centre="zero")

    def fresh():
        return AdversarialClassifier.load_from_checkpoint(trained["best"], weights_only=True).model.eval()

    def summary(model):
        return [
            (s.index, s.channel_dim, s.num_channels, tuple(s.input_shape)) for s in placement_of(model).sites
        ]

    x = _datamodule().calibration_dataloader().dataset[0][0][None]
    direct = sparsify(fresh(), x, config)
    expected = summary(direct)
    assert [s[0] for s in expected] == [0, 2] and all(op.centre == "zero" for op in operators(direct))
    via_callback = MeanSparseCallback(placement=config).sparsify(
        fresh(), _datamodule().calibration_dataloader()
    )
    assert summary(via_callback) == expected
    output = tmp_path / "post.pt"
    main(["postprocess", *DATA, *QUIET, *MODEL, f"--checkpoint={trained['best']}", f"--output={output}",
          "--placement.sites=[0, 2]", "--placement.centre=zero", "--trainer.limit_predict_batches=1"])  # fmt: skip
    via_cli = load_checkpoint(output)
    assert summary(via_cli) == expected and all(op.centre == "zero" for op in operators(via_cli))
    converted = convert_published(_PublishedSmallCNN(fresh()), x, config)
    assert summary(converted) == expected and all(op.centre == "zero" for op in operators(converted))
    assert [s.kind for s in placement_of(converted).sites] == ["published", "published"]


def test_sigterm_stops_evaluate_within_one_attack_and_the_resumed_report_is_byte_identical(trained, tmp_path):
    """A real CLI subprocess gets SIGTERM right after its first attack is saved: it stops at the next attack,
    says how to resume, exits 128 + 15; the same command then finishes, and its report equals an uninterrupted
    run's byte for byte."""
    import signal
    import time

    command = [
        sys.executable, str(ROOT / "cli.py"), "evaluate", *DATA, *QUIET, *MODEL,
        f"--checkpoint={trained['sparse']}", "--alpha=0.3", "--attacks.names=[clean, apgd-ce, bpda-apgd-ce]",
        "--attacks.n_iter=20", "--limit_samples=64", "--batch_size=8",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    reference = subprocess.run(
        [*command, f"--output_dir={tmp_path / 'whole'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert reference.returncode == 0, reference.stderr[-2000:]
    interrupted = [*command, f"--output_dir={tmp_path / 'stopped'}"]
    state = tmp_path / "stopped" / "evaluation.state.rank0"
    process = subprocess.Popen(interrupted, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not state.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    assert (
        last.startswith("stopped: the evaluation stopped on SIGTERM") and "run the same command again" in last
    )
    saved = torch.load(state, weights_only=True)["results"]
    finished = sum(len(per_sample) for per_sample in saved.values()) // 8  # attack-batches done
    assert 1 <= finished < 2 * 3 * 8  # 2 models x 3 attacks x 8 batches: it stopped early
    resumed = subprocess.run(interrupted, cwd=tmp_path, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    for name in ("evaluation.md", "evaluation.json"):
        assert (tmp_path / "stopped" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_fit_with_both_callbacks_trains_sparsifies_calibrates_and_chooses_alpha(tmp_path):
    """`cli.py fit` alone: the MeanSparseCallback sparsifies and calibrates at fit end, the AlphaSearchCallback
    after it chooses alpha on the held-out split; the checkpoint's alpha is the search's choice, the reports are
    written and the search's numbers reach the CSV logger."""
    import csv

    out = tmp_path / "fit"
    main(
        [
            "fit",
            *DATA,
            *MODEL,
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={out}",
            "--model.attack_steps=1",
            "--model.val_attack_steps=1",
            "--trainer.max_epochs=1",
            "--trainer.limit_train_batches=2",
            f"--trainer.default_root_dir={out}",
            "--trainer.accelerator=cpu",
            "--trainer.callbacks+=meansparse_pl.callback.MeanSparseCallback",
            "--trainer.callbacks+=meansparse_pl.callback.AlphaSearchCallback",
            "--trainer.callbacks.alphas=[0, 0.3, 2.0]",
            "--trainer.callbacks.threat.eps=0.1",
            "--trainer.callbacks.attacks.n_iter=2",
            "--trainer.callbacks.limit_samples=32",
            "--trainer.callbacks.batch_size=32",
            "--trainer.callbacks.max_clean_drop=100",
        ]
    )
    result = json.loads((out / "alpha_search" / "alpha_search.json").read_text())
    assert get_alpha(load_checkpoint(out / "meansparse.pt")) == pytest.approx(result["suggestion"])
    payload = torch.load(out / "meansparse.pt", weights_only=True)
    assert payload["metadata"]["alpha_search"]["suggestion"] == result["suggestion"]
    assert payload["metadata"]["calibration"]["images"] == 256
    (metrics,) = out.rglob("metrics.csv")
    with open(metrics) as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("alpha_search/alpha")]
    assert sorted(float(r["alpha_search/alpha"]) for r in rows) == [0.0, 0.3, 2.0]


def test_an_alpha_search_callback_without_a_meansparse_callback_before_it_is_refused(tmp_path, capsys):
    args = ["fit", *DATA, *QUIET, *MODEL, "--trainer.max_epochs=1", f"--trainer.default_root_dir={tmp_path}",
            "--trainer.callbacks+=meansparse_pl.callback.AlphaSearchCallback"]  # fmt: skip
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "list a MeanSparseCallback before it" in capsys.readouterr().err.strip().splitlines()[-1]


def test_per_operator_alphas_round_trip_and_evaluate(trained, tmp_path):
    from meansparse_pl import alphas_of, describe, run_attack, set_alpha

    sparse = load_checkpoint(trained["sparse"])
    set_alpha(sparse, [0.2, 0.6, 0.0])
    path = tmp_path / "mixed.pt"
    save_checkpoint(
        sparse,
        path,
        architecture=torch.load(trained["sparse"], weights_only=True)["meansparse"]["architecture"],
    )
    again = load_checkpoint(path)
    assert alphas_of(again) == pytest.approx([0.2, 0.6, 0.0])
    assert torch.load(path, weights_only=True)["meansparse"]["alpha"] is None  # no single alpha to record
    table = describe(again)
    assert "| 0.2 |" in table and "| 0.6 |" in table
    main(["evaluate", *DATA, *QUIET, *MODEL, f"--checkpoint={path}", "--attacks.names=[clean, apgd-ce]",
          "--attacks.n_iter=2", "--threat.eps=0.1", "--limit_samples=32", "--batch_size=32",
          f"--output_dir={tmp_path / 'ev'}"])  # fmt: skip
    report = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert report["operator_alphas"] == pytest.approx([0.2, 0.6, 0.0])
    by_name = {r["name"]: r for r in report["results"]}
    assert by_name["meansparse"]["alpha"] is None and by_name["base"]["alpha"] == 0.0
    assert "meansparse (alpha=per operator)" in (tmp_path / "ev" / "evaluation.md").read_text()
    dataset = _datamodule().test_dataloader().dataset
    images = torch.stack([dataset[i][0] for i in range(32)])
    labels = torch.stack([torch.as_tensor(dataset[i][1]) for i in range(32)])
    expected = run_attack("apgd-ce", again, images, labels, eps=0.1, seed=0, n_iter=2)
    assert by_name["meansparse"]["accuracy"]["apgd-ce"] == pytest.approx(
        100.0 * expected.float().mean().item()
    )
