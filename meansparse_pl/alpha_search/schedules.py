"""How an alpha search spends its evaluations: a schedule object, chosen in LightningCLI by ``class_path``.

* :class:`Exhaustive`: every alpha on every held-out sample (the default, and the reference).
* :class:`SuccessiveHalving`: every alpha on a small subset, then the non-zero alphas halved round by round,
  the subset doubling, until ``nonzero_finalists`` (default 2) are left, which are evaluated with alpha 0 on
  the whole split. A halving step keeps the leader first, then the smallest alphas within one paired standard
  error of it, then the rest by rank (:meth:`SuccessiveHalving.elimination_order`);
  ``elimination="clearly_worse"`` instead drops only what the paired evidence rules out. Alpha 0 stays in every
  round (it is the reference of the clean-accuracy drop and a valid answer).

Both schedules visit the split in one seeded order (``AlphaSearch.sample_order``); the halving subsets are
prefixes of it, and every round evaluates only the samples new to it, with the attack seeds the exhaustive
search gives them. Where the rounds start on whole batches, the finalists' numbers are exactly the exhaustive
search's, so the two schedules can only disagree when the exhaustive winner was dropped early. A round that
starts inside a batch gets other random starts, and a warning says so.

Why exhaustive stays the default: where alphas lie on a plateau within attack noise of each other, the
exhaustive choice among them is itself decided by noise, and halving can drop the exhaustive winner on its
first small subsets; what halving saves is paid for with the chance of another point of the plateau. Its
measured agreement and cost are in ``benchmarks/README.md`` ("Choosing alpha").
"""

from __future__ import annotations

import abc
import math
import os
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.alpha_search.result import AlphaSearchResult, criterion_column, row_of
from meansparse_pl.attacks import PerSample, paired_comparison, paired_gap
from meansparse_pl.config import check_choice, check_number, check_positive_int
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, run_tasks

Elimination = Literal["half", "clearly_worse"]
ELIMINATIONS: tuple[str, ...] = ("half", "clearly_worse")
Verdicts = dict[float, dict[str, PerSample]]  # alpha -> column -> sample -> correct


class SearchPlan(Protocol):
    """What a schedule needs from the search it runs (see :class:`~meansparse_pl.alpha_search.AlphaSearch`)."""

    alphas: list[float]
    columns: list[str]
    criterion: str
    max_clean_drop: float
    seed: int
    batch_size: int

    def task_key(self, alpha: float, attack: str) -> str: ...

    def tasks(self, alphas: Sequence[float] | None = None) -> list[EvaluationTask]: ...

    def sample_order(self, num_samples: int) -> list[int]: ...

    def criterion_per_sample(self, per_attack: dict[str, PerSample]) -> PerSample: ...

    def result(
        self,
        per_sample: Verdicts,
        num_samples: int,
        schedule: Schedule,
        rounds: list[dict[str, Any]] | None = None,
    ) -> AlphaSearchResult: ...


def collect(search: SearchPlan, results: dict[str, PerSample], alphas: Sequence[float]) -> Verdicts:
    """Per alpha and column, the verdicts ``run_tasks`` returned for ``search.tasks(alphas)``."""
    return {a: {column: results[search.task_key(a, column)] for column in search.columns} for a in alphas}


class Schedule(abc.ABC):
    """Base class of the alpha-search schedules (LightningCLI picks a subclass by ``class_path``)."""

    name = ""

    @abc.abstractmethod
    def run(
        self,
        search: SearchPlan,
        model: nn.Module,
        dataset: Dataset,
        trainer: pl.Trainer | None,
        state_path: str | os.PathLike | None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        """Evaluate ``search``'s alphas on ``dataset`` and return its result (``trainer`` and ``distributed``
        as :func:`~meansparse_pl.evaluation.run_tasks` takes them)."""


class Exhaustive(Schedule):
    """Every alpha on every held-out sample."""

    name = "exhaustive"

    def run(
        self,
        search: SearchPlan,
        model: nn.Module,
        dataset: Dataset,
        trainer: pl.Trainer | None,
        state_path: str | os.PathLike | None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        num_samples = len(dataset)  # type: ignore[arg-type]
        results = run_tasks(
            model,
            Subset(dataset, search.sample_order(num_samples)),
            search.tasks(),
            batch_size=search.batch_size,
            seed=search.seed,
            state_path=state_path,
            trainer=trainer,
            distributed=distributed,
        )
        return search.result(collect(search, results, search.alphas), num_samples, self)


class SuccessiveHalving(Schedule):
    """Alphas on growing subsets, the worse ones dropped early (see the module docstring).

    Args:
        nonzero_finalists: the non-zero alphas that reach the final round on the whole split (default 2).
            Halving never keeps fewer: on a plateau of near-equal alphas the final round, where the numbers are
            those of the exhaustive search, then still has a choice to make.
        elimination: ``half`` drops the worse half of the non-zero alphas after every round; ``clearly_worse``
            drops only the alphas whose criterion is below the round's leader by more than ``confidence`` paired
            standard errors, or whose clean drop exceeds ``max_clean_drop`` by more than that.
        confidence: standard errors for ``clearly_worse`` (default 2).
        halving_rounds: how many times the non-zero alphas are halved before the final round; default: until
            ``nonzero_finalists`` are left.
        min_samples: samples of the first round; default the split size divided by
            ``2 ** (halving_rounds + nonzero_finalists)`` (rounded down to whole batches when that is at least one
            batch). Round ``r`` then uses ``min_samples * 2 ** r`` samples and the last round all of them.
    """

    name = "successive_halving"

    def __init__(
        self,
        nonzero_finalists: int = 2,
        elimination: Elimination = "half",
        confidence: float = 2.0,
        halving_rounds: int | None = None,
        min_samples: int | None = None,
    ) -> None:
        self.nonzero_finalists = check_positive_int("nonzero_finalists", nonzero_finalists)
        self.elimination = check_choice("elimination", elimination, ELIMINATIONS)
        self.confidence = check_number(
            "confidence", confidence, minimum=0.0, hint="in standard errors, e.g. 2"
        )
        if halving_rounds is not None and (
            isinstance(halving_rounds, bool) or not isinstance(halving_rounds, int) or halving_rounds < 0
        ):
            raise ConfigurationError(
                f"halving_rounds must be an integer >= 0 or None, got {halving_rounds!r}."
            )
        self.halving_rounds = halving_rounds
        self.min_samples = None if min_samples is None else check_positive_int("min_samples", min_samples)

    def round_sizes(self, search: SearchPlan, num_samples: int) -> list[int]:
        """Samples per round: doubling from ``min_samples``, the last one the whole split.

        By default the non-zero alphas are halved until ``nonzero_finalists`` are left, and the first round has
        ``num_samples / 2 ** (halving_rounds + nonzero_finalists)`` samples: for the paper's grid (8 non-zero
        alphas, two finalists) 1/16 of the split, then 1/8, then the finalists and alpha 0 on all of it, which
        is 39% of the sample-alpha evaluations of an exhaustive search.
        """
        nonzero = len(search.alphas) - 1
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
            if first >= search.batch_size:  # whole batches: every round then reuses the full run's batches
                first -= first % search.batch_size
        sizes = [min(num_samples, first << r) for r in range(rounds)] + [num_samples]
        return sorted(set(sizes))

    def rank_key(self, search: SearchPlan, alpha: float, per_sample: Verdicts) -> tuple:
        """Order of the halving step: eligible first, then the criterion column, then the mean accuracy over
        the attacks, then the smaller alpha.

        Eligibility is the rule's clean-drop test with a one-standard-error allowance for the subset: the paired
        difference against alpha 0 on ``n`` samples with ``d`` discordant samples has a standard error of about
        ``100 * sqrt(d) / n`` points, and a budget of 0.5 points means nothing on 64 samples. On a small subset
        many alphas tie on the criterion; the mean over the attack columns separates them with more evidence
        than the rule's final tie-break (the smaller alpha), which in replays of the demo search dropped the
        eventual winner more often. The final choice, on the whole split, uses the rule exactly.
        """
        drop, discordant, n = paired_comparison(per_sample[0.0]["clean"], per_sample[alpha]["clean"])
        slack = 100.0 * math.sqrt(discordant + 1) / max(n, 1)
        eligible = drop <= search.max_clean_drop + slack + 1e-9
        row = row_of(per_sample[alpha])
        attacks = [c for c in search.columns if c != "clean"]
        evidence = sum(row[attack] for attack in attacks) / max(len(attacks), 1)
        return (eligible, row[criterion_column(search.criterion)], evidence, -alpha)

    def elimination_order(
        self, search: SearchPlan, alphas: Sequence[float], per_sample: Verdicts
    ) -> list[float]:
        """The order in which a halving step keeps the non-zero ``alphas``: the leader (the best by
        :meth:`rank_key`), then every eligible alpha whose criterion is within one paired standard error of the
        leader's (:func:`paired_gap`), smallest first, then the rest by :meth:`rank_key`.

        On a subset, the alphas within one standard error of the leader cannot be told apart, and ranking them
        by their noisy accuracies drops the eventual winner at random. Keeping the smallest of them instead keeps
        the answer of the one-standard-error rule, and beside the leader it gives the final round on the whole
        split a real choice under either rule (its measured agreement with the exhaustive choice:
        ``benchmarks/README.md``, "Choosing alpha").
        """
        rank = {alpha: self.rank_key(search, alpha, per_sample) for alpha in alphas}
        ranked = sorted(alphas, key=rank.__getitem__, reverse=True)
        leader, others = ranked[0], ranked[1:]
        best = search.criterion_per_sample(per_sample[leader])
        close = []
        for alpha in sorted(others):
            eligible = rank[alpha][0]
            gap, error = paired_gap(best, search.criterion_per_sample(per_sample[alpha]))
            if eligible and gap <= error + 1e-9:
                close.append(alpha)
        return [leader, *close, *(a for a in others if a not in close)]

    def not_clearly_worse(
        self, search: SearchPlan, alphas: Sequence[float], per_sample: Verdicts
    ) -> list[float]:
        """The alphas the evidence so far does not rule out (``elimination="clearly_worse"``).

        Paired comparisons on the samples seen (:func:`paired_gap`). An alpha is dropped when its clean drop
        against alpha 0 exceeds ``max_clean_drop`` by more than ``confidence`` standard errors, or when the
        leader (the best eligible alpha by :meth:`rank_key`) beats its criterion by more than ``confidence``
        errors.
        """
        base_clean = per_sample[0.0]["clean"]
        admissible = []
        for alpha in alphas:
            drop, error = paired_gap(base_clean, per_sample[alpha]["clean"])
            if drop - self.confidence * error <= search.max_clean_drop + 1e-9:
                admissible.append(alpha)
        if not admissible:
            return []
        leader = max(admissible, key=lambda a: self.rank_key(search, a, per_sample))
        best = search.criterion_per_sample(per_sample[leader])
        kept = []
        for alpha in admissible:
            gap, error = paired_gap(best, search.criterion_per_sample(per_sample[alpha]))
            if gap <= self.confidence * error + 1e-9:
                kept.append(alpha)
        return sorted(kept)

    def survivors(self, search: SearchPlan, survivors: list[float], per_sample: Verdicts) -> list[float]:
        """The alphas a round keeps (alpha 0 always): by ``elimination``, from the verdicts so far."""
        nonzero = [a for a in survivors if a != 0.0]
        if len(nonzero) <= 1:
            return survivors
        if self.elimination == "clearly_worse":
            return [0.0, *self.not_clearly_worse(search, nonzero, per_sample)]
        keep = max(self.nonzero_finalists, math.ceil(len(nonzero) / 2))
        return [0.0, *sorted(self.elimination_order(search, nonzero, per_sample)[:keep])]

    @staticmethod
    def _warn_misaligned(search: SearchPlan, pending: list[int]) -> None:
        # A round that starts inside a batch of the full run draws other random starts for its attacks (the first
        # round is a prefix of the first batch and gets the same ones on the CPU): the finalists' numbers may then
        # differ from an exhaustive run's by attack noise, and with them the choice.
        misaligned = [start for start in pending[:-1] if start % search.batch_size]
        if misaligned:
            fitting = max(d for d in range(1, min(pending[0], search.batch_size) + 1) if pending[0] % d == 0)
            rank_zero_warn(
                f"successive halving: rounds start at samples {misaligned}, inside batches of {search.batch_size}; "
                "their attacks get other random starts than an exhaustive search would use, so the two can "
                f"disagree by noise. For identical numbers use a batch_size that divides {pending[0]} "
                f"(e.g. {fitting}) in both schedules."
            )

    def run(
        self,
        search: SearchPlan,
        model: nn.Module,
        dataset: Dataset,
        trainer: pl.Trainer | None,
        state_path: str | os.PathLike | None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        num_samples = len(dataset)  # type: ignore[arg-type]
        order = search.sample_order(num_samples)
        per_sample: Verdicts = {a: {c: {} for c in search.columns} for a in search.alphas}
        survivors = list(search.alphas)
        rounds: list[dict[str, Any]] = []
        done = 0
        pending = self.round_sizes(search, num_samples)
        self._warn_misaligned(search, pending)
        while pending:
            size = pending.pop(0)
            index = len(rounds)
            # Only the samples new to this round; the seed offset gives each batch the attack seed that a run
            # over the whole permuted split would give it (the seed is the batch's first index plus seed).
            results = run_tasks(
                model,
                Subset(dataset, order[done:size]),
                search.tasks(survivors),
                batch_size=search.batch_size,
                seed=search.seed + done,
                state_path=None if state_path is None else f"{state_path}.round{index}",
                trainer=trainer,
                distributed=distributed,
            )
            for alpha, columns in collect(search, results, survivors).items():
                for column, values in columns.items():
                    per_sample[alpha][column].update({done + i: c for i, c in values.items()})
            done = size
            evaluated = list(survivors)
            if pending:
                survivors = self.survivors(search, survivors, per_sample)
            # no more than the finalists left: nothing to drop, straight to the whole split
            if len(survivors) - 1 <= self.nonzero_finalists:
                pending = pending[-1:]
            rounds.append({"round": index, "samples": size, "evaluated": evaluated, "kept": list(survivors)})
        return search.result(per_sample, num_samples, self, rounds)
