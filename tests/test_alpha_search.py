"""AlphaSearch: the selection rule on hand-made tables, the grid checks, and a real small search."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from meansparse_pl import calibrate, sparsify
from meansparse_pl.alpha_search import AlphaSearch, AlphaSearchResult, check_alphas
from meansparse_pl.errors import ConfigurationError


def _result(rows: dict[float, tuple[float, float, float]], criterion: str = "worst_case", drop: float = 0.5):
    """rows: alpha -> (clean, apgd-ce, worst_case)."""
    accuracy = {a: {"clean": c, "apgd-ce": ce, "worst_case": w} for a, (c, ce, w) in rows.items()}
    return AlphaSearchResult(sorted(rows), ["apgd-ce"], accuracy, criterion, drop, 8 / 255, "Linf", 100)


def test_rule_picks_highest_worst_case_within_the_clean_budget():
    rows = {
        0.0: (90.0, 50.0, 48.0),
        0.2: (89.6, 53.0, 49.5),
        0.3: (89.0, 58.0, 51.0),
        0.4: (89.5, 60.0, 47.0),
    }
    result = _result(rows)
    # 0.3 has the best worst case but loses 1.0 clean point (> 0.5): not eligible; 0.4 is eligible but its
    # worst case is low (its APGD gain is masking); 0.2 wins.
    assert result.suggestion() == 0.2
    assert _result(rows, drop=1.0).suggestion() == 0.3
    # the paper's rule (highest APGD-CE) picks the masked 0.4
    assert _result(rows, criterion="apgd").suggestion() == 0.4


def test_ties_go_to_the_smaller_alpha_and_base_is_a_valid_answer():
    assert _result({0.0: (90, 50, 48), 0.1: (90, 50, 48), 0.2: (90, 49, 48)}).suggestion() == 0.0
    assert _result({0.0: (90, 50, 48), 0.1: (80, 70, 70)}).suggestion() == 0.0


def test_table_json_and_plot(tmp_path):
    result = _result({0.0: (90.0, 50.0, 48.0), 0.2: (89.6, 53.0, 49.5)})
    table = result.table()
    assert "0.2 **(chosen)**" in table and "Rule: highest worst-case" in table
    data = result.to_json()
    assert data["suggestion"] == 0.2 and data["accuracy"]["0.2"]["clean"] == 89.6
    png = result.plot(tmp_path / "a.png")
    assert Path(png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("alphas", [[], [0.1, -0.2], [float("nan")], [float("inf")]])
def test_bad_grids_are_refused(alphas):
    with pytest.raises(ConfigurationError, match="alpha"):
        check_alphas(alphas)


def test_zero_is_added_and_grid_sorted():
    assert check_alphas([0.3, 0.15, 0.3]) == [0.0, 0.15, 0.3]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eps": 0}, "eps"),
        ({"eps": -1}, "eps"),
        ({"criterion": "best"}, "criterion"),
        ({"max_clean_drop": -1}, "max_clean_drop"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ConfigurationError, match=message):
        AlphaSearch(**kwargs)


def _tiny_sparse_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    x = torch.rand(48, 3, 8, 8)
    y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 10  # some clean mistakes
    sparse = sparsify(model, x[:1])
    calibrate(sparse, [x], progress=False)
    return sparse, TensorDataset(x, y)


def test_real_search_is_consistent_and_resumes_to_the_same_numbers(tmp_path):
    sparse, data = _tiny_sparse_model()
    search = AlphaSearch(alphas=[0, 0.3, 1.0], eps=0.03, n_iter=4, batch_size=16)
    first = search.run(sparse, data, state_path=tmp_path / "state")
    for alpha in first.alphas:
        row = first.accuracy[alpha]
        assert (
            row["worst_case"]
            <= min(row["clean"], row["apgd-ce"], row["apgd-dlr"], row["bpda-apgd-ce"]) + 1e-9
        )
        assert row["apgd-ce+dlr"] <= min(row["apgd-ce"], row["apgd-dlr"]) + 1e-9
    # alpha = 0 is the base model: BPDA through identity operators equals exact-gradient APGD
    assert first.accuracy[0.0]["bpda-apgd-ce"] == first.accuracy[0.0]["apgd-ce"]
    assert first.accuracy[0.0]["clean"] == pytest.approx(100.0 * 38 / 48)
    # a second run reads every result from the state file (no attack runs) and gives identical numbers
    import meansparse_pl.attacks as attacks

    calls = []
    original = attacks.run_attack
    attacks.run_attack = lambda *a, **k: calls.append(a) or original(*a, **k)
    try:
        again = search.run(sparse, data, state_path=tmp_path / "state")
    finally:
        attacks.run_attack = original
    assert calls == [] and again.accuracy == first.accuracy
    # a different model refuses the old state instead of mixing results
    with torch.no_grad():
        next(sparse.parameters()).add_(0.1)
    with pytest.raises(ConfigurationError, match="different run"):
        search.run(sparse, data, state_path=tmp_path / "state")


def test_interrupted_search_resumes_to_the_same_result(tmp_path):
    sparse, data = _tiny_sparse_model()
    search = AlphaSearch(alphas=[0, 0.5], eps=0.03, n_iter=4, batch_size=16)
    reference = search.run(sparse, data)
    import meansparse_pl.attacks as attacks

    original = attacks.run_attack
    seen = {"n": 0}

    def crash_after_a_few(*args, **kwargs):
        seen["n"] += 1
        if seen["n"] > 5:
            raise RuntimeError("simulated crash")
        return original(*args, **kwargs)

    attacks.run_attack = crash_after_a_few
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            search.run(sparse, data, state_path=tmp_path / "state")
    finally:
        attacks.run_attack = original
    assert (tmp_path / "state.rank0").exists()
    resumed = search.run(sparse, data, state_path=tmp_path / "state")
    assert resumed.accuracy == reference.accuracy
