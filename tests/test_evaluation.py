"""The sharded evaluation's cascade: an attack that runs only on the samples every earlier attack failed to break
gives the same best-known verdicts as running it on everything, at the cost of the survivors only."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from meansparse_pl import ThreatModel, calibrate, sparsify, worst_case
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import EvaluationTask, run_tasks

THREAT = ThreatModel("Linf", 0.05)


def _model_and_data(n: int = 40):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(n, 3, 8, 8)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % 5  # some clean mistakes
    sparse = sparsify(model, x[:1])
    calibrate(sparse, [x], progress=False)
    return sparse, TensorDataset(x, y)


# PGD without a random start attacks every sample on its own (the loss is a sum over samples): the verdicts of a
# subset equal those of the full batch, so a cascade must reproduce the independent worst case exactly
PGD = {"steps": 4, "random_start": False, "step_size": 0.02}


def test_a_cascade_attacks_only_the_survivors_and_keeps_the_worst_case(monkeypatch):
    import meansparse_pl.evaluation as evaluation

    model, data = _model_and_data()
    attacked: list[int] = []
    original = evaluation.run_attack

    def counting(name, model, x, *args, **kwargs):
        attacked.append(x.shape[0])
        return original(name, model, x, *args, **kwargs)

    monkeypatch.setattr(evaluation, "run_attack", counting)
    independent = run_tasks(
        model,
        data,
        [EvaluationTask("clean", "clean", THREAT), EvaluationTask("pgd", "pgd", THREAT, PGD, 0.3)],
        batch_size=16,
    )
    attacked.clear()
    cascade = run_tasks(
        model,
        data,
        [
            EvaluationTask("clean", "clean", THREAT),
            EvaluationTask("pgd", "pgd", THREAT, PGD, 0.3, after=("clean",)),
        ],
        batch_size=16,
    )
    clean_correct = sum(cascade["clean"].values())
    assert 0 < clean_correct < len(data)
    assert sum(attacked[1::2]) == clean_correct  # pgd ran on the clean-correct samples only (3 batches)
    assert worst_case(cascade.values()) == worst_case(independent.values())
    assert all(not cascade["pgd"][i] for i, ok in cascade["clean"].items() if not ok)


def test_a_cascade_step_must_follow_the_tasks_it_attacks_the_survivors_of():
    model, data = _model_and_data()
    with pytest.raises(ConfigurationError, match="do not come before it"):
        run_tasks(model, data, [EvaluationTask("pgd", "pgd", THREAT, PGD, after=("clean",))], batch_size=16)


@pytest.mark.parametrize("bar", [True, False])
def test_progress_moves_per_attack_inside_a_batch_and_is_off_with_the_trainers_bar(bar, capsys):
    """One predict batch can hold every attack (the Trainer's own bar then sits at 0/1): a bar per batch counts
    the attacks done, shown only where the Trainer shows its progress bar."""
    import lightning.pytorch as pl

    sparse, data = _model_and_data(8)
    tasks = [EvaluationTask(f"t{i}", "pgd", THREAT, PGD) for i in range(3)]
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, logger=False, inference_mode=False, enable_progress_bar=bar,
        enable_model_summary=False, enable_checkpointing=False,
    )  # fmt: skip
    run_tasks(sparse, data, tasks, batch_size=8, trainer=trainer)
    err = capsys.readouterr().err
    assert ("batch 1: attacks" in err and "0/3 [" in err) == bar
