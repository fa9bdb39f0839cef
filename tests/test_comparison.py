"""The comparison against an equal-budget control: paired differences and their standard errors checked against
hand-derived numbers, the target rule, what each attack adds, the JSON round trip and the plot; compare_models on
real models (the cascade's best known equals the same attacks run in full)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from meansparse_pl import calibrate, set_alpha, sparsify
from meansparse_pl.comparison import ModelComparison, compare_models
from meansparse_pl.config import AttackConfig, ThreatModel
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.evaluation import run_tasks
from meansparse_pl.robustness import RobustnessEvaluation


def _bits(text: str) -> dict[int, bool]:
    return {i: c == "1" for i, c in enumerate(text)}


def _hand_made() -> ModelComparison:
    """Ten samples, all correct when clean. Control: APGD-CE leaves 0-3, the cascade BPDA then breaks 3 -> best
    known 30%. MeanSparse: APGD-CE leaves 0-6, BPDA breaks 5 and 6 -> best known 50%. The two disagree on the
    samples 3 and 4 only."""
    return ModelComparison(
        norm="Linf",
        eps=0.1,
        control="control",
        attacks=["clean", "apgd-ce"],
        cascade=["bpda-apgd-ce"],
        per_sample={
            "control": {
                "clean": _bits("1111111111"),
                "apgd-ce": _bits("1111000000"),
                "bpda-apgd-ce": _bits("1110000000"),
            },
            "meansparse": {
                "clean": _bits("1111111111"),
                "apgd-ce": _bits("1111111000"),
                "bpda-apgd-ce": _bits("1111100000"),
            },
        },
        settings={"control": "alpha 0", "meansparse": "alpha 0.3"},
    )


def test_paired_differences_and_what_each_attack_adds_match_a_hand_count():
    result = _hand_made()
    assert result.accuracy("control", "best_known") == 30.0
    assert result.accuracy("meansparse", "best_known") == 50.0
    gain, error = result.difference("meansparse")
    assert gain == pytest.approx(20.0)
    assert error == pytest.approx(100 * math.sqrt(2) / 10)  # two discordant samples of ten
    assert result.difference("meansparse", "clean") == (0.0, 0.0)
    # +20 points is far above the +1 target but within two standard errors (28.3): not a gain yet
    assert not result.meets_target("meansparse")
    assert result.first_breaks("meansparse") == {"apgd-ce": 30.0, "bpda-apgd-ce": 20.0}
    assert result.first_breaks("control") == {"apgd-ce": 60.0, "bpda-apgd-ce": 10.0}
    table = result.table()
    assert "| meansparse | +0.00 ± 0.00 | +20.00 ± 14.14 | no |" in table
    assert "NOT met by any model" in table and "bpda-apgd-ce (cascade)" in table


def test_a_clear_gain_meets_the_target_unless_clean_accuracy_pays_for_it():
    n = 400
    control = {"clean": dict.fromkeys(range(n), True), "apgd-ce": {i: i < 200 for i in range(n)}}
    better = {"clean": dict.fromkeys(range(n), True), "apgd-ce": {i: i < 220 for i in range(n)}}
    costly = {"clean": {i: i >= 4 for i in range(n)}, "apgd-ce": {i: 4 <= i < 224 for i in range(n)}}
    result = ModelComparison(
        "Linf",
        0.1,
        "control",
        ["clean", "apgd-ce"],
        [],
        {"control": control, "better": better, "costly": costly},
    )
    # +5 points, 20 discordant samples: SE = 100 * sqrt(20) / 400 = 1.118, so 5 > 2 SE
    assert result.difference("better") == pytest.approx((5.0, 100 * math.sqrt(20) / n))
    assert result.meets_target("better")
    # the same robust gain with 1 point of clean accuracy lost (4 of 400) is not counted
    assert result.difference("costly", "clean")[0] == pytest.approx(-1.0)
    assert not result.meets_target("costly")
    assert result.conclusion() == (
        "Target (at least +1 point of best known over the control beyond 2 paired standard errors, losing at most "
        "0.5 points of clean accuracy) met by: better."
    )


def test_the_comparison_round_trips_through_json_and_plots_standalone():
    result = _hand_made()
    again = ModelComparison.from_json(json.loads(json.dumps(result.to_json())))
    assert again.table() == result.table()
    assert again.to_json()["versus_control"]["meansparse"]["best_known"]["difference"] == pytest.approx(20.0)
    figure = result.plot()
    (axes,) = figure.axes
    assert "difference from the control" in axes.get_xlabel()
    assert result.metrics()[0]["compare/meansparse/vs_control/best_known"] == pytest.approx(20.0)
    with pytest.raises(ConfigurationError, match="control"):
        ModelComparison("Linf", 0.1, "nobody", ["clean"], [], {"control": {"clean": {0: True}}})


def _sparse_model(seed: int) -> tuple[nn.Module, TensorDataset]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 5)).eval()
    x = torch.rand(40, 3, 8, 8)
    y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 5  # a few clean mistakes, which the cascade must skip
    sparse = sparsify(model, x[:1])
    calibrate(sparse, [x], progress=False)
    return sparse, TensorDataset(x, y)


def test_compare_models_cascade_gives_the_best_known_of_the_same_attacks_run_in_full():
    sparse, data = _sparse_model(0)
    set_alpha(sparse, 0.5)
    threat = ThreatModel("Linf", 0.03)
    cascade = AttackConfig(names=["clean", "apgd-ce"], n_iter=5, cascade=["bpda-apgd-ce", "transfer-base"])
    full = AttackConfig(names=["clean", "apgd-ce", "bpda-apgd-ce", "transfer-base"], n_iter=5)
    models = {"control": sparse, "same": sparse}
    result = compare_models(models, data, control="control", attacks=cascade, threat=threat, batch_size=40)
    # independent: every attack on every sample, then the per-sample AND
    evaluation = RobustnessEvaluation(full, threat, diagnostics=None)
    independent = evaluation.columns(
        run_tasks(sparse, data, evaluation.tasks([("m", None)]), batch_size=40), "m"
    )
    expected = {i: all(independent[a][i] for a in independent) for i in range(len(data))}
    assert result.verdicts("control", "best_known") == expected
    assert 0 < sum(expected.values()) < len(data)  # the attacks break some samples, not all
    # a model compared with itself: no difference and no discordant sample
    assert result.difference("same") == (0.0, 0.0)
    # the indicators of attack failure ran on every model, and travel through the JSON and the Markdown
    entries = result.to_json()["diagnostics"]
    assert {e["variant"] for e in entries} == {"control", "same"}
    assert all({"indicator", "variant", "eps", "measured", "fired"} <= set(e) for e in entries)
    assert {e["indicator"] for e in entries} >= {"randomness", "operator_band", "adaptive_beats_exact"}
    assert ModelComparison.from_json(json.loads(json.dumps(result.to_json()))).to_json() == result.to_json()
    assert "## Can this number be trusted?" in result.table()
    # each cascade attack ran only on the survivors of everything before it
    for name in ("bpda-apgd-ce", "transfer-base"):
        assert not any(
            result.per_sample["control"][name][i] for i in range(len(data)) if not independent["apgd-ce"][i]
        )
    with pytest.raises(ConfigurationError, match="control"):
        compare_models(models, data, control="base", attacks=cascade, threat=threat)
