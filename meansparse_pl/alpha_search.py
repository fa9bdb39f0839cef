"""Choose the one shared alpha by a sweep over clean and robust accuracy on a held-out split.

Statistics are collected once; per alpha only the evaluation runs. Every alpha is measured with clean
accuracy, APGD-CE, APGD-DLR and APGD-CE through the straight-through backward (BPDA), and the per-sample
worst case over all of them. The default rule picks the alpha with the highest worst-case accuracy whose
clean accuracy is at most ``max_clean_drop`` points below alpha = 0: choosing by APGD-CE alone (the
paper's rule) rewards gradient masking, which BPDA exposes. With ``selection="smallest_within_error"`` the
choice is instead the smallest eligible alpha within one paired standard error of that best one.

Two schedules: ``exhaustive`` (every alpha on every held-out sample) and ``successive_halving``: every alpha
on a small subset, then the non-zero alphas halved round by round, the subset doubling, until
``nonzero_finalists`` (default 2) are left, which are evaluated with alpha 0 on the whole split. A halving
step keeps the leader first, then the smallest alphas within one paired standard error of it, then the rest
by rank (:meth:`AlphaSearch._elimination_order`); ``elimination="clearly_worse"`` instead drops only what the
paired evidence rules out. Alpha 0 stays in every round (it is the reference of the clean-accuracy drop and a
valid answer).

Both schedules visit the split in one seeded order (:meth:`AlphaSearch.sample_order`); the halving subsets
are prefixes of it, and every round evaluates only the samples new to it, with the attack seeds the
exhaustive search gives them. Where the rounds start on whole batches, the finalists' numbers are exactly the
exhaustive search's, so the two schedules can only disagree when the exhaustive winner was dropped early. A
round that starts inside a batch gets other random starts, and a warning says so.

Measured on the Fashion-MNIST demo model (benchmarks/README.md, "Choosing alpha"): alphas 0.15-0.3 form a
plateau 0.15 points wide on 2048 held-out images, so on 256 images the exhaustive choice among them is
decided by attack noise: with other random starts it repeated itself in only 4 of 10 subsets. On those 10
subsets (not used to design the halving step) successive halving chose the same alpha as the exhaustive
search in 6 of 10 (``highest``) and 7 of 10 (``smallest_within_error``, the one-standard-error rule) at 0.38x
its time; where it did not, it had dropped the exhaustive winner on 16 or 32 images (regret up to 1.56
points). Exhaustive stays the default: it is the reference, and what halving saves is paid for with the
chance of another point of the plateau.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, accuracy, run_tasks, worst_case
from meansparse_pl.operator import _require_operators, check_alpha

Criterion = Literal["worst_case", "apgd"]
Schedule = Literal["exhaustive", "successive_halving"]
SCHEDULES: tuple[str, ...] = ("exhaustive", "successive_halving")
Elimination = Literal["half", "clearly_worse"]
ELIMINATIONS: tuple[str, ...] = ("half", "clearly_worse")
Selection = Literal["highest", "smallest_within_error"]
SELECTIONS: tuple[str, ...] = ("highest", "smallest_within_error")
PAPER_ALPHAS: tuple[float, ...] = (0.0, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
SEARCH_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "bpda-apgd-ce")
GRADIENT_MASKING_GAP = 1.0  # points by which BPDA may beat exact-gradient APGD before we flag masking


def criterion_column(criterion: str) -> str:
    """The result column a criterion ranks by."""
    return "worst_case" if criterion == "worst_case" else "apgd-ce"


def check_alphas(alphas: Sequence[float]) -> list[float]:
    if not alphas:
        raise ConfigurationError("the alpha grid is empty; give e.g. alphas: [0, 0.15, 0.2, 0.25].")
    bad = [a for a in alphas if not (float(a) >= 0) or float(a) == float("inf")]
    if bad:
        raise ConfigurationError(
            f"alpha grid contains invalid values {bad}; every alpha must be finite and >= 0."
        )
    values = sorted({check_alpha(a) for a in alphas})
    if values[0] != 0.0:
        values.insert(0, 0.0)  # the base model is the reference for the clean-accuracy drop
    return values


@dataclass
class AlphaSearchResult:
    """Accuracies (percent) per alpha and attack, the rule that picked alpha, and flags worth a look."""

    alphas: list[float]
    attacks: list[str]
    accuracy: dict[float, dict[str, float]]  # alpha -> column -> accuracy
    criterion: str
    max_clean_drop: float
    eps: float
    norm: str
    num_samples: int
    flags: list[str] = field(default_factory=list)
    schedule: str = "exhaustive"
    # alpha -> held-out samples it was evaluated on; empty means every alpha saw all num_samples
    samples_per_alpha: dict[float, int] = field(default_factory=dict)
    # successive halving: per round, the samples, the alphas evaluated and the alphas kept
    rounds: list[dict[str, Any]] = field(default_factory=list)
    selection: str = "highest"
    # alpha -> {sample -> correct under the criterion}: the paired evidence "smallest_within_error" needs
    criterion_per_sample: dict[float, dict[int, bool]] = field(default_factory=dict, repr=False)

    def samples(self, alpha: float) -> int:
        return self.samples_per_alpha.get(alpha, self.num_samples)

    @property
    def finalists(self) -> list[float]:
        """The alphas measured on all ``num_samples`` samples: the only ones the rule chooses among."""
        return [a for a in self.alphas if self.samples(a) == self.num_samples]

    @property
    def evaluated_fraction(self) -> float:
        """Sample-alpha evaluations done, as a fraction of an exhaustive search's ``len(alphas) * num_samples``."""
        done = sum(self.samples(a) for a in self.alphas)
        return done / max(len(self.alphas) * self.num_samples, 1)

    @property
    def columns(self) -> list[str]:
        present = self.accuracy[self.alphas[0]]
        return [c for c in ["clean", *self.attacks, "apgd-ce+dlr", "worst_case"] if c in present]

    def rule(self) -> str:
        target = (
            "worst-case robust accuracy (per sample, over all attacks)"
            if self.criterion == "worst_case"
            else ("APGD-CE accuracy (the paper's rule)")
        )
        eligible = (
            f"among alphas whose clean accuracy is at most {self.max_clean_drop:g} points below alpha = 0"
        )
        if self.selection == "smallest_within_error":
            return (
                f"smallest alpha whose {target} is within one paired standard error of the highest, {eligible} "
                "(one-standard-error rule)"
            )
        return f"highest {target} {eligible}; ties go to the smaller alpha"

    def eligible(self) -> list[float]:
        """The finalists whose clean accuracy is within ``max_clean_drop`` points of alpha = 0 (0 included)."""
        base_clean = self.accuracy[0.0]["clean"]
        return [
            a for a in self.finalists if self.accuracy[a]["clean"] >= base_clean - self.max_clean_drop - 1e-9
        ]

    def best_eligible(self) -> float:
        """The eligible alpha with the highest criterion accuracy; ties go to the smaller alpha."""
        column = criterion_column(self.criterion)
        return max(self.eligible(), key=lambda a: (self.accuracy[a][column], -a))

    def suggestion(self) -> float:
        eligible = self.eligible()
        best = self.best_eligible()
        if self.selection == "highest":
            return best
        for alpha in sorted(eligible):  # the smallest alpha that the evidence does not tell from the best
            gap, error = self.gap_to(best, alpha)
            if gap <= error + 1e-9:
                return alpha
        return best  # unreachable: the best is within zero errors of itself

    def gap_to(self, best: float, alpha: float) -> tuple[float, float]:
        """Criterion accuracy of ``best`` minus that of ``alpha`` and its paired standard error (points)."""
        if best not in self.criterion_per_sample or alpha not in self.criterion_per_sample:
            raise ConfigurationError(
                "the 'smallest_within_error' rule needs the per-sample results of the search; run the search "
                "again, or use selection 'highest'."
            )
        return paired_gap(self.criterion_per_sample[best], self.criterion_per_sample[alpha])

    def table(self) -> str:
        chosen = self.suggestion()
        partial = self.schedule != "exhaustive"
        extra = ["samples"] if partial else []
        header = "| alpha | " + " | ".join(self.columns + extra) + " |"
        lines = [header, "|" + "---:|" * (len(self.columns) + len(extra) + 1)]
        for a in self.alphas:
            mark = " **(chosen)**" if a == chosen else ""
            cells = " | ".join(f"{self.accuracy[a][c]:.2f}" for c in self.columns)
            if partial:
                cells += f" | {self.samples(a)}"
            lines.append(f"| {a:g}{mark} | {cells} |")
        notes = [
            "",
            f"{self.num_samples} held-out samples, {self.norm} eps = {self.eps:g}; accuracies in percent.",
            f"Rule: {self.rule()}. Chosen alpha: {chosen:g}.",
        ]
        if partial:
            notes.append(
                f"Successive halving: alphas dropped early were measured on fewer samples (column 'samples'); "
                f"the rule chose among the finalists {', '.join(f'{a:g}' for a in self.finalists)}; "
                f"{100 * self.evaluated_fraction:.0f}% of the sample-alpha evaluations of an exhaustive search."
            )
        if self.selection == "smallest_within_error" and chosen != self.best_eligible():
            gap, error = self.gap_to(self.best_eligible(), chosen)
            notes.append(
                f"The highest is alpha {self.best_eligible():g}; alpha {chosen:g} is {gap:.2f} points below it, "
                f"within one paired standard error ({error:.2f} points)."
            )
        notes += [f"WARNING: {flag}" for flag in self.flags]
        return "\n".join(lines + notes)

    def to_json(self) -> dict[str, Any]:
        return {
            "alphas": self.alphas,
            "attacks": self.attacks,
            "accuracy": {f"{a:g}": self.accuracy[a] for a in self.alphas},
            "criterion": self.criterion,
            "rule": self.rule(),
            "max_clean_drop": self.max_clean_drop,
            "eps": self.eps,
            "norm": self.norm,
            "num_samples": self.num_samples,
            "suggestion": self.suggestion(),
            "flags": self.flags,
            "schedule": self.schedule,
            "samples_per_alpha": {f"{a:g}": self.samples(a) for a in self.alphas},
            "evaluated_fraction": self.evaluated_fraction,
            "rounds": self.rounds,
            "selection": self.selection,
            "highest_eligible": self.best_eligible(),
        }

    def plot(self, path: str | os.PathLike) -> str:
        """PNG: clean and robust accuracy against alpha, one line per attack, the chosen alpha marked."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from meansparse_pl.io import atomic_write

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for column in self.columns:
            style = "-" if column in ("clean", "worst_case") else "--"
            ax.plot(
                self.alphas, [self.accuracy[a][column] for a in self.alphas], style, marker="o", label=column
            )
        ax.axvline(
            self.suggestion(), color="grey", linestyle=":", label=f"chosen alpha {self.suggestion():g}"
        )
        ax.set_xlabel("alpha (band half-width in channel standard deviations)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title(f"MeanSparse alpha search ({self.norm}, eps={self.eps:g}, n={self.num_samples})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120))
        plt.close(fig)
        return str(path)


def _paired_comparison(a: dict[int, bool], b: dict[int, bool]) -> tuple[float, int, int]:
    """Accuracy of ``a`` minus that of ``b`` (points), the samples on which they disagree, the samples."""
    return accuracy(a) - accuracy(b), sum(a[i] != b[i] for i in a), len(a)


def paired_gap(a: dict[int, bool], b: dict[int, bool]) -> tuple[float, float]:
    """Accuracy of ``a`` minus that of ``b`` and the difference's standard error, in points.

    Paired over the same samples: two alphas that differ on ``d`` of ``n`` samples have an accuracy difference
    with a standard error of about ``100 * sqrt(d) / n`` points (McNemar's test statistic).
    """
    gap, discordant, n = _paired_comparison(a, b)
    return gap, 100.0 * math.sqrt(discordant) / max(n, 1)


class AlphaSearch:
    """Sweep alpha on a held-out split and suggest one (Lightning ``LearningRateFinder`` in spirit).

    Args:
        alphas: grid to evaluate (paper: 0, 0.15, ..., 0.5); 0 is added when missing.
        eps / norm: threat model of the attacks.
        attacks: robust columns; default APGD-CE, APGD-DLR and BPDA-APGD-CE.
        n_iter: APGD iterations (100 in AutoAttack; fewer for quick searches).
        max_clean_drop: clean-accuracy points an alpha may lose against alpha = 0 to be eligible.
        criterion: ``worst_case`` (default) or ``apgd`` (the paper's rule, for comparison).
        seed, batch_size: attack seed and batch size.
        schedule: ``exhaustive`` (default: every alpha on every sample) or ``successive_halving`` (see the
            module docstring and :meth:`round_sizes`).
        halving_rounds: successive halving only: how many times the non-zero alphas are halved before the
            final round on the whole split; default ``ceil(log2(number of non-zero alphas))``, which leaves
            one non-zero finalist next to alpha 0.
        min_samples: successive halving only: samples of the first round; default the split size divided by
            ``2 ** halving_rounds`` (rounded down to whole batches when that is at least one batch). Round
            ``r`` then uses ``min_samples * 2 ** r`` samples and the last round all of them.
        elimination: successive halving only: ``half`` drops the worse half of the non-zero alphas after
            every round; ``clearly_worse`` drops only the alphas whose criterion is below the round's leader by
            more than ``confidence`` paired standard errors, or whose clean drop exceeds ``max_clean_drop`` by
            more than that (it saves less where the alphas are within noise of each other, and never drops
            an alpha the evidence does not rule out).
        confidence: standard errors for ``clearly_worse`` (default 2).
        nonzero_finalists: successive halving only: the non-zero alphas that reach the final round on the
            whole split (default 2). Halving never keeps fewer: on a plateau of near-equal alphas the final
            round, where the numbers are those of the exhaustive search, then still has a choice to make.
        selection: how the final choice is made among the eligible alphas: ``highest`` (default: the highest
            criterion accuracy, the paper's way) or ``smallest_within_error`` (the smallest alpha whose
            criterion accuracy is within one paired standard error of the highest, the one-standard-error
            rule of model selection: a larger alpha costs clean accuracy and masks more gradient, so it has to
            be measurably better; the choice then moves less with the attacks' random starts).
    """

    def __init__(
        self,
        alphas: Sequence[float] = PAPER_ALPHAS,
        eps: float = 8 / 255,
        norm: Literal["Linf", "L2"] = "Linf",
        attacks: Sequence[str] = SEARCH_ATTACKS,
        n_iter: int = 100,
        max_clean_drop: float = 0.5,
        criterion: Criterion = "worst_case",
        seed: int = 0,
        batch_size: int = 128,
        schedule: Schedule = "exhaustive",
        halving_rounds: int | None = None,
        min_samples: int | None = None,
        elimination: Elimination = "half",
        confidence: float = 2.0,
        selection: Selection = "highest",
        nonzero_finalists: int = 2,
    ) -> None:
        if criterion not in ("worst_case", "apgd"):
            raise ConfigurationError(f"criterion must be 'worst_case' or 'apgd', got {criterion!r}.")
        if not eps > 0:
            raise ConfigurationError(f"eps must be > 0, got {eps}; e.g. eps: 0.0313725 (8/255).")
        if max_clean_drop < 0:
            raise ConfigurationError(f"max_clean_drop must be >= 0 points, got {max_clean_drop}.")
        if n_iter < 1:
            raise ConfigurationError(f"n_iter must be >= 1, got {n_iter}.")
        if "apgd-ce" not in attacks and criterion == "apgd":
            raise ConfigurationError("criterion 'apgd' needs 'apgd-ce' among the attacks.")
        if schedule not in SCHEDULES:
            raise ConfigurationError(f"schedule must be one of {SCHEDULES}, got {schedule!r}.")
        if halving_rounds is not None and halving_rounds < 0:
            raise ConfigurationError(f"halving_rounds must be >= 0 or None, got {halving_rounds}.")
        if min_samples is not None and min_samples < 1:
            raise ConfigurationError(f"min_samples must be >= 1 or None, got {min_samples}.")
        if batch_size < 1:
            raise ConfigurationError(f"batch_size must be >= 1, got {batch_size}.")
        if elimination not in ELIMINATIONS:
            raise ConfigurationError(f"elimination must be one of {ELIMINATIONS}, got {elimination!r}.")
        if not confidence >= 0:
            raise ConfigurationError(f"confidence must be >= 0 standard errors, got {confidence}.")
        if selection not in SELECTIONS:
            raise ConfigurationError(f"selection must be one of {SELECTIONS}, got {selection!r}.")
        if nonzero_finalists < 1:
            raise ConfigurationError(f"nonzero_finalists must be >= 1, got {nonzero_finalists}.")
        self.alphas = check_alphas(alphas)
        self.eps = float(eps)
        self.norm = norm
        self.attacks = list(attacks)
        self.n_iter = n_iter
        self.max_clean_drop = float(max_clean_drop)
        self.criterion = criterion
        self.seed = seed
        self.batch_size = batch_size
        self.schedule = schedule
        self.halving_rounds = halving_rounds
        self.min_samples = min_samples
        self.elimination = elimination
        self.confidence = float(confidence)
        self.selection = selection
        self.nonzero_finalists = nonzero_finalists

    def tasks(self, alphas: Sequence[float] | None = None) -> list[EvaluationTask]:
        tasks = []
        for alpha in self.alphas if alphas is None else alphas:
            for attack in ["clean", *self.attacks]:
                options = {} if attack == "clean" else {"n_iter": self.n_iter}
                tasks.append(
                    EvaluationTask(f"alpha={alpha:g}/{attack}", attack, self.eps, self.norm, options, alpha)
                )
        return tasks

    # ------------------------------------------------------------------------------------- evaluation
    def sample_order(self, num_samples: int) -> list[int]:
        """The seeded order in which both schedules visit the held-out split.

        Successive halving needs it (its rounds are prefixes, and a split sorted by class would give biased
        ones); the exhaustive search uses it too, so that every sample meets the same batch, attack seed and
        random start under either schedule and the finalists of a halving run are scored with exactly the
        exhaustive search's numbers.
        """
        return torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def run(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        trainer: pl.Trainer | None = None,
        state_path: str | os.PathLike | None = None,
    ) -> AlphaSearchResult:
        """Evaluate the alphas on ``dataset`` (the held-out split, never the test set)."""
        _require_operators(model)
        if self.schedule == "successive_halving":
            return self._run_successive_halving(model, dataset, trainer, state_path)
        results = run_tasks(
            model,
            Subset(dataset, self.sample_order(len(dataset))),  # type: ignore[arg-type]
            self.tasks(),
            batch_size=self.batch_size,
            seed=self.seed,
            state_path=state_path,
            trainer=trainer,
        )
        per_sample = {
            alpha: {attack: results[f"alpha={alpha:g}/{attack}"] for attack in ["clean", *self.attacks]}
            for alpha in self.alphas
        }
        return self._result(per_sample, len(dataset))  # type: ignore[arg-type]

    def _row(self, per_attack: dict[str, dict[int, bool]]) -> dict[str, float]:
        row = {name: accuracy(values) for name, values in per_attack.items()}
        ce_dlr = [per_attack[a] for a in ("apgd-ce", "apgd-dlr") if a in per_attack]
        if len(ce_dlr) == 2:
            row["apgd-ce+dlr"] = accuracy(worst_case(ce_dlr))
        row["worst_case"] = accuracy(worst_case(per_attack.values()))
        return row

    def _result(
        self,
        per_sample: dict[float, dict[str, dict[int, bool]]],
        num_samples: int,
        rounds: list[dict[str, Any]] | None = None,
    ) -> AlphaSearchResult:
        table: dict[float, dict[str, float]] = {}
        flags = []
        samples = {a: len(per_sample[a]["clean"]) for a in self.alphas}
        for alpha in self.alphas:
            row = self._row(per_sample[alpha])
            table[alpha] = row
            if (
                "bpda-apgd-ce" in row
                and "apgd-ce" in row
                and row["apgd-ce"] - row["bpda-apgd-ce"] > GRADIENT_MASKING_GAP
            ):
                # an alpha dropped early was measured on a few samples, where one sample is several points
                seen = (
                    ""
                    if samples[alpha] == num_samples
                    else f" (on {samples[alpha]} of {num_samples} samples)"
                )
                flags.append(
                    f"alpha={alpha:g}{seen}: BPDA-APGD-CE accuracy {row['bpda-apgd-ce']:.2f} is more than "
                    f"{GRADIENT_MASKING_GAP:g} point below APGD-CE {row['apgd-ce']:.2f}: the operator masks gradients "
                    "here, so APGD-CE alone overstates robustness."
                )
        return AlphaSearchResult(
            alphas=self.alphas,
            attacks=self.attacks,
            accuracy=table,
            criterion=self.criterion,
            max_clean_drop=self.max_clean_drop,
            eps=self.eps,
            norm=self.norm,
            num_samples=num_samples,
            flags=flags,
            schedule=self.schedule,
            samples_per_alpha={} if self.schedule == "exhaustive" else samples,
            rounds=rounds or [],
            selection=self.selection,
            criterion_per_sample={a: self._criterion_per_sample(per_sample[a]) for a in self.alphas},
        )

    # ------------------------------------------------------------------------------ successive halving
    def round_sizes(self, num_samples: int) -> list[int]:
        """Samples per round of successive halving: doubling from ``min_samples``, the last one the whole split.

        By default the non-zero alphas are halved until ``nonzero_finalists`` are left, and the first round
        has ``num_samples / 2 ** (halving_rounds + nonzero_finalists)`` samples: for the paper's grid (8
        non-zero alphas, two finalists) 1/16 of the split, then 1/8, then the finalists and alpha 0 on all of
        it, which is 39% of the sample-alpha evaluations of an exhaustive search.
        """
        nonzero = len(self.alphas) - 1
        rounds = self.halving_rounds
        if rounds is None:
            rounds = (
                math.ceil(math.log2(nonzero / self.nonzero_finalists))
                if nonzero > self.nonzero_finalists
                else 0
            )
        first = self.min_samples
        if first is None:
            first = max(1, num_samples >> (rounds + self.nonzero_finalists))
            if first >= self.batch_size:  # whole batches: every round then reuses the full run's batches
                first -= first % self.batch_size
        sizes = [min(num_samples, first << r) for r in range(rounds)] + [num_samples]
        return sorted(set(sizes))

    def _rank_key(self, alpha: float, per_sample: dict[float, dict[str, dict[int, bool]]]) -> tuple:
        """Order of the halving step: eligible first, then the criterion column, then the mean accuracy over
        the attacks, then the smaller alpha.

        Eligibility is the rule's clean-drop test with a one-standard-error allowance for the subset: the
        paired difference against alpha 0 on ``n`` samples with ``d`` discordant samples has a standard
        error of about ``100 * sqrt(d) / n`` points, and a budget of 0.5 points means nothing on 64 samples.
        On a small subset many alphas tie on the criterion; the mean over the attack columns separates them
        with more evidence than the rule's final tie-break (the smaller alpha), which in replays of the demo
        search dropped the eventual winner more often. The final choice, on the whole split, uses the rule
        exactly.
        """
        drop, discordant, n = _paired_comparison(per_sample[0.0]["clean"], per_sample[alpha]["clean"])
        slack = 100.0 * math.sqrt(discordant + 1) / max(n, 1)
        eligible = drop <= self.max_clean_drop + slack + 1e-9
        row = self._row(per_sample[alpha])
        column = criterion_column(self.criterion)
        evidence = sum(row[attack] for attack in self.attacks) / max(len(self.attacks), 1)
        return (eligible, row[column], evidence, -alpha)

    def _elimination_order(
        self, alphas: Sequence[float], per_sample: dict[float, dict[str, dict[int, bool]]]
    ) -> list[float]:
        """The order in which a halving step keeps the non-zero ``alphas``: the leader (the best by
        :meth:`_rank_key`), then every eligible alpha whose criterion is within one paired standard error of
        the leader's (:func:`paired_gap`), smallest first, then the rest by :meth:`_rank_key`.

        On a subset, the alphas within one standard error of the leader cannot be told apart, and ranking them
        by their noisy accuracies drops the eventual winner at random. Keeping the smallest of them instead
        keeps the answer of the one-standard-error rule, and beside the leader it gives the final round on the
        whole split a real choice under either rule. Replayed on the per-sample results of 20 exhaustive
        searches on the demo model (benchmarks/README.md), this ordering with two finalists agreed with the
        exhaustive choice in 11 of 20 (``highest``) and 15 of 20 (``smallest_within_error``), against 8 and 9
        of 20 for plain ranking down to one finalist, at the same 39% of the evaluations.
        """
        rank = {alpha: self._rank_key(alpha, per_sample) for alpha in alphas}
        ranked = sorted(alphas, key=rank.__getitem__, reverse=True)
        leader, others = ranked[0], ranked[1:]
        best = self._criterion_per_sample(per_sample[leader])
        close = []
        for alpha in sorted(others):
            eligible = rank[alpha][0]
            gap, error = paired_gap(best, self._criterion_per_sample(per_sample[alpha]))
            if eligible and gap <= error + 1e-9:
                close.append(alpha)
        return [leader, *close, *(a for a in others if a not in close)]

    def _criterion_per_sample(self, per_attack: dict[str, dict[int, bool]]) -> dict[int, bool]:
        if self.criterion == "apgd":
            return per_attack["apgd-ce"]
        return worst_case(per_attack.values())

    def _not_clearly_worse(
        self, alphas: Sequence[float], per_sample: dict[float, dict[str, dict[int, bool]]]
    ) -> list[float]:
        """The alphas the evidence so far does not rule out (``elimination="clearly_worse"``).

        Paired comparisons on the samples seen (:func:`paired_gap`). An alpha is dropped when its clean drop
        against alpha 0 exceeds ``max_clean_drop`` by more than ``confidence`` standard errors, or when the
        leader (the best eligible alpha by :meth:`_rank_key`) beats its criterion by more than ``confidence``
        errors.
        """
        base_clean = per_sample[0.0]["clean"]
        admissible = []
        for alpha in alphas:
            drop, error = paired_gap(base_clean, per_sample[alpha]["clean"])
            if drop - self.confidence * error <= self.max_clean_drop + 1e-9:
                admissible.append(alpha)
        if not admissible:
            return []
        leader = max(admissible, key=lambda a: self._rank_key(a, per_sample))
        best = self._criterion_per_sample(per_sample[leader])
        kept = []
        for alpha in admissible:
            gap, error = paired_gap(best, self._criterion_per_sample(per_sample[alpha]))
            if gap <= self.confidence * error + 1e-9:
                kept.append(alpha)
        return sorted(kept)

    def _run_successive_halving(
        self,
        model: nn.Module,
        dataset: Dataset,
        trainer: pl.Trainer | None,
        state_path: str | os.PathLike | None,
    ) -> AlphaSearchResult:
        num_samples = len(dataset)  # type: ignore[arg-type]
        order = self.sample_order(num_samples)
        columns = ["clean", *self.attacks]
        # alpha -> attack -> {position in the permuted split -> correct}
        per_sample: dict[float, dict[str, dict[int, bool]]] = {
            a: {c: {} for c in columns} for a in self.alphas
        }
        survivors = list(self.alphas)
        rounds: list[dict[str, Any]] = []
        done = 0
        pending = self.round_sizes(num_samples)
        # A round that starts inside a batch of the full run draws other random starts for its attacks (the
        # first round is a prefix of the first batch and gets the same ones on the CPU): the finalists' numbers
        # may then differ from an exhaustive run's by attack noise, and with them the choice.
        misaligned = [start for start in pending[:-1] if start % self.batch_size]
        if misaligned:
            fitting = max(d for d in range(1, min(pending[0], self.batch_size) + 1) if pending[0] % d == 0)
            rank_zero_warn(
                f"successive halving: rounds start at samples {misaligned}, inside batches of {self.batch_size}; "
                "their attacks get other random starts than an exhaustive search would use, so the two can "
                f"disagree by noise. For identical numbers use a batch_size that divides {pending[0]} "
                f"(e.g. {fitting}) in both schedules."
            )
        while pending:
            size = pending.pop(0)
            index = len(rounds)
            # Only the samples new to this round; the seed offset gives each batch the attack seed that a run
            # over the whole permuted split would give it (the seed is the batch's first index plus seed).
            results = run_tasks(
                model,
                Subset(dataset, order[done:size]),
                self.tasks(survivors),
                batch_size=self.batch_size,
                seed=self.seed + done,
                state_path=None if state_path is None else f"{state_path}.round{index}",
                trainer=trainer,
            )
            for alpha in survivors:
                for column in columns:
                    values = results[f"alpha={alpha:g}/{column}"]
                    per_sample[alpha][column].update({done + i: c for i, c in values.items()})
            done = size
            evaluated = list(survivors)
            nonzero = [a for a in survivors if a != 0.0]
            if pending and len(nonzero) > 1:
                if self.elimination == "clearly_worse":
                    survivors = [0.0, *self._not_clearly_worse(nonzero, per_sample)]
                else:
                    keep = max(self.nonzero_finalists, math.ceil(len(nonzero) / 2))
                    survivors = [0.0, *sorted(self._elimination_order(nonzero, per_sample)[:keep])]
            # no more than the finalists left: nothing to drop, straight to the whole split
            if len(survivors) - 1 <= self.nonzero_finalists:
                pending = pending[-1:]
            rounds.append({"round": index, "samples": size, "evaluated": evaluated, "kept": list(survivors)})
        return self._result(per_sample, num_samples, rounds)
