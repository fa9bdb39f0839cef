"""The report's sanity checks flag what they must, and its worst case is a per-sample AND."""

from __future__ import annotations

from meansparse_pl.report import RobustnessReport, VariantResult, summarise


def _report(rows, large=None):
    results = [VariantResult(name, alpha, eps, acc) for name, alpha, eps, acc in rows]
    report = RobustnessReport(
        "Linf", 100, ["clean", "apgd-ce", "bpda-apgd-ce", "square"], results, large_eps=0.5
    )
    report.large_eps_check = large or {}
    return report


def test_clean_report_passes_every_check():
    report = _report(
        [
            (
                "base",
                0.0,
                0.03,
                {"clean": 90, "apgd-ce": 50, "bpda-apgd-ce": 50, "square": 55, "best_known": 49},
            ),
            (
                "base",
                0.0,
                0.06,
                {"clean": 90, "apgd-ce": 20, "bpda-apgd-ce": 20, "square": 30, "best_known": 19},
            ),
        ],
        large={"base": 0.0},
    )
    checks = report.sanity_checks()
    assert not [c for c in checks if c.startswith(("FAIL", "FLAG"))], checks
    assert any("falls as epsilon grows" in c for c in checks)


def test_masking_and_impossible_numbers_are_flagged():
    report = _report(
        [
            (
                "meansparse",
                0.3,
                0.03,
                {"clean": 90, "apgd-ce": 60, "bpda-apgd-ce": 52, "square": 45, "best_known": 44},
            ),
            (
                "meansparse",
                0.3,
                0.06,
                {"clean": 90, "apgd-ce": 95, "bpda-apgd-ce": 50, "square": 50, "best_known": 48},
            ),
        ],
        large={"meansparse": 30.0},
    )
    text = "\n".join(report.sanity_checks())
    assert "black-box square (45.00) beats every white-box attack" in text
    assert "BPDA-APGD-CE (straight-through backward) is 8.00 points below APGD-CE" in text
    assert "robust accuracy above clean for ['apgd-ce']" in text
    assert "best-known accuracy rises with epsilon" in text
    assert "FAIL meansparse: accuracy 30.00% at eps=0.5" in text
    table = report.table()
    assert "**best known (per-sample worst case)**" in table and "Sanity checks:" in table


def test_summarise_is_a_per_sample_and():
    per_sample = {
        "clean": {0: True, 1: True, 2: True, 3: False},
        "apgd-ce": {0: True, 1: False, 2: True, 3: False},
        "apgd-dlr": {0: True, 1: True, 2: False, 3: False},
    }
    out = summarise(per_sample, ["clean", "apgd-ce", "apgd-dlr", "apgd-ce+dlr"])
    assert out == {"clean": 75.0, "apgd-ce": 50.0, "apgd-dlr": 50.0, "apgd-ce+dlr": 25.0, "best_known": 25.0}


def test_the_channel_histogram_leaves_the_models_alphas_as_they_were(tmp_path):
    """Before: the histogram set its alpha on every operator and left it there (the model then ran at the
    histogram's alpha, not the checkpoint's)."""
    import torch
    from conftest import FunctionalResNet, make_batches, randomize_batchnorm
    from torch.utils.data import TensorDataset

    from meansparse_pl import alphas_of, calibrate, set_alpha, sparsify
    from meansparse_pl.report import channel_histogram

    model = sparsify(randomize_batchnorm(FunctionalResNet()).eval(), (3, 8, 8))
    batches = make_batches((3, 8, 8), 16, 8, seed=3)
    calibrate(model, batches, progress=False)
    set_alpha(model, [0.1, 0.2, 0.3, 0.4, 0.5])
    data = TensorDataset(torch.cat(batches), torch.zeros(16, dtype=torch.long))
    channel_histogram(model, data, 1, 0.9, tmp_path / "histogram.png")
    assert all(abs(a - b) < 1e-7 for a, b in zip(alphas_of(model), [0.1, 0.2, 0.3, 0.4, 0.5], strict=True))
    assert (tmp_path / "histogram.png").stat().st_size > 1000
