"""Cost of choosing alpha: the search against independent evaluations, and successive halving against the
exhaustive search, on the Fashion-MNIST demo model.

Model: a sparsified, calibrated ``small_cnn`` given with ``--checkpoint`` (``meansparse_pl.checkpoint``
format), or, without one, trained here with PGD adversarial training for ``--train-epochs`` over
``--train-images`` images (a minute or two on two cores), sparsified and calibrated on ``--calibration-images``
training images. Held-out data: ``--held-out`` images drawn from the 5000-image validation split.

Measured (wall time, one process, 1 intra-op thread by default, see ``--threads``):

1. For each seed (held-out subset and attack seed): the exhaustive search and the successive-halving search
   on the same subset; whether they choose the same alpha, the wall-time ratio and the fraction of
   sample-alpha evaluations.
   ``regret``: the exhaustive search's worst-case accuracy of its own choice minus that of the halving
   choice (0 when they agree; a near-tie otherwise shows as a fraction of a point). A second exhaustive
   search on the same subset with other attack random starts shows whether the exhaustive choice itself is
   reproducible. Both selection rules (``highest``, ``smallest_within_error``) are read off the same runs.
   With ``--reference-samples N``: an exhaustive search on N held-out images (twice, two sets of random
   starts) is the reference; each schedule's choice on the small subsets is scored against its choice.
2. ``9 independent evaluations``: for each of the 9 paper alphas, re-calibrate the statistics and evaluate
   that alpha (clean + the three search attacks) — what a sweep that treats each alpha as a separate model
   costs; against ``one calibration + the search`` (statistics once, per alpha only the evaluation; the
   search is the first exhaustive search of 1, same subset and seeds).

    .venv/bin/python benchmarks/alpha_search_cost.py                       # trains the demo model first
    .venv/bin/python benchmarks/alpha_search_cost.py --checkpoint runs/x/sparse.pt --seeds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from common import describe_machine, machine, write_json
from torch import nn
from torch.utils.data import DataLoader, Subset

from meansparse_pl import calibrate, sparsify
from meansparse_pl.alpha_search import (
    ELIMINATIONS,
    PAPER_ALPHAS,
    SEARCH_ATTACKS,
    SELECTIONS,
    AlphaSearch,
    AlphaSearchResult,
    Exhaustive,
    SuccessiveHalving,
)
from meansparse_pl.attacks import pgd_perturb
from meansparse_pl.config import AttackConfig, ThreatModel
from meansparse_pl.data import FashionMNISTDataModule
from meansparse_pl.evaluation import run_tasks
from meansparse_pl.models import create_model
from meansparse_pl.modes import eval_mode

REPEAT_SEED_OFFSET = 1000  # attack seed of the second exhaustive search on the same subset


def choice(found: AlphaSearchResult, selection: str) -> float:
    """The alpha a search result gives under a selection rule (the rules need no new evaluation)."""
    return dataclasses.replace(found, selection=selection).suggestion()


def quiet_trainer() -> pl.Trainer:
    """The evaluation Trainer of ``evaluation.single_device_trainer`` on the CPU, without the progress bar."""
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        inference_mode=False,
        enable_model_summary=False,
        enable_progress_bar=False,
    )


def train_demo_model(dm: FashionMNISTDataModule, args: argparse.Namespace) -> nn.Module:
    """small_cnn, PGD adversarial training (Madry et al.) with SGD, as in configs/ for the demo."""
    torch.manual_seed(args.seed)
    model = create_model("small_cnn", num_classes=10, in_channels=1, normalization=dm.normalization)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = dm.train_dataloader()
    start = time.perf_counter()
    for epoch in range(args.train_epochs):
        for x, y in loader:
            with eval_mode(model):
                x_adv = pgd_perturb(model, x, y, eps=args.eps, step_size=args.eps / 4, steps=args.train_steps)
            model.train()
            loss = F.cross_entropy(model(x_adv), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        print(f"  epoch {epoch}: last batch adversarial loss {loss.item():.3f}", flush=True)
    print(f"  trained in {time.perf_counter() - start:.0f} s")
    return model.eval()


def load_or_train(dm: FashionMNISTDataModule, args: argparse.Namespace) -> tuple[nn.Module, float]:
    if args.checkpoint:
        from meansparse_pl.checkpoint import load_checkpoint

        return load_checkpoint(args.checkpoint).eval(), float("nan")
    base = train_demo_model(dm, args)
    sparse = sparsify(base, torch.zeros(2, *dm.input_shape))
    start = time.perf_counter()
    calibrate(sparse, dm.calibration_dataloader(), progress=False)
    seconds = time.perf_counter() - start
    if args.save_checkpoint:
        from meansparse_pl.checkpoint import save_checkpoint

        architecture = {
            "name": "small_cnn",
            "kwargs": {"num_classes": 10, "in_channels": 1, "normalization": dm.normalization},
        }
        save_checkpoint(sparse, args.save_checkpoint, architecture=architecture)
        print(f"  saved the sparsified, calibrated model to {args.save_checkpoint}")
    return sparse.eval(), seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None, help="sparsified, calibrated small_cnn checkpoint")
    parser.add_argument(
        "--save-checkpoint", default=None, help="save the model trained here (for --checkpoint)"
    )
    parser.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--train-epochs", type=int, default=1)
    parser.add_argument("--train-steps", type=int, default=3, help="PGD steps during training")
    parser.add_argument("--calibration-images", type=int, default=5000)
    parser.add_argument("--held-out", type=int, default=256, help="held-out images per search")
    parser.add_argument("--eps", type=float, default=0.1, help="Linf radius (training and search)")
    parser.add_argument("--n-iter", type=int, default=5, help="APGD iterations in the search")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=16,
        help="evaluation batch size of both schedules; 16 divides every halving round on 256 images, so the "
        "finalists' numbers are exactly the exhaustive search's",
    )
    parser.add_argument("--seeds", type=int, default=3, help="subsets / attack seeds for the agreement")
    parser.add_argument(
        "--first-seed",
        type=int,
        default=0,
        help="first subset / attack seed (e.g. 20 to measure on subsets other than those a design was tuned on)",
    )
    parser.add_argument(
        "--nonzero-finalists", type=int, default=2, help="successive halving's non-zero finalists"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="intra-op threads; 1 by default: the attacks run many small ops, and on a loaded 2-core machine "
        "two OpenMP threads make them several times slower",
    )
    parser.add_argument(
        "--elimination",
        default="half",
        choices=ELIMINATIONS,
        help="successive halving's drop rule",
    )
    parser.add_argument("--skip-independent", action="store_true", help="skip the 9-evaluations comparison")
    parser.add_argument(
        "--reference-samples",
        type=int,
        default=0,
        help="also run an exhaustive search on this many held-out images (twice) and score both schedules "
        "against its choice",
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    print(f"machine: {describe_machine()}")
    dm = FashionMNISTDataModule(
        data_dir=args.data_dir,
        batch_size=args.batch_size,
        train_subset=args.train_images,
        calibration_subset=args.calibration_images,
        seed=args.seed,
    )
    dm.setup()
    model, calibration_s = load_or_train(dm, args)
    pool = dm.val_dataset
    assert pool is not None
    trainer = quiet_trainer()
    common = {
        "threat": ThreatModel("Linf", args.eps),
        "attacks": AttackConfig(names=list(SEARCH_ATTACKS), n_iter=args.n_iter),
        "batch_size": args.batch_size,
    }
    result: dict = {"args": vars(args), "machine": machine()}

    def subset(seed: int) -> Subset:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(1000 + seed)).tolist()
        return Subset(pool, order[: args.held_out])

    # warm-up, untimed: compiles the fused kernels for every batch shape the searches below meet
    warm = Subset(pool, list(range(args.batch_size + 1)))
    AlphaSearch(
        alphas=[0.0, 0.25],
        threat=common["threat"],
        attacks=AttackConfig(names=list(SEARCH_ATTACKS), n_iter=1),
        batch_size=args.batch_size,
    ).run(model, warm, trainer=trainer)

    # 0. optional reference: an exhaustive search on many more samples, twice (two sets of random starts); its
    #    choice is what both schedules on small subsets try to find
    reference = None
    if args.reference_samples:
        order = torch.randperm(len(pool), generator=torch.Generator().manual_seed(999)).tolist()
        data = Subset(pool, order[: args.reference_samples])
        start = time.perf_counter()
        reference, reference_again = (
            AlphaSearch(alphas=PAPER_ALPHAS, seed=attack_seed, **common).run(model, data, trainer=trainer)
            for attack_seed in (0, REPEAT_SEED_OFFSET)
        )
        print(
            f"reference: exhaustive search on {len(data)} samples, twice, in {time.perf_counter() - start:.0f} s"
        )
        print(reference.table())
        result["reference"] = {
            "samples": len(data),
            "table": {f"{a:g}": reference.accuracy[a] for a in reference.alphas},
            "table_other_random_starts": {f"{a:g}": reference_again.accuracy[a] for a in reference.alphas},
        }
        for rule in SELECTIONS:
            picked = result["reference"][rule] = {
                "alpha": choice(reference, rule),
                "alpha_other_random_starts": choice(reference_again, rule),
            }
            print(
                f"reference choice, {rule}: {picked['alpha']:g} (other random starts: "
                f"{picked['alpha_other_random_starts']:g})"
            )

    # 1. successive halving vs exhaustive, per seed (alternating which runs first), plus a second exhaustive
    #    search on the same subset with other attack random starts: is the exhaustive choice reproducible?
    rows = []
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        data = subset(seed)
        timed: dict[str, tuple] = {}
        runs = [("exhaustive", seed), ("successive_halving", seed)][:: 1 if seed % 2 == 0 else -1]
        for schedule, attack_seed in [*runs, ("exhaustive", seed + REPEAT_SEED_OFFSET)]:
            start = time.perf_counter()
            plan = (
                SuccessiveHalving(nonzero_finalists=args.nonzero_finalists, elimination=args.elimination)
                if schedule == "successive_halving"
                else Exhaustive()
            )
            found = AlphaSearch(alphas=PAPER_ALPHAS, seed=attack_seed, schedule=plan, **common).run(
                model, data, trainer=trainer
            )
            key = schedule if attack_seed == seed else "exhaustive, other random starts"
            timed[key] = (found, time.perf_counter() - start)
        (exhaustive, exhaustive_s), (halving, halving_s) = timed["exhaustive"], timed["successive_halving"]
        repeat = timed["exhaustive, other random starts"][0]
        row = {
            "seed": seed,
            "exhaustive_s": exhaustive_s,
            "halving_s": halving_s,
            "time_ratio": halving_s / exhaustive_s,
            "evaluated_fraction": halving.evaluated_fraction,
            "rounds": halving.rounds,
            "exhaustive_table": {f"{a:g}": exhaustive.accuracy[a] for a in exhaustive.alphas},
        }
        for rule in SELECTIONS:
            chosen = {
                name: choice(found, rule)
                for name, found in (("e", exhaustive), ("h", halving), ("r", repeat))
            }
            row[rule] = {
                "exhaustive_alpha": chosen["e"],
                "halving_alpha": chosen["h"],
                "same": chosen["e"] == chosen["h"],
                # the exhaustive choice again with other attack random starts: its own reproducibility
                "repeat_alpha": chosen["r"],
                "reproducible": chosen["e"] == chosen["r"],
                # how much worse the halving choice is by the exhaustive search's own numbers (points)
                "regret": exhaustive.accuracy[chosen["e"]]["worst_case"]
                - exhaustive.accuracy[chosen["h"]]["worst_case"],
            }
            if reference is not None:
                # against the large-sample search: does each schedule find its alpha, and what does missing it
                # cost by the reference's own numbers (points)?
                best = result["reference"][rule]["alpha"]
                for name, key in (("exhaustive", "e"), ("halving", "h")):
                    row[rule][f"{name}_finds_reference"] = chosen[key] == best
                    row[rule][f"{name}_regret_vs_reference"] = (
                        reference.accuracy[best]["worst_case"] - reference.accuracy[chosen[key]]["worst_case"]
                    )
        rows.append(row)
        print(
            f"seed {seed}: exhaustive {exhaustive_s:.1f} s, successive halving {halving_s:.1f} s "
            f"({100 * row['evaluated_fraction']:.0f}% of the sample-alpha evaluations); rounds: "
            + "; ".join(f"{r['samples']} samples x {len(r['evaluated'])} alphas" for r in halving.rounds)
            + "; choices (exhaustive / halving / exhaustive again): "
            + ", ".join(
                f"{rule} {row[rule]['exhaustive_alpha']:g} / {row[rule]['halving_alpha']:g} / "
                f"{row[rule]['repeat_alpha']:g}"
                for rule in SELECTIONS
            ),
            flush=True,
        )
        if seed == args.first_seed:
            print(exhaustive.table())
    result["halving"] = rows
    # 2. one calibration + the search (the first exhaustive search above) vs 9 x (calibration + one alpha)
    if not args.skip_independent:
        data = subset(args.first_seed)
        search = AlphaSearch(alphas=PAPER_ALPHAS, seed=args.first_seed, **common)
        calibration_loader: DataLoader = dm.calibration_dataloader()
        start = time.perf_counter()
        calibrate(model, calibration_loader, progress=False)
        one_calibration = time.perf_counter() - start
        together = one_calibration + rows[0]["exhaustive_s"]
        start = time.perf_counter()
        for alpha in PAPER_ALPHAS:
            calibrate(model, calibration_loader, progress=False)
            run_tasks(
                model,
                data,
                search.tasks([alpha]),
                batch_size=args.batch_size,
                seed=args.first_seed,
                trainer=trainer,
            )
        independent = time.perf_counter() - start
        result["independent"] = {
            "calibration_s": one_calibration,
            "one_calibration_plus_search_s": together,
            "nine_independent_s": independent,
        }
        print(
            f"\none calibration ({one_calibration:.1f} s) + the 9-alpha search (seed {args.first_seed}): {together:.1f} s; "
            f"9 x (calibration + evaluation of one alpha): {independent:.1f} s; ratio {together / independent:.3f}"
        )

    for rule in SELECTIONS:
        print(
            f"\nselection rule {rule!r}:\n\n| seed | exhaustive alpha | halving alpha | same | regret (points) "
            "| exhaustive again | reproducible | exhaustive (s) | halving (s) | time ratio | evaluations |"
        )
        print("|---:|---:|---:|---|---:|---:|---|---:|---:|---:|---:|")
        for r in rows:
            c = r[rule]
            print(
                f"| {r['seed']} | {c['exhaustive_alpha']:g} | {c['halving_alpha']:g} | {'yes' if c['same'] else 'no'} "
                f"| {c['regret']:.2f} | {c['repeat_alpha']:g} | {'yes' if c['reproducible'] else 'no'} "
                f"| {r['exhaustive_s']:.1f} | {r['halving_s']:.1f} | {r['time_ratio']:.3f} "
                f"| {100 * r['evaluated_fraction']:.0f}% |"
            )
        same = sum(r[rule]["same"] for r in rows)
        reproducible = sum(r[rule]["reproducible"] for r in rows)
        print(
            f"\n{rule}: same choice in {same}/{len(rows)} seeds; the exhaustive choice reproduced with other "
            f"random starts in {reproducible}/{len(rows)}; successive halving / exhaustive wall time: median "
            f"{statistics.median(r['time_ratio'] for r in rows):.3f}; evaluations "
            f"{100 * statistics.median(r['evaluated_fraction'] for r in rows):.0f}% (target: same choice at <= 40%)"
        )
        if reference is not None:
            for name in ("exhaustive", "halving"):
                found = sum(r[rule][f"{name}_finds_reference"] for r in rows)
                regrets = [r[rule][f"{name}_regret_vs_reference"] for r in rows]
                print(
                    f"{rule}, {name} on {args.held_out} samples: finds the reference alpha "
                    f"{result['reference'][rule]['alpha']:g} in {found}/{len(rows)} seeds; regret on the reference's numbers: "
                    f"mean {statistics.mean(regrets):.2f}, max {max(regrets):.2f} points"
                )
    if calibration_s == calibration_s:  # not NaN
        print(f"(calibration on {args.calibration_images} images: {calibration_s:.1f} s)")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
