"""Choose the one shared alpha by a sweep over clean and robust accuracy on a held-out split.

Statistics are collected once; per alpha only the evaluation runs. Every alpha is measured with clean
accuracy, APGD-CE, APGD-DLR and APGD-CE through the straight-through backward (BPDA), and the per-sample
worst case over all of them. The default rule picks the alpha with the highest worst-case accuracy whose
clean accuracy is at most ``max_clean_drop`` points below alpha = 0: choosing by APGD-CE alone (the
paper's rule) rewards gradient masking, which BPDA exposes.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
from torch import nn
from torch.utils.data import Dataset

from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, accuracy, run_tasks, worst_case
from meansparse_pl.operator import _require_operators, check_alpha

Criterion = Literal["worst_case", "apgd"]
PAPER_ALPHAS: tuple[float, ...] = (0.0, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5)
SEARCH_ATTACKS: tuple[str, ...] = ("apgd-ce", "apgd-dlr", "bpda-apgd-ce")
GRADIENT_MASKING_GAP = 1.0  # points by which BPDA may beat exact-gradient APGD before we flag masking


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
        return (
            f"highest {target} among alphas whose clean accuracy is at most {self.max_clean_drop:g} points "
            "below alpha = 0; ties go to the smaller alpha"
        )

    def suggestion(self) -> float:
        base_clean = self.accuracy[0.0]["clean"]
        eligible = [
            a for a in self.alphas if self.accuracy[a]["clean"] >= base_clean - self.max_clean_drop - 1e-9
        ]
        column = "worst_case" if self.criterion == "worst_case" else "apgd-ce"
        return max(eligible, key=lambda a: (self.accuracy[a][column], -a))

    def table(self) -> str:
        chosen = self.suggestion()
        header = "| alpha | " + " | ".join(self.columns) + " |"
        lines = [header, "|" + "---:|" * (len(self.columns) + 1)]
        for a in self.alphas:
            mark = " **(chosen)**" if a == chosen else ""
            cells = " | ".join(f"{self.accuracy[a][c]:.2f}" for c in self.columns)
            lines.append(f"| {a:g}{mark} | {cells} |")
        notes = [
            "",
            f"{self.num_samples} held-out samples, {self.norm} eps = {self.eps:g}; accuracies in percent.",
            f"Rule: {self.rule()}. Chosen alpha: {chosen:g}.",
        ]
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
        self.alphas = check_alphas(alphas)
        self.eps = float(eps)
        self.norm = norm
        self.attacks = list(attacks)
        self.n_iter = n_iter
        self.max_clean_drop = float(max_clean_drop)
        self.criterion = criterion
        self.seed = seed
        self.batch_size = batch_size

    def tasks(self) -> list[EvaluationTask]:
        tasks = []
        for alpha in self.alphas:
            for attack in ["clean", *self.attacks]:
                options = {} if attack == "clean" else {"n_iter": self.n_iter}
                tasks.append(
                    EvaluationTask(f"alpha={alpha:g}/{attack}", attack, self.eps, self.norm, options, alpha)
                )
        return tasks

    def run(
        self,
        model: nn.Module,
        dataset: Dataset,
        *,
        trainer: pl.Trainer | None = None,
        state_path: str | os.PathLike | None = None,
    ) -> AlphaSearchResult:
        """Evaluate every alpha on ``dataset`` (the held-out split, never the test set)."""
        _require_operators(model)
        results = run_tasks(
            model,
            dataset,
            self.tasks(),
            batch_size=self.batch_size,
            seed=self.seed,
            state_path=state_path,
            trainer=trainer,
        )
        table: dict[float, dict[str, float]] = {}
        flags = []
        for alpha in self.alphas:
            per_attack = {attack: results[f"alpha={alpha:g}/{attack}"] for attack in ["clean", *self.attacks]}
            row = {name: accuracy(values) for name, values in per_attack.items()}
            ce_dlr = [per_attack[a] for a in ("apgd-ce", "apgd-dlr") if a in per_attack]
            if len(ce_dlr) == 2:
                row["apgd-ce+dlr"] = accuracy(worst_case(ce_dlr))
            row["worst_case"] = accuracy(worst_case(per_attack.values()))
            table[alpha] = row
            if (
                "bpda-apgd-ce" in row
                and "apgd-ce" in row
                and row["apgd-ce"] - row["bpda-apgd-ce"] > GRADIENT_MASKING_GAP
            ):
                flags.append(
                    f"alpha={alpha:g}: BPDA-APGD-CE accuracy {row['bpda-apgd-ce']:.2f} is more than "
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
            num_samples=len(dataset),  # type: ignore[arg-type]
            flags=flags,
        )
