"""One result protocol for the evaluation report, the comparison and the alpha search: a table, JSON that reads
back to the same result, a plot with labelled axes and error bars, and the numbers as logger rows; one writer."""

from __future__ import annotations

import json
import math

import pytest
from matplotlib.container import ErrorbarContainer
from matplotlib.figure import Figure

from meansparse_pl.alpha_search import AlphaSearchResult
from meansparse_pl.comparison import ModelComparison
from meansparse_pl.io import Result, write_result
from meansparse_pl.report import RobustnessReport, VariantResult


def _report() -> RobustnessReport:
    results = [
        VariantResult("base", 0.0, 0.1, {"clean": 80.0, "apgd-ce": 50.0, "best_known": 48.0}),
        VariantResult("meansparse", 0.25, 0.1, {"clean": 81.0, "apgd-ce": 52.0, "best_known": 47.0}),
    ]
    return RobustnessReport("Linf", 200, ["clean", "apgd-ce"], results, {"base": 0.0}, 0.5)


def _comparison() -> ModelComparison:
    verdicts = {
        "control": {"clean": {0: True, 1: True, 2: False}, "apgd-ce": {0: True, 1: False, 2: False}},
        "meansparse": {"clean": {0: True, 1: True, 2: True}, "apgd-ce": {0: True, 1: True, 2: False}},
    }
    return ModelComparison(
        "Linf", 0.1, "control", ["clean", "apgd-ce"], [], verdicts, {"meansparse": "alpha 0.25"}
    )


def _search() -> AlphaSearchResult:
    accuracy = {a: {"clean": 80.0 - a, "apgd-ce": 50.0 + a, "worst_case": 49.0 + a} for a in (0.0, 0.25, 0.5)}
    return AlphaSearchResult([0.0, 0.25, 0.5], ["apgd-ce"], accuracy, "worst_case", 0.5, 0.1, "Linf", 100)


@pytest.mark.parametrize(
    "make", [_report, _comparison, _search], ids=["report", "comparison", "alpha_search"]
)
def test_every_result_keeps_the_one_protocol(make, tmp_path):
    result = make()
    assert isinstance(result, Result)
    data = json.loads(json.dumps(result.to_json()))
    again = type(result).from_json(data)
    assert again.to_json() == data and again.table() == result.table()
    rows = result.metrics()
    assert isinstance(rows, list) and rows and all(isinstance(v, float) for row in rows for v in row.values())
    figure = result.plot()
    assert isinstance(figure, Figure)
    axes = figure.axes[0]
    assert axes.get_xlabel() and axes.get_title()
    written = write_result(tmp_path, "result", result)
    assert sorted(p.name for p in written) == ["result.json", "result.md", "result.png"]
    assert (tmp_path / "result.md").read_text() == result.table() + "\n"


def test_the_reports_error_bars_are_one_binomial_standard_error():
    report = _report()
    axes = report.plot().axes[0]
    # the first bar group is the base model's: clean 80%, apgd-ce 50%, best known 48% of 200 images
    errorbars = [c for c in axes.containers if isinstance(c, ErrorbarContainer)][0]
    half_widths = []
    for segment in errorbars.lines[2][0].get_segments():
        (left, _), (right, _) = segment
        half_widths.append((right - left) / 2)
    expected = [math.sqrt(p * (100 - p) / 200) for p in (80.0, 50.0, 48.0)]
    assert half_widths == pytest.approx(expected)
