"""The search for a MeanSparse that survives adaptive attack, measured against an equal-budget control.

For each architecture (the demo's ReLU ``small_cnn`` and the same network with SiLU), on real Fashion-MNIST, Linf
eps 0.1, every step through ``cli.py`` exactly as a user runs it (outputs under ``--out``; a step whose output
exists is skipped, so an interrupted run continues):

1. ``fit`` the base model (configs/fashion_mnist_demo.yaml; the MeanSparseCallback sparsifies and calibrates it);
2. ``alpha_search`` the global alpha (post-hoc MeanSparse, the paper's method);
3. ``alpha_search --schedule=PerSite`` on a copy: one alpha per operator by coordinate ascent;
4. ``fit`` the MeanSparse-aware fine-tuning (configs/fashion_mnist_finetune.yaml: PGD through the
   straight-through backward, operators at alpha 0.25) and its equal-budget control (the same file plus
   configs/fashion_mnist_finetune_control.yaml: the same weights, steps, attack and data, operators off);
5. ``alpha_search`` for the fine-tuned model, and for the control (post-hoc MeanSparse on the control: its
   held-out table is kept; it is left out of the comparison, whose every model costs about 25 minutes here);
6. ``compare`` (configs/fashion_mnist_compare.yaml) on ``--samples`` test images: clean, APGD-CE and
   BPDA-APGD-CE in full, then the cascade surrogate-APGD-CE, transfer-base, APGD-DLR and AutoAttack's APGD-T,
   FAB-T and Square on the survivors; every model against the control, paired.

Then, on the ReLU model:

7. what the new adaptive attacks add to AutoAttack + BPDA, per alpha (``--alpha-samples`` test images);
8. the cascade against the same attacks run independently: wall-time ratio and per-sample verdicts compared
   (``--cascade-samples`` test images).

Everything is printed and written to ``<out>/moonshot.json``; benchmarks/README.md records a run.

    .venv/bin/python benchmarks/moonshot.py                      # the full run (hours on 2 CPU cores)
    .venv/bin/python benchmarks/moonshot.py --samples 300 --archs relu --alpha-samples 100 --cascade-samples 100
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import describe_machine

from meansparse_pl import load_checkpoint, set_alpha
from meansparse_pl.comparison import ModelComparison, compare_models
from meansparse_pl.config import AttackConfig, ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.evaluation import run_tasks
from meansparse_pl.robustness import RobustnessEvaluation

ROOT = Path(__file__).resolve().parent.parent
FMNIST = "/usr/share/datasets/fashion-mnist"
ARCHS = {
    "relu": "{activation: relu, channels: [16, 32], hidden: 64}",
    "silu": "{activation: silu, channels: [16, 32], hidden: 64}",
}
THREAT = ThreatModel("Linf", 0.1)
CASCADE = ["surrogate-apgd-ce", "transfer-base", "apgd-dlr", "apgd-t", "fab-t", "square"]
PER_SITE_CANDIDATES = "[0.0, 0.15, 0.25, 0.35, 0.5]"


def cli(*args: str) -> None:
    """One ``cli.py`` step as a user runs it; its output goes to our stdout."""
    command = [sys.executable, str(ROOT / "cli.py"), *args]
    print("$ " + " ".join(command[1:]), flush=True)
    started = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def pipeline(arch: str, folder: Path, samples: int) -> dict:
    """Steps 1-6 for one architecture; returns the comparison's JSON."""
    net = f"--model.backbone_kwargs={ARCHS[arch]}"
    base = folder / "base"
    if not (base / "meansparse.pt").exists():
        cli("fit", "--config", "configs/fashion_mnist_demo.yaml", net, f"--trainer.default_root_dir={base}",
            f"--trainer.logger.init_args.save_dir={base}", f"--trainer.callbacks.dirpath={base}/checkpoints",
            "--trainer.enable_progress_bar=false")  # fmt: skip
    search = ["alpha_search", "--config", "configs/fashion_mnist_alpha_search.yaml"]
    if not (folder / "alpha_search" / "alpha_search.json").exists():
        cli(*search, f"--checkpoint={base}/meansparse.pt", f"--output_dir={folder}/alpha_search",
            f"--trainer.default_root_dir={folder}/alpha_search")  # fmt: skip
    per_site = folder / "per_site.pt"
    if not (folder / "per_site" / "alpha_search.json").exists():
        shutil.copyfile(base / "meansparse.pt", per_site)
        cli(*search, f"--checkpoint={per_site}", "--schedule=PerSite", f"--schedule.candidates={PER_SITE_CANDIDATES}",
            f"--output_dir={folder}/per_site", f"--trainer.default_root_dir={folder}/per_site")  # fmt: skip
    tune = ["fit", "--config", "configs/fashion_mnist_finetune.yaml", net, f"--model.init_checkpoint={base}/meansparse.pt",
            "--trainer.enable_progress_bar=false"]  # fmt: skip
    for name, extra in (
        ("finetune", []),
        ("control", ["--config", "configs/fashion_mnist_finetune_control.yaml"]),
    ):
        if not (folder / name / "meansparse.pt").exists():
            cli(*tune[:3], *extra, *tune[3:], f"--trainer.default_root_dir={folder}/{name}")
        if not (folder / f"{name}_alpha_search" / "alpha_search.json").exists():
            shutil.copyfile(folder / name / "meansparse.pt", folder / f"{name}_searched.pt")
            cli(*search, f"--checkpoint={folder}/{name}_searched.pt", f"--output_dir={folder}/{name}_alpha_search",
                f"--trainer.default_root_dir={folder}/{name}_alpha_search")  # fmt: skip
    models = [
        ("base", base / "meansparse.pt", 0.0),
        ("control", folder / "control" / "meansparse.pt", 0.0),
        ("post-hoc MeanSparse", base / "meansparse.pt", None),
        ("per-site MeanSparse", per_site, None),
        ("fine-tuned MeanSparse", folder / "finetune_searched.pt", None),
    ]
    listing = ", ".join(
        f"{{label: '{label}', checkpoint: {path}" + ("" if alpha is None else f", alpha: {alpha}") + "}"
        for label, path, alpha in models
    )
    out = folder / "compare"
    if not (out / "comparison.json").exists():
        cli("compare", "--config", "configs/fashion_mnist_compare.yaml", f"--models=[{listing}]",
            f"--limit_samples={samples}", f"--output_dir={out}", f"--trainer.default_root_dir={out}")  # fmt: skip
    return json.loads((out / "comparison.json").read_text())


def test_samples(count: int):
    data = FashionMNISTDataModule(FMNIST, test_subset=count, eval_batch_size=500)
    data.setup("test")
    return data.test_dataloader().dataset


def attack_contributions(checkpoint: Path, alphas: list[float], samples: int, folder: Path) -> dict:
    """Step 7: best known with AutoAttack + BPDA-APGD-CE alone, and what surrogate and transfer add, per alpha."""
    path = folder / "contributions.json"
    if path.exists():
        return json.loads(path.read_text())
    model = load_checkpoint(checkpoint)
    models = {}
    for alpha in alphas:
        models[f"alpha={alpha:g}"] = copy.deepcopy(model)
        set_alpha(models[f"alpha={alpha:g}"], alpha)
    attacks = AttackConfig(
        names=["clean", "autoattack", "bpda-apgd-ce"], cascade=["surrogate-apgd-ce", "transfer-base"]
    )
    result = compare_models(
        models, test_samples(samples), control=f"alpha={alphas[0]:g}", attacks=attacks, threat=THREAT,
        batch_size=500, state_dir=folder,
    )  # fmt: skip
    rows = {}
    for label in result.labels:
        adds = result.first_breaks(label)
        best = result.accuracy(label, "best_known")
        rows[label] = {
            "clean": result.accuracy(label, "clean"),
            "autoattack + bpda": best + adds["surrogate-apgd-ce"] + adds["transfer-base"],
            "surrogate adds": adds["surrogate-apgd-ce"],
            "transfer adds": adds["transfer-base"],
            "best known": best,
        }
    path.write_text(json.dumps(rows, indent=2))
    return rows


def cascade_against_independent(checkpoint: Path, samples: int, folder: Path) -> dict:
    """Step 8: the same attacks in full and as a cascade; wall time and per-sample best-known verdicts."""
    path = folder / "cascade.json"
    if path.exists():
        return json.loads(path.read_text())
    model = load_checkpoint(checkpoint)
    dataset = test_samples(samples)
    attacks = ["apgd-ce", "bpda-apgd-ce", *CASCADE]
    timings, verdicts = {}, {}
    for mode, config in (
        ("independent", AttackConfig(names=["clean", *attacks])),
        ("cascade", AttackConfig(names=["clean"], cascade=attacks)),
    ):
        started = time.perf_counter()
        evaluation = RobustnessEvaluation(config, THREAT, diagnostics=None)
        results = run_tasks(model, dataset, evaluation.tasks([("m", None)]), batch_size=500)
        timings[mode] = time.perf_counter() - started
        verdicts[mode] = {i: all(r[i] for r in results.values()) for i in range(len(dataset))}
    agree = sum(verdicts["independent"][i] == verdicts["cascade"][i] for i in verdicts["cascade"])
    row = {
        "samples": samples,
        "independent_seconds": round(timings["independent"], 1),
        "cascade_seconds": round(timings["cascade"], 1),
        "time_ratio": round(timings["cascade"] / timings["independent"], 3),
        "best_known_independent": 100.0 * sum(verdicts["independent"].values()) / samples,
        "best_known_cascade": 100.0 * sum(verdicts["cascade"].values()) / samples,
        "verdicts_agree": agree,
    }
    path.write_text(json.dumps(row, indent=2))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", default="runs/moonshot")
    parser.add_argument("--archs", nargs="+", default=list(ARCHS), choices=list(ARCHS))
    parser.add_argument("--samples", type=int, default=2000, help="test images of the comparison")
    parser.add_argument("--alpha-samples", type=int, default=500, help="test images of step 7")
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.15, 0.25, 0.35, 0.5])
    parser.add_argument("--cascade-samples", type=int, default=500, help="test images of step 8")
    parser.add_argument("--studies-on", default="relu", choices=list(ARCHS), help="architecture of steps 7-8")
    parser.add_argument(
        "--no-studies", action="store_true", help="skip steps 7-8 (e.g. a second process runs them)"
    )
    args = parser.parse_args()
    out = (ROOT / args.out).resolve()
    print(describe_machine(), flush=True)
    # Merged into an earlier summary, so that architectures and studies may run in separate processes.
    summary_path = out / "moonshot.json"
    summary: dict = json.loads(summary_path.read_text()) if summary_path.exists() else {"archs": {}}
    summary.update(machine=describe_machine(), threat="Linf eps 0.1")
    for arch in args.archs:
        summary["archs"][arch] = pipeline(arch, out / arch, args.samples)
    if not args.no_studies:
        studied = out / args.studies_on
        summary["contributions"] = attack_contributions(
            studied / "base" / "meansparse.pt", args.alphas, args.alpha_samples, studied
        )
        summary["cascade"] = cascade_against_independent(
            studied / "base" / "meansparse.pt", args.cascade_samples, studied
        )
    if summary_path.exists():  # the other process may have added its part meanwhile
        earlier = json.loads(summary_path.read_text())
        summary["archs"] = {**earlier.get("archs", {}), **summary["archs"]}
        summary = {**earlier, **summary}
    summary_path.write_text(json.dumps(summary, indent=2))
    for arch, data in summary["archs"].items():
        print(f"\n## {arch}\n")
        print(ModelComparison.from_json(data).table())
    if "contributions" not in summary:
        print(f"\nwrote {summary_path}")
        return
    print("\n## What surrogate-APGD-CE and transfer-base add to AutoAttack + BPDA-APGD-CE (points)\n")
    print(
        "| alpha | clean | AA + BPDA | + surrogate | + transfer | best known |\n|---|---:|---:|---:|---:|---:|"
    )
    for label, row in summary["contributions"].items():
        print(f"| {label} | {row['clean']:.2f} | {row['autoattack + bpda']:.2f} | -{row['surrogate adds']:.2f} | "
              f"-{row['transfer adds']:.2f} | {row['best known']:.2f} |")  # fmt: skip
    c = summary["cascade"]
    print(f"\n## Cascade vs independent ({c['samples']} samples)\n\n{c['cascade_seconds']} s vs "
          f"{c['independent_seconds']} s: ratio {c['time_ratio']}; best known {c['best_known_cascade']:.2f} vs "
          f"{c['best_known_independent']:.2f}; per-sample verdicts agree on {c['verdicts_agree']} of {c['samples']}")  # fmt: skip
    print(f"\nwrote {summary_path}")


if __name__ == "__main__":
    main()
