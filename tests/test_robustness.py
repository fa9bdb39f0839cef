"""The evaluation runner without a Trainer: its report against the same attacks run one by one."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from meansparse_pl import AttackConfig, RobustnessEvaluation, ThreatModel, calibrate, run_attack, sparsify
from meansparse_pl.config import DiagnosticsConfig
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.ops import temporary_alpha


@pytest.fixture(scope="module")
def model_and_data():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(40, 3, 8, 8)
    y = net(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5  # a few clean mistakes
    sparse = sparsify(net, x[:1])
    calibrate(sparse, [x], progress=False)
    return sparse, x, y


def test_the_report_equals_the_attacks_run_one_by_one(model_and_data):
    sparse, x, y = model_and_data
    attacks = AttackConfig(names=["clean", "apgd-ce", "bpda-apgd-ce"], n_iter=5)
    evaluation = RobustnessEvaluation(
        attacks, ThreatModel("Linf", 0.05), (0.1,), 0.5, DiagnosticsConfig(subset=20), batch_size=40
    )
    report = evaluation.run(sparse, TensorDataset(x, y), variants={"ms": 0.5, "base": 0.0})
    for variant, alpha in (("ms", 0.5), ("base", 0.0)):
        with temporary_alpha(sparse, alpha):
            for eps in (0.05, 0.1):
                # one batch: its attacks are seeded with the evaluation's seed, as run_attack is here
                verdicts = {
                    a: run_attack(a, sparse, x, y, eps=eps, seed=0, **({} if a == "clean" else {"n_iter": 5}))
                    for a in attacks.names
                }
                (row,) = [r for r in report.results if (r.name, r.eps) == (variant, eps)]
                for a, correct in verdicts.items():
                    assert row.accuracy[a] == pytest.approx(100.0 * float(correct.float().mean()))
                best = verdicts["clean"] & verdicts["apgd-ce"] & verdicts["bpda-apgd-ce"]
                assert row.accuracy["best_known"] == pytest.approx(100.0 * float(best.float().mean()))
            large = run_attack("apgd-ce", sparse, x, y, eps=0.5, n_iter=5) & run_attack(
                "bpda-apgd-ce", sparse, x, y, eps=0.5, n_iter=5
            )
            assert report.large_eps_check[variant] == pytest.approx(100.0 * float(large.float().mean()))
    assert {(i.variant, i.eps) for i in report.diagnostics.indicators} >= {("ms", 0.05), ("base", 0.1)}
    # the model as it is: its own alpha, recorded as the variant's
    with temporary_alpha(sparse, 0.25):
        (row,) = (
            RobustnessEvaluation(attacks, diagnostics=None, batch_size=40)
            .run(sparse, TensorDataset(x, y))
            .results
        )
    assert (row.name, row.alpha) == ("model", 0.25)


def test_an_evaluation_checks_itself_when_built():
    with pytest.raises(ConfigurationError, match="eps"):
        RobustnessEvaluation(
            threat=ThreatModel("Linf", 0.1), extra_eps=(0.1000001,)
        )  # reports print both 0.1
    with pytest.raises(ConfigurationError, match="unknown attack"):
        RobustnessEvaluation(attacks=AttackConfig(names=["clean", "nope"]))
