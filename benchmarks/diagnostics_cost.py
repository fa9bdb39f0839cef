"""What the attack-failure diagnostics add to an evaluation: the demo's evaluation and its diagnostics, side by
side in one run on the same model and images.

Cases, each timed on the demo's MeanSparse checkpoint (``bash scripts/demo.sh`` writes it) and its base model
(alpha 0), on the first N Fashion-MNIST test images, one process, the demo's settings:

* ``evaluation``: ``run_tasks`` with ``evaluate``'s attack list (clean, AutoAttack, APGD-CE, APGD-CE+DLR,
  BPDA-APGD-CE, surrogate-APGD-CE, transfer-base) for both variants, as ``cli.py evaluate`` runs it;
* ``diagnostics``: ``diagnose`` with the default ``DiagnosticsConfig`` (100-sample subset, every indicator,
  the expensive ones included) for both variants, plus the per-sample indicators on the evaluation's verdicts;
* ``diagnostics, cheap``: the same with ``expensive=False`` (no stronger and no large-eps attacks).

An evaluation takes minutes, so each case runs ``--repeats`` times (default 1) in rotating order (see
``common.py``), the evaluation first in the first repeat; the ratio to ``evaluation`` is what the issue's 15% budget is about.

    .venv/bin/python benchmarks/diagnostics_cost.py                              # 300 images, as the demo
    .venv/bin/python benchmarks/diagnostics_cost.py --images 100 --quick         # no AutoAttack: minutes less
"""

from __future__ import annotations

import argparse
import time

import torch
from common import describe_machine, interleaved, machine, summarize, table, write_json

from meansparse_pl import AttackConfig, ThreatModel, alphas_of, diagnose, load_checkpoint
from meansparse_pl.config import DiagnosticsConfig
from meansparse_pl.data import FashionMNISTDataModule, split_samples
from meansparse_pl.evaluation import run_tasks
from meansparse_pl.report import atomic_attacks
from meansparse_pl.robustness import RobustnessEvaluation, evaluated_variants, task_key
from meansparse_pl.trainer import EVALUATE_ATTACKS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="runs/fashion_mnist_demo/meansparse.pt")
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="leave AutoAttack out of the evaluation")
    parser.add_argument("--json", default=None, help="also write the numbers to this file")
    args = parser.parse_args()

    torch.set_num_threads(2)
    model = load_checkpoint(args.checkpoint).eval()
    datamodule = FashionMNISTDataModule(args.data_dir, eval_batch_size=500, seed=0)
    dataset = split_samples(datamodule, "test", args.images)
    threat = ThreatModel("Linf", 0.1)
    names = [a for a in EVALUATE_ATTACKS if not (args.quick and a == "autoattack")]
    attacks = AttackConfig(names=names)
    variants = evaluated_variants(model, None, True)
    tasks = RobustnessEvaluation(attacks, threat, diagnostics=None).tasks(list(variants.items()))
    verdicts: dict = {}

    def evaluation() -> None:
        per_sample = run_tasks(model, dataset, tasks, batch_size=500, seed=0)
        for variant in variants:
            verdicts[(variant, threat.eps)] = {
                a: per_sample[task_key(variant, threat.eps, a)] for a in atomic_attacks(names)
            }

    def diagnostics(expensive: bool) -> None:
        diagnose(
            model,
            dataset,
            threat=threat,
            attacks=attacks,
            config=DiagnosticsConfig(expensive=expensive),
            variants=variants,
            verdicts=verdicts,
        )

    # no untimed warm-up (an evaluation takes minutes); the first repeat runs the evaluation first, so the
    # per-sample indicators have its verdicts, as in cli.py evaluate
    times = interleaved(
        {
            "evaluation": evaluation,
            "diagnostics": lambda: diagnostics(True),
            "diagnostics, cheap": lambda: diagnostics(False),
        },
        repeats=args.repeats,
        warmup=0,
    )
    summary = summarize(times, baseline="evaluation")
    print(describe_machine())
    print(
        f"{args.images} Fashion-MNIST test images, alpha {alphas_of(model)[0]:g} and 0, attacks {', '.join(names)}"
    )
    print(table(summary, "diagnostics vs the evaluation they come with", unit_scale=1.0, unit="s"))
    write_json(args.json, {"machine": machine(), "images": args.images, "attacks": names, "summary": summary})


if __name__ == "__main__":
    started = time.perf_counter()
    main()
    print(f"benchmark wall time {time.perf_counter() - started:.0f} s")
