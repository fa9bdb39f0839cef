"""Indicators of attack failure: hand-made models, each built to trip one indicator, with a twin that must not,
and an honest small network that trips nothing; the binomial rule against a brute-force computation; the
per-sample indicators on hand-written verdicts; the masking cause named in the reports."""

from __future__ import annotations

import copy
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl import AttackConfig, ThreatModel, calibrate, diagnose, run_attack, sparsify
from meansparse_pl.alpha_search.result import flags_for
from meansparse_pl.config import DiagnosticsConfig
from meansparse_pl.diagnostics import (
    Diagnostics,
    Indicator,
    beyond_noise,
    binomial_tail,
    quick_diagnostics,
    verdict_indicators,
)
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.report import RobustnessReport, VariantResult

CLASSES = 3
THREAT = ThreatModel("Linf", 0.1)


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Three classes of 1x8x8 images around fixed prototypes: separable, but not at eps 0.1 for every sample."""
    prototypes = torch.rand(CLASSES, 1, 8, 8, generator=torch.Generator().manual_seed(123)) * 0.6 + 0.2
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    return (prototypes[y] + 0.25 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1), y


@pytest.fixture(scope="module")
def honest() -> nn.Module:
    torch.manual_seed(0)
    x, y = _blobs(2000, 1)
    net = nn.Sequential(
        nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, CLASSES)
    )
    optimiser = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(30):
        for start in range(0, 2000, 200):
            loss = F.cross_entropy(net(x[start : start + 200]), y[start : start + 200])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return net.eval()


@pytest.fixture(scope="module")
def test_data() -> tuple[torch.Tensor, torch.Tensor]:
    return _blobs(300, 2)


@pytest.fixture(scope="module")
def sparse(honest) -> nn.Module:
    x, y = _blobs(2000, 1)
    model = sparsify(copy.deepcopy(honest), x[:1])
    calibrate(model, [(x[i : i + 500], y[i : i + 500]) for i in range(0, 2000, 500)], progress=False)
    return model


class Quantised(nn.Module):
    """Input quantisation: ``round`` has a zero gradient everywhere (a shattered gradient); with
    ``straight_through`` the backward passes the gradient on (the twin)."""

    def __init__(self, net: nn.Module, straight_through: bool = False) -> None:
        super().__init__()
        self.net, self.straight_through = net, straight_through

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = torch.round(x * 4) / 4
        return self.net(x + (q - x).detach() if self.straight_through else q)


class Noisy(nn.Module):
    """Input noise at every forward pass (a randomised defence); the twin draws the same noise every time."""

    def __init__(self, net: nn.Module, fixed: bool = False) -> None:
        super().__init__()
        self.net, self.fixed = net, fixed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.Generator().manual_seed(7) if self.fixed else None
        return self.net(x + 0.05 * torch.randn(x.shape, generator=g).to(x.device))


class Scaled(nn.Module):
    """Logits times ``scale``: at 1e4 the softmax saturates and cross-entropy's gradient is exactly zero."""

    def __init__(self, net: nn.Module, scale: float) -> None:
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x) * self.scale


def _fired(model, data, attacks=None, variants=None) -> set[str]:
    found = diagnose(
        model,
        data,
        threat=THREAT,
        attacks=attacks or AttackConfig(n_iter=100),
        config=DiagnosticsConfig(subset=100),
        variants=variants,
    )
    assert {i.indicator for i in found.indicators} >= {
        "randomness",
        "unavailable_gradients",
        "loss_saturation",
        "incomplete_optimisation",
        "silent_success",
        "attack_budget",
        "unconstrained_failure",
        "not_monotone_in_eps",
    }
    return {i.indicator for i in found.fired()}


# Each hand-made model, the indicator it is built to trip, and the ones that honestly follow from it: a
# shattered or saturated gradient also leaves APGD-CE unable to move at a large eps; a random forward pass
# also makes the attack's "success" irreproducible and its restarts disagree; a band that swallows nearly every
# activation leaves samples without any input gradient and a nearly constant output no radius can change.
CASES = {
    "quantised": ({"unavailable_gradients"}, {"unconstrained_failure"}),
    "noisy": ({"randomness"}, {"silent_success", "attack_budget", "incomplete_optimisation"}),
    "scaled": ({"loss_saturation"}, {"unconstrained_failure"}),
    "meansparse_alpha_2": ({"operator_band"}, {"unavailable_gradients", "unconstrained_failure"}),
    "stopped_early": ({"incomplete_optimisation"}, {"attack_budget"}),
}


def _case(name, honest, sparse, twin: bool):
    attacks = None
    variants = None
    if name == "quantised":
        model = Quantised(honest, straight_through=twin)
    elif name == "noisy":
        model = Noisy(honest, fixed=twin)
    elif name == "scaled":
        model = Scaled(honest, 1.0 if twin else 1e4)
    elif name == "meansparse_alpha_2":
        model, variants = sparse, {"model": 0.25 if twin else 2.0}
    else:
        model, attacks = honest, AttackConfig(n_iter=100 if twin else 2)
    return model, attacks, variants


def test_an_honest_small_network_trips_nothing(honest, test_data):
    assert _fired(honest, test_data) == set()


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_hand_made_model_trips_its_indicator_and_its_twin_does_not(name, honest, sparse, test_data):
    built, consequences = CASES[name]
    model, attacks, variants = _case(name, honest, sparse, twin=False)
    fired = _fired(model, test_data, attacks, variants)
    assert built <= fired, fired
    assert fired <= built | consequences, f"{name} also fired {fired - built - consequences}"
    model, attacks, variants = _case(name, honest, sparse, twin=True)
    assert _fired(model, test_data, attacks, variants) == set()


def test_the_operator_band_measures_what_the_band_removes(sparse, test_data):
    found = diagnose(
        sparse,
        test_data,
        threat=THREAT,
        config=DiagnosticsConfig(subset=50, expensive=False),
        variants={"a": 0.0, "b": 2.0},
    )
    at_zero, at_two = (
        found.find("operator_band", "a")[0].measured,
        found.find("operator_band", "b")[0].measured,
    )
    # alpha 0: the band is empty, the exact gradient is the straight-through one
    assert at_zero["mean_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert at_zero["gradient_mass_removed"] == [0.0] * len(at_zero["gradient_mass_removed"])
    assert at_zero["in_band_clean"] == [0.0] * len(at_zero["in_band_clean"])
    # alpha 2: most activations are inside the band and most of the gradient mass is removed
    assert min(at_two["in_band_clean"]) > 0.9 and min(at_two["gradient_mass_removed"]) > 0.9
    assert at_two["mean_cosine"] < 0.5


def test_the_binomial_rule_against_exact_fractions():
    for n, rate, count in [(100, 0.01, 4), (73, 0.05, 9), (300, 0.02, 1), (20, 0.3, 20), (50, 0.0, 1)]:
        exact = sum(
            Fraction(math.comb(n, k)) * Fraction(rate) ** k * (1 - Fraction(rate)) ** (n - k)
            for k in range(count, n + 1)
        )
        assert binomial_tail(count, n, rate) == pytest.approx(float(exact), rel=1e-9, abs=1e-300)
    assert beyond_noise(0, 100, 0.0, 0.01) == (False, 1.0)
    assert beyond_noise(1, 100, 0.0, 0.01)[0]
    # 2 of 100 at a tolerated 1% is noise (p = 0.26); 6 of 100 is not (p = 0.0005)
    assert not beyond_noise(2, 100, 0.01, 0.01)[0] and beyond_noise(6, 100, 0.01, 0.01)[0]


def _verdicts(n: int, broken: set[int]) -> dict[int, bool]:
    return {i: i not in broken for i in range(n)}


def test_per_sample_indicators_on_hand_written_verdicts():
    n = 100
    apgd = _verdicts(n, set(range(30)))
    blocks = {
        ("broken", 0.1): {"apgd-ce": apgd, "square": _verdicts(n, set(range(25)) | set(range(40, 50)))},
        ("fine", 0.1): {"apgd-ce": apgd, "square": _verdicts(n, set(range(28)) | {31})},
        ("masked", 0.1): {"apgd-ce": apgd, "bpda-apgd-ce": _verdicts(n, set(range(38)))},
    }
    found = {(i.indicator, i.variant): i for i in verdict_indicators(blocks, 0.01)}
    assert found[("black_box_beats_white_box", "broken")].measured["count"] == 10
    assert found[("black_box_beats_white_box", "broken")].fired
    assert found[("black_box_beats_white_box", "fine")].measured["count"] == 1
    assert not found[("black_box_beats_white_box", "fine")].fired
    assert found[("adaptive_beats_exact", "masked")].measured["count"] == 8
    assert found[("adaptive_beats_exact", "masked")].fired
    # accuracy that rises with eps: 5 samples robust at 0.2 but broken at 0.1
    blocks = {
        ("m", 0.1): {"apgd-ce": _verdicts(n, set(range(30)))},
        ("m", 0.2): {"apgd-ce": _verdicts(n, set(range(5, 40)))},
    }
    (monotone,) = verdict_indicators(blocks, 0.01)
    assert (monotone.indicator, monotone.eps, monotone.measured["count"], monotone.fired) == (
        "not_monotone_in_eps",
        0.2,
        5,
        True,
    )


def test_the_masking_flag_names_the_cause_it_measured(honest, sparse, test_data):
    noisy_sparse = Noisy(sparse)
    dataset = torch.utils.data.TensorDataset(*test_data)

    def masking_causes(model, data, alphas):
        found = quick_diagnostics(model, data, alphas)
        return {a: found.masking_cause(f"alpha={a:g}") for a in alphas}

    causes = masking_causes(noisy_sparse, dataset, [0.25])
    assert "randomness" in causes[0.25] and "band" not in causes[0.25]
    causes = masking_causes(sparse, dataset, [0.0, 0.25, 2.0])
    assert causes[0.0].startswith("not identified")  # an empty band removes nothing
    assert "removes up to" in causes[0.25]  # no indicator fired, but the band's measured effect is named
    assert "operators' band" in causes[2.0] and "removes up to" not in causes[2.0]  # operator_band fired
    row = {"clean": 90.0, "apgd-ce": 60.0, "bpda-apgd-ce": 55.0}
    (flag,) = flags_for(0.25, row, 100, 100, causes[2.0])
    assert "operators' band" in flag and "cause measured" in flag
    # the evaluation report's flag: the cause comes from the diagnostics of that variant
    randomness = Indicator("randomness", "meansparse", 0.1, {"count": 5}, True, "rule", "use eot_iter")
    report = RobustnessReport(
        "Linf",
        100,
        ["clean", "apgd-ce", "bpda-apgd-ce"],
        [VariantResult("meansparse", 0.25, 0.1, {**row, "best_known": 55.0})],
        diagnostics=Diagnostics([randomness], subset=100),
    )
    (line,) = [f for f in report.sanity_checks() if f.startswith("FLAG")]
    assert "randomness" in line and "operators' band" not in line
    data = report.to_json()
    assert data["diagnostics"][0] | {} == randomness.to_json()
    assert "## Can this number be trusted?" in report.table()
    assert report.metrics()[0]["evaluate/diagnostics/meansparse/eps=0.1/randomness/fired"] == 1.0


def test_results_round_trip_and_say_no_when_an_indicator_fired():
    fired = Indicator("attack_budget", "base", 0.1, {"samples": 70, "count": 9}, True, "rule", "raise n_iter")
    calm = Indicator("randomness", "base", 0.1, {"samples": 100, "count": 0}, False, "rule", "use eot_iter")
    found = Diagnostics([fired, calm], subset=100, seconds=1.5)
    again = Diagnostics.from_json(found.to_json(), 100, 1.5)
    assert again == Diagnostics(
        [fired, Indicator("randomness", "base", 0.1, calm.measured, False, "rule", "")], 100, 1.5
    )
    assert found.verdict().startswith("No: 1 of 2 indicators fired (attack_budget (base))")
    assert "raise n_iter" in found.table() and "use eot_iter" not in found.table()
    assert Diagnostics([calm]).verdict().startswith("No indicator of attack failure fired")
    with pytest.raises(ConfigurationError, match="not a diagnostics entry"):
        Indicator.from_json({"indicator": "x"})


@pytest.mark.parametrize(
    "options, match",
    [
        ({"subset": 0}, "diagnostics.subset"),
        ({"forwards": 1}, "at least 2"),
        ({"significance": 0.7}, "test level"),
        ({"large_eps": -1.0}, "large_eps"),
        ({"expensive": "yes"}, "true or false"),
    ],
)
def test_bad_diagnostics_options_are_one_clear_error(options, match):
    with pytest.raises(ConfigurationError, match=match):
        DiagnosticsConfig(**options)


def test_eot_iter_reaches_every_gradient_attack_and_averages_gradients(honest, test_data):
    x, y = test_data[0][:20], test_data[1][:20]
    calls = {"n": 0}

    class Counting(nn.Module):
        def forward(self, inputs):
            calls["n"] += 1
            return honest(inputs)

    counting = Counting()
    verdicts = {}
    for eot in (1, 3):
        calls["n"] = 0
        verdicts[eot] = run_attack("apgd-ce", counting, x, y, eps=0.1, n_iter=5, eot_iter=eot)
        verdicts[f"forwards {eot}"] = calls["n"]
    # APGD: one gradient per iteration and the first point, eot_iter times each, plus the same bookkeeping
    assert verdicts["forwards 3"] - verdicts["forwards 1"] == 2 * (5 + 1)
    # a deterministic model: the average of equal gradients has the same sign, so the same verdicts
    assert torch.equal(verdicts[1], verdicts[3])
    pgd_1 = run_attack("pgd", honest, x, y, eps=0.1, steps=5)
    pgd_3 = run_attack("pgd", honest, x, y, eps=0.1, steps=5, eot_iter=3)
    assert torch.equal(pgd_1, pgd_3)
    from meansparse_pl.attacks import options_for

    config = AttackConfig(names=["apgd-ce", "square"], eot_iter=20)
    assert options_for(config, "apgd-ce")["eot_iter"] == 20
    assert "eot_iter" not in options_for(config, "square")
    with pytest.raises(ConfigurationError, match="eot_iter"):
        AttackConfig(eot_iter=0)


def test_diagnostics_leave_a_model_in_train_mode_untouched(sparse, test_data):
    """A freshly loaded checkpoint is in train mode: no forward of the diagnostics may update its BatchNorm
    statistics, alphas, backward modes or mode."""
    model = nn.Sequential(nn.BatchNorm2d(1), copy.deepcopy(sparse)).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    diagnose(
        model, test_data, threat=THREAT, attacks=AttackConfig(n_iter=5), config=DiagnosticsConfig(subset=20)
    )
    quick_diagnostics(model, torch.utils.data.TensorDataset(*test_data), [0.5])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_alpha_search_carries_the_cheap_indicators_of_every_alpha(sparse, test_data):
    from meansparse_pl import AlphaSearch, AlphaSearchResult

    dataset = torch.utils.data.TensorDataset(*test_data)
    search = AlphaSearch(
        alphas=[0.0, 2.0], threat=THREAT, attacks=AttackConfig(names=["apgd-ce", "bpda-apgd-ce"], n_iter=5)
    )
    result = search.run(sparse, torch.utils.data.Subset(dataset, range(64)))
    found = {(i.indicator, i.variant): i for i in result.diagnostics.indicators}
    assert set(found) == {
        (name, f"alpha={a:g}")
        for a in (0.0, 2.0)
        for name in ("randomness", "unavailable_gradients", "loss_saturation", "operator_band")
    }
    assert found[("operator_band", "alpha=2")].fired and not found[("operator_band", "alpha=0")].fired
    # the masking flag at alpha 2, if the numbers raise one, names the band the probes measured
    assert all("operators' band" in flag for flag in result.flags if flag.startswith("alpha=2"))
    again = AlphaSearchResult.from_json(result.to_json())
    assert again.diagnostics.to_json() == result.diagnostics.to_json()
    assert "Diagnostics (64 samples" in result.table() and "operator_band (alpha=2)" in result.table()
    assert result.metrics()[-1]["alpha_search/diagnostics/alpha=2/eps=0.1/operator_band/fired"] == 1.0


def _attacked(model, data, names, eps=0.1, **options) -> dict:
    x, y = data[0][:100], data[1][:100]
    return {
        name: dict(enumerate(run_attack(name, model, x, y, eps=eps, **options.get(name, {})).tolist()))
        for name in names
    }


def test_square_beats_apgd_on_the_shattered_gradient_model_and_not_on_its_twin(honest, test_data):
    """Real attacks: Square breaks the input-quantised model where APGD-CE is stuck on a zero gradient; on the
    twin, the straight-through quantiser, APGD-CE breaks everything Square breaks."""
    square = {"square": {"n_queries": 1000}}
    fired = {}
    for label, model in (
        ("shattered", Quantised(honest)),
        ("twin", Quantised(honest, straight_through=True)),
    ):
        # at eps 0.2 a step can cross a quantisation bin (width 0.25): Square finds it, a zero gradient never does
        blocks = {(label, 0.2): _attacked(model, test_data, ["apgd-ce", "square"], eps=0.2, **square)}
        (black,) = [i for i in verdict_indicators(blocks, 0.01) if i.indicator == "black_box_beats_white_box"]
        fired[label] = black
    assert fired["shattered"].fired and not fired["twin"].fired, (
        fired["shattered"].measured,
        fired["twin"].measured,
    )
