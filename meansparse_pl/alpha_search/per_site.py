"""Per-site alpha: one alpha per operator (or per group of operators) by coordinate ascent, from the best global one.

The paper's appendix A.9 shows that sites differ: an operator that helps in one layer can hurt in another. The
schedule first runs the exhaustive global search, then visits the site groups in order; for each it tries every
candidate alpha with the other operators fixed, on every held-out sample with the same attack seeds, and keeps the
best candidate only when its criterion accuracy (the per-sample worst case by default) beats the current choice by
more than one paired standard error and its clean accuracy stays within ``max_clean_drop`` of alpha 0. Every
evaluation is a full pass of the search's attacks; ``budget`` caps their number. Each evaluation has its own resume
state, so an interrupted search continues where it stopped.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset, Subset

from meansparse_pl.alpha_search.result import AlphaSearchResult, row_of
from meansparse_pl.alpha_search.schedules import Exhaustive, Schedule, SearchPlan
from meansparse_pl.attacks import PerSample, paired_comparison, paired_gap
from meansparse_pl.config import check_alpha, check_positive_int
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, run_tasks
from meansparse_pl.ops import require_operators


class PerSite(Schedule):
    """One alpha per operator group, chosen by coordinate ascent from the best global alpha.

    Args:
        candidates: the alphas tried at each site (default: the search's grid).
        groups: lists of operator indices (in the order of ``operators(model)``) that share one alpha, e.g. one
            group per stage; default: every operator on its own.
        budget: the most site evaluations (each a full pass of the search's attacks on the held-out split).
        sweeps: how many times the groups are visited.
        start: the alpha every operator starts from; default: the global search's suggestion.
    """

    name = "per_site"

    def __init__(
        self,
        candidates: list[float] | None = None,
        groups: list[list[int]] | None = None,
        budget: int = 40,
        sweeps: int = 1,
        start: float | None = None,
    ) -> None:
        self.candidates = None if candidates is None else sorted({check_alpha(a) for a in candidates})
        if groups is not None and (
            not groups or not all(g and all(isinstance(i, int) and i >= 0 for i in g) for g in groups)
        ):
            raise ConfigurationError(f"groups must be non-empty lists of operator indices, got {groups!r}.")
        self.groups = None if groups is None else [list(g) for g in groups]
        self.budget = check_positive_int("budget", budget, "the most site evaluations, e.g. 40")
        self.sweeps = check_positive_int("sweeps", sweeps)
        self.start = None if start is None else check_alpha(start)

    def run(
        self,
        search: SearchPlan,
        model: nn.Module,
        dataset: Dataset,
        trainer: pl.Trainer | None,
        state_path: str | os.PathLike | None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        count = len(require_operators(model))
        groups = self._groups_of(count)
        where = {"trainer": trainer, "distributed": distributed}
        overall = Exhaustive().run(
            search, model, dataset, state_path=None if state_path is None else f"{state_path}.global", **where
        )

        def evaluate(alphas: list[float]) -> dict[str, PerSample]:
            return self._evaluate(search, model, dataset, state_path, alphas, **where)

        start = self.start if self.start is not None else overall.suggestion()
        current = [start] * count
        # the global search measured the start already when it is on its grid, with the same samples and seeds
        verdicts = overall.per_sample[start] if start in overall.per_sample else evaluate(current)
        base_clean = overall.per_sample[0.0]["clean"]
        candidates = self.candidates or list(search.alphas)
        steps: list[dict[str, Any]] = []
        evaluations = 0
        for _ in range(self.sweeps):
            for group in groups:
                tried, best = self._try_group(
                    search,
                    group,
                    current,
                    verdicts,
                    base_clean,
                    candidates,
                    self.budget - evaluations,
                    evaluate,
                )
                evaluations += len(tried)
                steps.append(_step_record(group, tried, best, current))
                if best is not None:
                    current, verdicts = best[3], best[4]
        overall.site_alphas = current
        overall.site_steps = steps
        overall.site_accuracy = row_of(verdicts)
        overall.schedule = self.name
        return overall

    def _groups_of(self, count: int) -> list[list[int]]:
        """The operator groups, each operator on its own by default; one line for a group naming a missing one."""
        groups = self.groups or [[i] for i in range(count)]
        outside = sorted({i for g in groups for i in g if i >= count})
        if outside:
            raise ConfigurationError(
                f"groups name operators {outside}, but the model has {count} (0 to {count - 1})."
            )
        return groups

    @staticmethod
    def _try_group(
        search: SearchPlan,
        group: list[int],
        current: list[float],
        verdicts: dict[str, PerSample],
        base_clean: PerSample,
        candidates: list[float],
        budget: int,
        evaluate: Callable[[list[float]], dict[str, PerSample]],
    ) -> tuple[list[float], tuple[float, float, float, list[float], dict[str, PerSample]] | None]:
        """Every candidate alpha for one group with the other operators fixed, at most ``budget`` evaluations: the
        values tried and the best accepted trial (value, gain, standard error, alphas, verdicts) or None."""
        tried: list[float] = []
        best: tuple[float, float, float, list[float], dict[str, PerSample]] | None = None
        for value in candidates:
            if all(current[i] == value for i in group) or len(tried) >= budget:
                continue
            trial = [value if i in group else a for i, a in enumerate(current)]
            trial_verdicts = evaluate(trial)
            tried.append(value)
            drop = paired_comparison(base_clean, trial_verdicts["clean"])[0]
            gap, error = paired_gap(
                search.criterion_per_sample(trial_verdicts), search.criterion_per_sample(verdicts)
            )
            if (
                drop <= search.max_clean_drop + 1e-9
                and gap > error + 1e-9
                and (best is None or gap > best[1])
            ):
                best = (value, gap, error, trial, trial_verdicts)
        return tried, best

    @staticmethod
    def _evaluate(
        search: SearchPlan,
        model: nn.Module,
        dataset: Dataset,
        state_path: str | os.PathLike | None,
        alphas: Sequence[float],
        trainer: pl.Trainer | None,
        distributed: bool | None,
    ) -> dict[str, PerSample]:
        """Every column of the search with one alpha per operator, on the split in the search's seeded order."""
        label = ",".join(f"{a:g}" for a in alphas)
        tasks = [
            EvaluationTask(f"sites={label}/{t.attack}", t.attack, t.threat, t.options, tuple(alphas))
            for t in search.tasks([0.0])
        ]
        state = None
        if state_path is not None:
            state = f"{state_path}.sites-{hashlib.sha256(label.encode()).hexdigest()[:12]}"
        results = run_tasks(
            model,
            Subset(dataset, search.sample_order(len(dataset))),  # type: ignore[arg-type]
            tasks,
            batch_size=search.batch_size,
            seed=search.seed,
            state_path=state,
            trainer=trainer,
            distributed=distributed,
        )
        return {t.attack: results[t.key] for t in tasks}


def _step_record(
    group: list[int], tried: list[float], best: tuple | None, current: list[float]
) -> dict[str, Any]:
    """One visit of a group as the result records it: what was tried, the alpha kept, and the accepted gain."""
    return {
        "sites": list(group),
        "tried": tried,
        "kept": best[0] if best else current[group[0]],
        "accepted": best is not None,
        "gain": best[1] if best else 0.0,
        "standard_error": best[2] if best else 0.0,
    }
