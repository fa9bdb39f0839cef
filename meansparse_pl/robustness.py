"""The evaluation runner: attacks, radii and model variants in, a :class:`~meansparse_pl.report.RobustnessReport`
out, with or without a Trainer (the way Lightning's LR finder serves both the Tuner and its callback).

:class:`RobustnessEvaluation` owns the one task planner of an evaluation (every attack per variant and radius,
the cascade on the survivors of all before it, the large-eps check) and the one place its task keys are made, so
nothing downstream parses a key back. ``cli.py evaluate`` is glue around it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.attacks import COMPOSITE_ATTACKS, PerSample, check_attack_config, options_for, worst_case
from meansparse_pl.config import AttackConfig, DiagnosticsConfig, ThreatModel, check_alpha, check_distinct
from meansparse_pl.diagnostics import Diagnostics, diagnose
from meansparse_pl.evaluation import EvaluationTask, run_tasks
from meansparse_pl.ops import alphas_of
from meansparse_pl.report import RobustnessReport, VariantResult, atomic_attacks, summarise

# the attacks of the large-eps check: exact and straight-through gradients must both reach about zero
LARGE_EPS_ATTACKS = ("apgd-ce", "bpda-apgd-ce")

# a variant's operator setting: one alpha, one alpha per operator, or None for the model as it is
Setting = float | tuple[float, ...] | None


def model_setting(model: nn.Module) -> float | tuple[float, ...] | None:
    """The operator setting a model has now: its one shared alpha, one alpha per operator, or None without
    operators."""
    own = alphas_of(model)
    if not own:
        return None
    return own[0] if len(set(own)) == 1 else tuple(own)


def evaluated_variants(model: nn.Module, alpha: float | None, compare_base: bool) -> dict[str, Setting]:
    """The variants ``evaluate`` / ``diagnose`` run: the MeanSparse setting (``alpha``, else the model's own) and,
    with ``compare_base``, the base model (alpha 0) unless that is the same."""
    setting = check_alpha(alpha) if alpha is not None else model_setting(model)
    variants: dict[str, Setting] = {"meansparse": setting}
    if compare_base and (isinstance(setting, tuple) or setting != 0):
        variants["base"] = 0.0
    return variants


def task_key(variant: str, eps: float | None, attack: str) -> str:
    """The one spelling of a task's key (also the resume state's): ``<variant>/eps=<eps>/<attack>``, or
    ``<variant>/large/<attack>`` for the large-eps check (``eps`` None)."""
    return f"{variant}/large/{attack}" if eps is None else f"{variant}/eps={eps:g}/{attack}"


@dataclass(frozen=True)
class RobustnessEvaluation:
    """Attack model variants on a data set; per-attack accuracy, best known, sanity checks and diagnostics.

    Args:
        attacks: the attacks and their options (``cascade``: best known only, each on the survivors).
        threat: the threat model; ``extra_eps``: more radii besides ``threat.eps``.
        large_eps: also run APGD-CE and BPDA-APGD-CE at this radius (accuracy must be about zero).
        diagnostics: the indicators of attack failure (None: none).
        seed, batch_size: attack seed and batch size.
    """

    attacks: AttackConfig = field(default_factory=AttackConfig)
    threat: ThreatModel = field(default_factory=ThreatModel)
    extra_eps: tuple[float, ...] = ()
    large_eps: float | None = None
    diagnostics: DiagnosticsConfig | None = field(default_factory=DiagnosticsConfig)
    seed: int = 0
    batch_size: int = 256

    def __post_init__(self) -> None:
        check_attack_config(self.attacks, COMPOSITE_ATTACKS)
        object.__setattr__(self, "extra_eps", tuple(self.threat.with_eps(e).eps for e in self.extra_eps))
        check_distinct("eps", [self.threat.eps, *self.extra_eps])
        if self.large_eps is not None:
            object.__setattr__(self, "large_eps", self.threat.with_eps(self.large_eps).eps)

    @property
    def radii(self) -> list[float]:
        return sorted({self.threat.eps, *self.extra_eps})

    def tasks(self, variants: Sequence[tuple[str, Setting]]) -> list[EvaluationTask]:
        """Every attack of ``attacks.names`` (composites expanded) per variant and radius, then the cascade, each on
        the survivors of all before it; then the large-eps check."""
        attacks, atomic = self.attacks, atomic_attacks(self.attacks.names)
        tasks = []
        for variant, setting in variants:
            for eps in self.radii:
                at = self.threat.with_eps(eps)
                tasks += [
                    EvaluationTask(task_key(variant, eps, a), a, at, options_for(attacks, a), setting)
                    for a in atomic
                ]
                for position, a in enumerate(attacks.cascade):
                    before = tuple(task_key(variant, eps, b) for b in (*atomic, *attacks.cascade[:position]))
                    key = task_key(variant, eps, a)
                    tasks.append(EvaluationTask(key, a, at, options_for(attacks, a), setting, before))
        if self.large_eps is not None:
            large = self.threat.with_eps(self.large_eps)
            tasks += [
                EvaluationTask(task_key(v, None, a), a, large, options_for(attacks, a), setting)
                for v, setting in variants
                for a in LARGE_EPS_ATTACKS
            ]
        return tasks

    def columns(
        self, per_sample: Mapping[str, PerSample], variant: str, eps: float | None = None
    ) -> dict[str, PerSample]:
        """One variant's verdicts at one radius (default ``threat.eps``) from :func:`run_tasks`' result, by attack,
        in the order the attacks ran (the columns, then the cascade)."""
        eps = self.threat.eps if eps is None else eps
        attacks = [*atomic_attacks(self.attacks.names), *self.attacks.cascade]
        return {a: per_sample[task_key(variant, eps, a)] for a in attacks}

    def attack(
        self,
        model: nn.Module,
        data: Dataset,
        variants: Sequence[tuple[str, Setting]],
        *,
        trainer: pl.Trainer | None = None,
        state_path: str | os.PathLike | None = None,
        distributed: bool | None = None,
    ) -> dict[str, PerSample]:
        """Every task of :meth:`tasks` on every sample of ``data``: task key -> per-sample verdicts (read them by
        variant and radius with :meth:`columns`). ``trainer`` / ``distributed`` / ``state_path`` as
        :func:`~meansparse_pl.evaluation.run_tasks` takes them."""
        return run_tasks(
            model,
            data,
            self.tasks(variants),
            batch_size=self.batch_size,
            seed=self.seed,
            state_path=state_path,
            trainer=trainer,
            distributed=distributed,
        )

    def run(
        self,
        model: nn.Module,
        data: Dataset,
        *,
        variants: Mapping[str, Setting] | None = None,
        trainer: pl.Trainer | None = None,
        state_path: str | os.PathLike | None = None,
        distributed: bool | None = None,
        with_diagnostics: bool = True,
    ) -> RobustnessReport:
        """Evaluate every variant (label -> operator setting; default ``{"model": None}``, the model as it is) on
        every sample of ``data``. ``trainer`` / ``distributed`` / ``state_path`` as
        :func:`~meansparse_pl.evaluation.run_tasks` takes them. ``with_diagnostics=False`` leaves the
        diagnostics out of this process's report (they have no collective: under DDP, rank 0 alone runs them)."""
        pairs = [
            (v, model_setting(model) if s is None else s) for v, s in (variants or {"model": None}).items()
        ]
        per_sample = self.attack(
            model, data, pairs, trainer=trainer, state_path=state_path, distributed=distributed
        )
        blocks = {(v, eps): self.columns(per_sample, v, eps) for v, _ in pairs for eps in self.radii}
        results = [
            VariantResult(
                v, None if isinstance(s, tuple) else s, eps, summarise(blocks[(v, eps)], self.attacks.names)
            )
            for v, s in pairs
            for eps in self.radii
        ]
        found = self._diagnostics(model, data, pairs, blocks) if with_diagnostics else None
        report = RobustnessReport(
            self.threat.norm,
            len(data),  # type: ignore[arg-type]
            list(self.attacks.names),
            results,
            large_eps=self.large_eps,
            operator_alphas=next((list(s) for _, s in pairs if isinstance(s, tuple)), None),
            cascade=list(self.attacks.cascade) or None,
            diagnostics=found,
        )
        if self.large_eps is not None:
            report.large_eps_check.update(
                self._large_eps_accuracy(per_sample, [v for v, _ in pairs], len(data))
            )  # type: ignore[arg-type]
        return report

    @staticmethod
    def _large_eps_accuracy(
        per_sample: Mapping[str, PerSample], variants: list[str], n: int
    ) -> dict[str, float]:
        """Per variant, the accuracy (percent) under both large-eps attacks, per sample worst case."""
        out = {}
        for v in variants:
            both = worst_case([per_sample[task_key(v, None, a)] for a in LARGE_EPS_ATTACKS])
            out[v] = 100.0 * sum(both.values()) / n
        return out

    def _diagnostics(
        self,
        model: nn.Module,
        data: Dataset,
        pairs: list[tuple[str, Setting]],
        blocks: Mapping[tuple[str, float], Mapping[str, PerSample]],
    ) -> Diagnostics | None:
        if self.diagnostics is None:
            return None
        return diagnose(
            model,
            data,
            threat=self.threat,
            attacks=self.attacks,
            config=self.diagnostics,
            variants=dict(pairs),
            seed=self.seed,
            verdicts=blocks,
        )
