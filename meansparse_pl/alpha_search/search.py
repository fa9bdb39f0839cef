"""Choose alpha by a sweep over clean and robust accuracy on a held-out split.

Statistics are collected once; per alpha only the evaluation runs. Every alpha is measured with clean
accuracy, APGD-CE, APGD-DLR and APGD-CE through the straight-through backward (BPDA), and the per-sample
worst case over all of them. The default rule picks the alpha with the highest worst-case accuracy whose
clean accuracy is at most ``max_clean_drop`` points below alpha = 0: choosing by APGD-CE alone (the paper's
rule) rewards gradient masking, which BPDA exposes. With ``selection="smallest_within_error"`` the choice is
instead the smallest eligible alpha within one paired standard error of that best one. How the evaluations are
spent is the schedule's business (:mod:`.schedules`).
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from meansparse_pl.alpha_search.result import AlphaSearchResult, flags_for, row_of
from meansparse_pl.alpha_search.schedules import Exhaustive, Schedule, Verdicts
from meansparse_pl.attacks import PerSample, check_attack_config, options_for, worst_case
from meansparse_pl.config import (
    AttackConfig,
    ThreatModel,
    check_alpha,
    check_choice,
    check_distinct,
    check_number,
    check_positive_int,
)
from meansparse_pl.diagnostics import alpha_variant, quick_diagnostics
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask
from meansparse_pl.ops import require_operators

Criterion = Literal["worst_case", "apgd"]
CRITERIA: tuple[str, ...] = ("worst_case", "apgd")
Selection = Literal["highest", "smallest_within_error"]
SELECTIONS: tuple[str, ...] = ("highest", "smallest_within_error")
PAPER_ALPHAS: tuple[float, ...] = (0.0, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
SEARCH_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "bpda-apgd-ce")


def check_alphas(alphas: Sequence[float]) -> list[float]:
    """The grid, sorted and without repeats, with 0 (the base model, the reference of the clean drop) added."""
    if isinstance(alphas, str) or not isinstance(alphas, Sequence) or not alphas:
        raise ConfigurationError(
            f"the alpha grid must be a non-empty list, e.g. alphas: [0, 0.15, 0.2], got {alphas!r}."
        )
    values = check_distinct("alphas", [check_alpha(a) for a in alphas])
    if values[0] != 0.0:
        values.insert(0, 0.0)
    return values


def dataset_of(data: Dataset | DataLoader | pl.LightningDataModule) -> Dataset:
    """The held-out samples in ``data``: a Dataset as it is, a DataLoader's dataset, or a LightningDataModule's
    validation split (never its test split)."""
    if isinstance(data, pl.LightningDataModule):
        data.setup("fit")
        data = data.val_dataloader()
    if isinstance(data, DataLoader):
        return data.dataset
    if isinstance(data, Dataset) or (hasattr(data, "__getitem__") and hasattr(data, "__len__")):
        return data  # type: ignore[return-value]
    raise ConfigurationError(
        f"AlphaSearch.run takes a Dataset, a DataLoader or a LightningDataModule, got {type(data).__name__}."
    )


class AlphaSearch:
    """Sweep alpha on a held-out split and suggest one (Lightning's ``LearningRateFinder`` in spirit).

    Args:
        alphas: grid to evaluate (paper: 0, 0.15, ..., 0.5); 0 is added when missing.
        threat: the threat model of the attacks (:class:`~meansparse_pl.config.ThreatModel`).
        attacks: the robust columns and their options (:class:`~meansparse_pl.config.AttackConfig`); default
            APGD-CE, APGD-DLR and BPDA-APGD-CE at 100 iterations. Clean accuracy is always measured.
        max_clean_drop: clean-accuracy points an alpha may lose against alpha = 0 to be eligible.
        criterion: ``worst_case`` (default) or ``apgd`` (the paper's rule, for comparison).
        selection: ``highest`` (default: the highest criterion accuracy, the paper's way) or
            ``smallest_within_error`` (the smallest alpha whose criterion accuracy is within one paired standard
            error of the highest, the one-standard-error rule of model selection: a larger alpha costs clean
            accuracy and masks more gradient, so it has to be measurably better).
        schedule: :class:`~meansparse_pl.alpha_search.Exhaustive` (default) or
            :class:`~meansparse_pl.alpha_search.SuccessiveHalving`.
        seed, batch_size: attack seed and batch size.
    """

    def __init__(
        self,
        alphas: Sequence[float] = PAPER_ALPHAS,
        threat: ThreatModel | None = None,
        attacks: AttackConfig | None = None,
        max_clean_drop: float = 0.5,
        criterion: Criterion = "worst_case",
        selection: Selection = "highest",
        schedule: Schedule | None = None,
        seed: int = 0,
        batch_size: int = 128,
    ) -> None:
        self.alphas = check_alphas(alphas)
        self.threat = threat if threat is not None else ThreatModel()
        self.attacks = attacks if attacks is not None else AttackConfig(names=list(SEARCH_ATTACKS))
        if not isinstance(self.threat, ThreatModel) or not isinstance(self.attacks, AttackConfig):
            raise ConfigurationError(
                "AlphaSearch takes a ThreatModel as threat and an AttackConfig as attacks."
            )
        check_attack_config(self.attacks)
        if self.attacks.cascade:
            raise ConfigurationError(
                "the alpha search ranks alphas by every column, so it runs no cascade; use cascade in evaluate."
            )
        self.max_clean_drop = check_number("max_clean_drop", max_clean_drop, minimum=0.0, hint="in points")
        self.criterion = check_choice("criterion", criterion, CRITERIA)
        if criterion == "apgd" and "apgd-ce" not in self.attacks.names:
            raise ConfigurationError("criterion 'apgd' needs 'apgd-ce' among the attacks.")
        self.selection = check_choice("selection", selection, SELECTIONS)
        self.schedule = schedule if schedule is not None else Exhaustive()
        if not isinstance(self.schedule, Schedule):
            raise ConfigurationError(
                f"schedule must be an alpha-search Schedule, got {type(schedule).__name__}."
            )
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigurationError(f"seed must be an integer, got {seed!r}.")
        self.seed = seed
        self.batch_size = check_positive_int("batch_size", batch_size)

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> AlphaSearch:
        """The search that a subcommand's or a callback's options describe (their other options ignored): the one
        way the glue builds it, so the two cannot drift apart."""
        names = inspect.signature(cls.__init__).parameters
        return cls(**{name: value for name, value in options.items() if name in names and name != "self"})

    @property
    def columns(self) -> list[str]:
        """``clean`` and the attacks, in the table's order (clean is always measured, once)."""
        return ["clean", *(name for name in self.attacks.names if name != "clean")]

    @staticmethod
    def task_key(alpha: float, attack: str) -> str:
        """The one spelling of a search task's key (also its resume state's); nothing parses it back."""
        return f"{alpha_variant(alpha)}/{attack}"

    def tasks(self, alphas: Sequence[float] | None = None) -> list[EvaluationTask]:
        return [
            EvaluationTask(
                self.task_key(alpha, attack),
                attack,
                self.threat,
                {} if attack == "clean" else options_for(self.attacks, attack),
                alpha,
            )
            for alpha in (self.alphas if alphas is None else alphas)
            for attack in self.columns
        ]

    def sample_order(self, num_samples: int) -> list[int]:
        """The seeded order in which every schedule visits the held-out split.

        Successive halving needs it (its rounds are prefixes, and a split sorted by class would give biased
        ones); the exhaustive search uses it too, so that every sample meets the same batch, attack seed and
        random start under either schedule and the finalists of a halving run are scored with exactly the
        exhaustive search's numbers.
        """
        return torch.randperm(num_samples, generator=torch.Generator().manual_seed(self.seed)).tolist()

    def criterion_per_sample(self, per_attack: dict[str, PerSample]) -> PerSample:
        if self.criterion == "apgd":
            return per_attack["apgd-ce"]
        return worst_case(per_attack.values())

    def run(
        self,
        model: nn.Module,
        data: Dataset | DataLoader | pl.LightningDataModule,
        *,
        trainer: pl.Trainer | None = None,
        state_path: str | os.PathLike | None = None,
        distributed: bool | None = None,
    ) -> AlphaSearchResult:
        """Evaluate the alphas on ``data`` (the held-out split, never the test set): a Dataset, a DataLoader or
        a LightningDataModule (its validation split). With ``state_path`` an interrupted search resumes.
        ``trainer`` / ``distributed``: where it runs, as :func:`~meansparse_pl.evaluation.run_tasks` takes them
        (without a trainer, every process of an initialised process group takes whole batches of the split and
        all get the one merged result)."""
        require_operators(model)
        dataset = dataset_of(data)
        result = self.schedule.run(self, model, dataset, trainer, state_path, distributed)
        # the cheap indicators at every alpha, which name what masks the gradient where a flag says it is masked
        # (no collective inside: every process measures the same)
        result.diagnostics = quick_diagnostics(
            model, dataset, result.alphas, eps=self.threat.eps, seed=self.seed
        )
        result.flags = [
            flag
            for a in result.alphas
            for flag in flags_for(
                a,
                result.accuracy[a],
                result.samples(a),
                result.num_samples,
                result.diagnostics.masking_cause(alpha_variant(a)),
            )
        ]
        return result

    def result(
        self,
        per_sample: Verdicts,
        num_samples: int,
        schedule: Schedule,
        rounds: list[dict[str, Any]] | None = None,
    ) -> AlphaSearchResult:
        """The result object of a finished schedule (its per-sample verdicts, the table, the flags)."""
        table: dict[float, dict[str, float]] = {}
        flags: list[str] = []
        samples = {a: len(per_sample[a]["clean"]) for a in self.alphas}
        for alpha in self.alphas:
            table[alpha] = row_of(per_sample[alpha])
            flags += flags_for(alpha, table[alpha], samples[alpha], num_samples)
        return AlphaSearchResult(
            alphas=self.alphas,
            attacks=self.columns[1:],
            accuracy=table,
            criterion=self.criterion,
            max_clean_drop=self.max_clean_drop,
            eps=self.threat.eps,
            norm=self.threat.norm,
            num_samples=num_samples,
            flags=flags,
            schedule=schedule.name,
            samples_per_alpha={} if isinstance(schedule, Exhaustive) else samples,
            rounds=rounds or [],
            selection=self.selection,
            per_sample=per_sample,
        )
