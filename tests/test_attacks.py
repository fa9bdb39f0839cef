"""Tests of meansparse_pl.attacks: training-time PGD / TRADES and the evaluation attack registry."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from meansparse_pl.attacks import (
    pgd_perturb,
    trades_adversarial,
    trades_loss,
    trades_objective,
)
from meansparse_pl.errors import ConfigurationError
from meansparse_pl.modes import eval_mode

IMAGE_SHAPE = (1, 4, 4)
DIM = 16


def _blobs(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two-class synthetic images in [0, 1]: class means 0.35 / 0.65 per pixel plus noise; separable but with a
    margin small enough (per-pixel 0.15) that an eps = 0.1 Linf attack flips a fair share of the samples."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    centre = 0.35 + 0.3 * y.float()
    x = centre.view(-1, 1, 1, 1) + 0.12 * torch.randn(n, *IMAGE_SHAPE, generator=g)
    return x.clamp(0, 1), y


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(DIM, 16), nn.ReLU(), nn.Linear(16, 2))


def _train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int = 200) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(epochs):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x, y = _blobs(64, seed=1)
    model = _train(_mlp(), x, y)
    for p in model.parameters():
        p.grad = None
    return model, x, y


# ------------------------------------------------------------------------------------- training: PGD
@pytest.mark.parametrize("norm", ["Linf", "L2"])
@pytest.mark.parametrize("random_start", [True, False])
def test_pgd_respects_ball_and_box(trained, norm, random_start):
    model, x, y = trained
    # Push samples to the box boundary so that the box constraint is active as well as the ball.
    x = x.clone()
    x[:8] = (x[:8] > 0.5).float()
    eps = 0.1 if norm == "Linf" else 0.5
    torch.manual_seed(3)
    x_adv = pgd_perturb(
        model, x, y, eps=eps, step_size=eps, steps=5, norm=norm, random_start=random_start
    )  # step = eps: hits the ball
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    delta = (x_adv - x).flatten(1)
    if norm == "Linf":
        assert float(delta.abs().max()) <= eps + 1e-7
        # Large steps must actually reach the surface of the ball somewhere (the test would be vacuous
        # if PGD did nothing).
        assert float(delta.abs().max()) >= eps - 1e-6
    else:
        norms = delta.norm(dim=1)
        assert float(norms.max()) <= eps * (1 + 1e-6)
        assert float(norms.max()) >= eps * 0.9


@pytest.mark.parametrize("norm,eps,step", [("Linf", 0.1, 0.025), ("L2", 0.4, 0.1)])
def test_pgd_increases_loss(trained, norm, eps, step):
    model, x, y = trained
    torch.manual_seed(0)
    x_adv = pgd_perturb(model, x, y, eps=eps, step_size=step, steps=10, norm=norm)
    with torch.no_grad():
        clean_loss = F.cross_entropy(model(x), y, reduction="none")
        adv_loss = F.cross_entropy(model(x_adv), y, reduction="none")
        clean_acc = (model(x).argmax(1) == y).float().mean()
        adv_acc = (model(x_adv).argmax(1) == y).float().mean()
    assert bool((adv_loss >= clean_loss - 1e-6).all())
    assert float(adv_loss.mean()) > 2 * float(clean_loss.mean())
    assert float(clean_acc) > 0.9 and float(adv_acc) < float(clean_acc)


def test_pgd_leaves_parameter_grads_and_mode_alone(trained):
    model, x, y = trained
    model.train()
    try:
        pgd_perturb(model, x, y, eps=0.1, step_size=0.02, steps=2)
        assert model.training
    finally:
        model.eval()
    assert all(p.grad is None for p in model.parameters())


def test_pgd_works_inside_no_grad_and_inference_mode(trained):
    model, x, y = trained
    torch.manual_seed(5)
    reference = pgd_perturb(model, x, y, eps=0.1, step_size=0.02, steps=3)
    with torch.no_grad():
        torch.manual_seed(5)
        under_no_grad = pgd_perturb(model, x, y, eps=0.1, step_size=0.02, steps=3)
    with torch.inference_mode():
        x_inf, y_inf = x.clone(), y.clone()  # inference tensors, as in a Lightning validation step
        torch.manual_seed(5)
        under_inference = pgd_perturb(model, x_inf, y_inf, eps=0.1, step_size=0.02, steps=3)
    assert torch.equal(reference, under_no_grad)
    assert torch.equal(reference, under_inference.clone())


def test_pgd_under_bf16_autocast(trained):
    model, x, y = trained
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd_perturb(model, x, y, eps=0.1, step_size=0.025, steps=5)
    assert x_adv.dtype == torch.float32
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-7
    with torch.no_grad():
        assert float(F.cross_entropy(model(x_adv), y)) > float(F.cross_entropy(model(x), y))


def test_pgd_kl_default_target_is_clean_logits(trained):
    model, x, y = trained
    torch.manual_seed(2)
    a = pgd_perturb(model, x, y, eps=0.1, step_size=0.02, steps=3, loss="kl")
    with torch.no_grad():
        target = model(x)
    torch.manual_seed(2)
    b = pgd_perturb(model, x, y, eps=0.1, step_size=0.02, steps=3, loss="kl", target_logits=target)
    assert torch.equal(a, b)
    with torch.no_grad():
        kl = F.kl_div(F.log_softmax(model(a), 1), F.softmax(target, 1), reduction="batchmean")
    assert float(kl) > 1e-3


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"eps": 0.0}, "eps"),
        ({"eps": -0.1}, "eps"),
        ({"eps": float("nan")}, "eps"),
        ({"steps": 0}, "steps"),
        ({"steps": 1.5}, "steps"),
        ({"step_size": 0.0}, "step_size"),
        ({"norm": "L1"}, "norm"),
        ({"loss": "mse"}, "loss"),
    ],
)
def test_pgd_configuration_errors(trained, kwargs, fragment):
    model, x, y = trained
    args = {"eps": 0.1, "step_size": 0.01, "steps": 2} | kwargs
    with pytest.raises(ConfigurationError) as info:
        pgd_perturb(model, x, y, **args)
    message = str(info.value)
    assert fragment in message and "\n" not in message


def test_pgd_rejects_normalised_inputs(trained):
    model, x, y = trained
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        pgd_perturb(model, x - 0.5, y, eps=0.1, step_size=0.01, steps=1)


# ---------------------------------------------------------------------------------- training: TRADES
def test_trades_objective_matches_hand_computation():
    clean = torch.tensor([[1.0, -0.5, 0.25], [0.0, 2.0, -1.0]], dtype=torch.float64)
    adv = torch.tensor([[0.5, 0.5, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0, 2])
    beta = 6.0

    def softmax(row):
        e = [torch.exp(v) for v in row]
        s = sum(e)
        return [v / s for v in e]

    ce = 0.0
    kl = 0.0
    for i in range(2):
        p = softmax(clean[i])
        q = softmax(adv[i])
        ce += -torch.log(p[int(y[i])])
        kl += sum(p[j] * (torch.log(p[j]) - torch.log(q[j])) for j in range(3))
    expected = ce / 2 + beta * kl / 2
    got = trades_objective(clean, adv, y, beta)
    assert got.dtype == torch.float64
    assert abs(float(got) - float(expected)) < 1e-12
    assert abs(float(trades_objective(clean, clean, y, beta)) - float(ce / 2)) < 1e-12
    # Autocast logits (bf16) are upcast: the loss is float32, never bf16.
    low = trades_objective(clean.bfloat16(), adv.bfloat16(), y, beta)
    assert low.dtype == torch.float32
    assert abs(float(low) - float(expected)) < 0.05


def test_trades_loss_is_objective_of_its_logits_and_modes():
    torch.manual_seed(0)
    seen_modes: list[bool] = []

    class Recorder(nn.Module):
        def forward(self, x):
            seen_modes.append(self.training)
            return x

    model = nn.Sequential(nn.Flatten(), nn.Linear(DIM, 8), nn.BatchNorm1d(8), Recorder(), nn.Linear(8, 3))
    x, _ = _blobs(12, seed=4)
    y = torch.arange(12) % 3
    model.train()
    running_before = model[2].running_mean.clone()
    torch.manual_seed(1)
    loss, clean_logits, adv_logits = trades_loss(model, x, y, eps=0.1, step_size=0.03, steps=3, beta=6.0)
    # Attack: 1 target forward + 3 steps in eval mode; loss: 2 forwards in train mode.
    assert seen_modes == [False] * 4 + [True, True]
    assert model.training and model[2].training
    # Only the two train-mode forwards updated BatchNorm's running mean (momentum 0.1 each).
    assert not torch.equal(model[2].running_mean, running_before)
    assert torch.allclose(loss, trades_objective(clean_logits, adv_logits, y, 6.0))
    loss.backward()
    assert model[1].weight.grad is not None
    # The adversarial logits are those of a point inside the ball: reproduce it.
    torch.manual_seed(1)
    with eval_mode(model):
        x_adv = trades_adversarial(model, x, eps=0.1, step_size=0.03, steps=3)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-7


def test_trades_adversarial_starts_near_x_and_increases_kl(trained):
    model, x, _ = trained
    torch.manual_seed(0)
    x_adv = trades_adversarial(model, x, eps=0.1, step_size=0.025, steps=10)
    with torch.no_grad():
        clean = model(x)
        kl = F.kl_div(F.log_softmax(model(x_adv), 1), F.softmax(clean, 1), reduction="batchmean")
    assert float(kl) > 0.05
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-7
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1


def test_eval_mode_restores_per_module_flags():
    model = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    model.train()
    model[1].eval()  # deliberately frozen part
    with eval_mode(model):
        assert not model.training and not model[0].training
    assert model.training and model[0].training and not model[1].training


@pytest.mark.parametrize(
    "kwargs,fragment", [({"beta": -1.0}, "beta"), ({"eps": 0.0}, "eps"), ({"steps": 0}, "steps")]
)
def test_trades_configuration_errors(trained, kwargs, fragment):
    model, x, y = trained
    args = {"eps": 0.1, "step_size": 0.01, "steps": 2, "beta": 6.0} | kwargs
    with pytest.raises(ConfigurationError, match=fragment):
        trades_loss(model, x, y, **args)


# ======================================================================================= evaluation
import importlib  # noqa: E402
import importlib.util  # noqa: E402
import sys  # noqa: E402
import types  # noqa: E402
from pathlib import Path  # noqa: E402

from meansparse_pl.attacks import (  # noqa: E402
    ATTACK_NAMES,
    adaptive_penalty,
    attack_options,
    band_mask,
    run_attack,
    worst_case,
)
from meansparse_pl.ops import MeanSparse, backward_mode, operators  # noqa: E402

N_CLASSES = 4
EPS = 0.04


def _torchattacks(module: str) -> types.ModuleType:
    """Import one torchattacks module (an independent implementation, for cross-checks only).

    torchattacks' package __init__ imports every attack, some of which need scipy (not a dependency of this
    project); loading the package under a private alias without running its __init__ keeps the check to
    the two attacks compared here.
    """
    alias = "_torchattacks_noinit"
    if alias not in sys.modules:
        spec = importlib.util.find_spec("torchattacks")
        assert spec is not None and spec.submodule_search_locations, "install torchattacks (pip --no-deps)"
        root = Path(next(iter(spec.submodule_search_locations)))
        for name, path in ((alias, root), (f"{alias}.attacks", root / "attacks")):
            package = types.ModuleType(name)
            package.__path__ = [str(path)]
            sys.modules[name] = package
    return importlib.import_module(f"{alias}.{module}")


@pytest.fixture(scope="module")
def classifier() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A 4-class MLP on 1x8x8 images whose classes are close enough that eps ~ 0.04 breaks about half."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    n = 64
    prototypes = 0.4 + 0.2 * torch.rand(N_CLASSES, 1, 8, 8, generator=g)
    y = torch.arange(n) % N_CLASSES
    x = (prototypes[y] + 0.1 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0, 1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, N_CLASSES))
    _train(model, x, y, epochs=150)
    for p in model.parameters():
        p.grad = None
    return model, x, y


def test_attack_names_registry():
    assert set(ATTACK_NAMES) == {
        "clean",
        "pgd",
        "apgd-ce",
        "surrogate-apgd-ce",
        "transfer-base",
        "apgd-dlr",
        "apgd-ce+dlr",
        "apgd-t",
        "fab-t",
        "square",
        "autoattack",
        "bpda-apgd-ce",
        "adaptive",
    }
    assert attack_options("apgd-ce")["n_iter"] == 100
    assert attack_options("square")["n_queries"] == 5000
    assert attack_options("adaptive")["steps"] == 50


def test_apgd_ce_agrees_with_torchattacks(classifier):
    model, x, y = classifier
    ours = run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=20, seed=0)
    apgd = _torchattacks("attacks.apgd").APGD(
        model, norm="Linf", eps=EPS, steps=20, n_restarts=1, seed=1, loss="ce"
    )
    x_adv = apgd(x, y).detach()
    with torch.no_grad():
        theirs = model(x_adv).argmax(1) == y
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    clean = float((model(x).argmax(1) == y).float().mean())
    assert clean == 1.0
    # The attack must matter at this eps (else the comparison says nothing) and both implementations must
    # agree up to random-start noise.
    assert 0.1 < float(ours.float().mean()) < 0.9
    assert abs(float(ours.float().mean()) - float(theirs.float().mean())) <= 0.1
    assert float((ours == theirs).float().mean()) >= 0.85


@pytest.mark.parametrize("seed", [0, 1])
def test_pgd_agrees_with_torchattacks(classifier, seed):
    model, x, y = classifier
    ours = run_attack("pgd", model, x, y, eps=EPS, steps=10, step_size=EPS / 4, seed=seed)
    pgd = _torchattacks("attacks.pgd").PGD(model, eps=EPS, alpha=EPS / 4, steps=10, random_start=True)
    torch.manual_seed(seed)
    x_adv = pgd(x, y)
    with torch.no_grad():
        theirs = model(x_adv).argmax(1) == y
    assert 0.1 < float(ours.float().mean()) < 0.9
    # Same algorithm and the same random start (uniform in the ball drawn from the same seed): the samples
    # broken may differ only where a float rounding flips a decision.
    assert float((ours == theirs).float().mean()) >= 0.95


def test_every_attack_implies_clean_and_worst_case(classifier):
    model, x, y = classifier
    fast = {
        "clean": {},
        "pgd": {"steps": 5, "step_size": EPS / 4},
        "apgd-ce": {"n_iter": 10},
        "apgd-dlr": {"n_iter": 10},
        "apgd-ce+dlr": {"n_iter": 10},
        "apgd-t": {"n_iter": 5},
        "fab-t": {"n_iter": 5},
        "square": {"n_queries": 30},
        "autoattack": {"n_iter": 10, "n_queries": 30},
        "bpda-apgd-ce": {"n_iter": 10},
        "surrogate-apgd-ce": {"n_iter": 10},
        "transfer-base": {"n_iter": 10},
        "adaptive": {"steps": 5, "step_size": EPS / 4},
    }
    assert set(fast) == set(ATTACK_NAMES)
    results = {
        name: run_attack(name, model, x, y, eps=EPS, batch_size=24, **opts) for name, opts in fast.items()
    }
    clean = results["clean"]
    for name, correct in results.items():
        assert correct.dtype == torch.bool and correct.shape == (x.shape[0],), name
        assert not bool((correct & ~clean).any()), f"{name} counts a clean error as robust"
    assert torch.equal(results["apgd-ce+dlr"], results["apgd-ce"] & results["apgd-dlr"])
    # AutoAttack starts with the very same APGD-CE (same seed, same subset) and only removes more samples.
    assert not bool((results["autoattack"] & ~results["apgd-ce"]).any())
    best = worst_case(results)
    assert torch.equal(best, torch.stack(list(results.values())).all(dim=0))
    assert float(best.float().mean()) <= min(float(r.float().mean()) for r in results.values())
    assert float(best.float().mean()) < float(clean.float().mean())


def test_worst_case_logic_and_errors():
    a = torch.tensor([True, True, False, True])
    b = torch.tensor([True, False, True, True])
    c = torch.tensor([False, True, True, True])
    assert worst_case([a, b, c]).tolist() == [False, False, False, True]
    assert worst_case({"a": a}).tolist() == a.tolist()
    with pytest.raises(ConfigurationError):
        worst_case([])
    with pytest.raises(ConfigurationError):
        worst_case([a, torch.ones(3, dtype=torch.bool)])
    # the reports' form, keyed by dataset index (shards arrive in any order): the same rule
    worst_case_by_index = worst_case  # one function holds the rule for both forms
    keyed = [{7 + 3 * i: bool(v) for i, v in enumerate(t.tolist())} for t in (a, b, c)]
    keyed[1] = dict(reversed(list(keyed[1].items())))
    assert worst_case_by_index(keyed) == {7: False, 10: False, 13: False, 16: True}
    with pytest.raises(ConfigurationError, match="same samples"):
        worst_case_by_index([keyed[0], {7: True}])
    with pytest.raises(ConfigurationError):
        worst_case_by_index([])


def test_batch_size_changes_only_random_draws(classifier):
    model, x, y = classifier
    whole = run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=10, batch_size=64)
    # Every batch reuses the seed, so batching changes which random starts a sample gets, not the attack.
    split = run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=10, batch_size=16)
    assert abs(float(whole.float().mean()) - float(split.float().mean())) <= 0.1
    # With the same batching, the same seed gives the same answer.
    assert torch.equal(whole, run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=10, batch_size=64))


@pytest.mark.parametrize("norm,eps", [("Linf", EPS), ("L2", 0.4)])
def test_white_box_attacks_in_both_norms(classifier, norm, eps):
    model, x, y = classifier
    for name in ("apgd-ce", "fab-t"):
        correct = run_attack(name, model, x, y, eps=eps, norm=norm, n_iter=10)
        assert float(correct.float().mean()) < 0.5, (name, norm)


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 0.8)])
def test_square_black_box_in_both_norms(classifier, norm, eps):
    model, x, y = classifier
    first = run_attack("square", model, x, y, eps=eps, norm=norm, n_queries=100, seed=0)
    assert float(first.float().mean()) < 0.8
    assert torch.equal(first, run_attack("square", model, x, y, eps=eps, norm=norm, n_queries=100, seed=0))


def test_run_attack_restores_rng_mode_and_parameters(classifier):
    model, x, y = classifier
    model.train()
    state = torch.get_rng_state()
    try:
        run_attack("fab-t", model, x[:8], y[:8], eps=EPS, n_iter=3)
        run_attack("apgd-ce", model, x[:8], y[:8], eps=EPS, n_iter=3, seed=123)
        assert model.training
    finally:
        model.eval()
    assert torch.equal(torch.get_rng_state(), state)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_run_attack_inside_inference_mode(classifier):
    model, x, y = classifier
    expected = run_attack("pgd", model, x, y, eps=EPS, steps=3)
    with torch.inference_mode():
        got = run_attack("pgd", model, x.clone(), y.clone(), eps=EPS, steps=3)
    assert torch.equal(expected, got.clone())


@pytest.mark.parametrize(
    "name,kwargs,fragment",
    [
        ("nope", {}, "unknown attack"),
        ("apgd-ce", {"eps": 0.0}, "eps"),
        ("apgd-ce", {"eps": -1.0}, "eps"),
        ("apgd-ce", {"norm": "L1"}, "norm"),
        ("apgd-ce", {"steps": 3}, "does not take"),
        ("pgd", {"steps": 0}, "steps"),
        ("adaptive", {"p": 0.5}, "p must"),
        ("adaptive", {"lambda_": -1.0}, "lambda_"),
        ("apgd-ce", {"batch_size": 0}, "batch_size"),
    ],
)
def test_run_attack_configuration_errors(classifier, name, kwargs, fragment):
    model, x, y = classifier
    args = {"eps": EPS} | kwargs
    with pytest.raises(ConfigurationError) as info:
        run_attack(name, model, x[:4], y[:4], **args)
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_run_attack_rejects_attacks_the_model_cannot_support(trained):
    model, x, y = trained  # 2 classes, inputs (N, 1, 4, 4)
    for name in ("apgd-dlr", "apgd-t", "autoattack"):
        with pytest.raises(ConfigurationError, match="classes"):
            run_attack(name, model, x, y, eps=0.1)
    with pytest.raises(ConfigurationError, match="5x5"):
        run_attack("square", model, x, y, eps=0.5, norm="L2")
    with pytest.raises(ConfigurationError, match=r"\(N, C, H, W\)"):
        run_attack("square", model, x.flatten(1), y, eps=0.1)
    with pytest.raises(ConfigurationError, match=r"\[0, 1\]"):
        run_attack("apgd-ce", model, x * 2 - 1, y, eps=0.1)


# ------------------------------------------------------------------------------------ BPDA (masking)
def _masking_model(alpha: float) -> nn.Module:
    """Hand-built 2-class model whose MeanSparse operator masks the gradient of its weak spot.

    Feature a = mean(x) - 0.5 decides the class; it is never in the band (zero variance) and the data keeps
    |a| >= 0.2 > eps, so no eps-attack can flip it alone. Feature b = mean(v * x) for a +-1 checkerboard v
    is ~0 on clean images, i.e. inside the band (threshold alpha * 1), so MeanSparse replaces it by its mean
    0 and its exact gradient is zero; but an attack along v moves b by up to eps, out of the band, where it
    enters the logit with weight 20 and flips the class. Only the straight-through gradient sees that.
    """
    checker = (torch.arange(8).view(8, 1) + torch.arange(8).view(1, 8)) % 2 * 2.0 - 1.0
    first = nn.Linear(64, 2)
    second = nn.Linear(2, 2)
    with torch.no_grad():
        first.weight.copy_(torch.stack([torch.full((64,), 1 / 64), checker.flatten() / 64]))
        first.bias.copy_(torch.tensor([-0.5, 0.0]))
        second.weight.copy_(torch.tensor([[-1.0, -20.0], [1.0, 20.0]]) / 2)
        second.bias.zero_()
    op = MeanSparse(2, channel_dim=1, alpha=alpha)
    op.set_statistics(torch.zeros(2), torch.tensor([0.0, 1.0]), count=1000)
    return nn.Sequential(nn.Flatten(), first, op, second).eval()


def _masking_data(n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    y = torch.arange(n) % 2
    level = torch.where(y == 1, 0.75, 0.25) + 0.03 * (torch.rand(n, generator=g) - 0.5)
    x = level.view(-1, 1, 1, 1) + 0.02 * torch.randn(n, 1, 8, 8, generator=g)
    return x.clamp(0, 1), y


def test_bpda_finds_what_masked_gradients_hide():
    eps = 0.1
    x, y = _masking_data()
    model = _masking_model(alpha=eps / 2)
    with torch.no_grad():
        b = model[1](model[0](x))[:, 1]
    assert float(b.abs().max()) < eps / 2  # every clean image sits in the band of feature b
    clean = run_attack("clean", model, x, y, eps=eps)
    exact = run_attack("apgd-ce", model, x, y, eps=eps, n_iter=20)
    bpda = run_attack("bpda-apgd-ce", model, x, y, eps=eps, n_iter=20)
    assert bool(clean.all())
    assert bool(exact.all()), "exact-gradient APGD should be blind to the masked feature"
    assert not bool(bpda.any()), "BPDA should break every sample"
    assert not bool((bpda & ~exact).any())
    assert all(op.backward_mode == "exact" for op in operators(model))  # restored after BPDA


def test_bpda_equals_apgd_without_sparsification():
    eps = 0.1
    x, y = _masking_data()
    model = _masking_model(alpha=0.0)
    exact = run_attack("apgd-ce", model, x, y, eps=eps, n_iter=20)
    bpda = run_attack("bpda-apgd-ce", model, x, y, eps=eps, n_iter=20)
    assert torch.equal(exact, bpda)
    assert not bool(exact.any())  # without the band, the weak spot is in plain sight of both


# ------------------------------------------------------------------------------------------- adaptive
@pytest.fixture(scope="module")
def sparse_classifier(classifier) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The 4-class MLP with a calibrated MeanSparse operator before its ReLU (alpha 0.5)."""
    model, x, y = classifier
    with torch.no_grad():
        z = model[1](model[0](x))
    op = MeanSparse(z.shape[1], channel_dim=1, alpha=0.5)
    op.set_statistics(z.mean(0), z.var(0, unbiased=False), count=z.shape[0])
    sparse = nn.Sequential(model[0], model[1], op, model[2], model[3]).eval()
    with torch.no_grad():
        assert float(band_mask(op, z).float().mean()) > 0.2  # the mask is far from empty
    return sparse, x, y


def test_adaptive_with_lambda_zero_is_pgd(sparse_classifier):
    model, x, y = sparse_classifier
    for seed in (0, 3):
        pgd = run_attack("pgd", model, x, y, eps=EPS, steps=10, step_size=EPS / 4, seed=seed)
        adaptive = run_attack(
            "adaptive", model, x, y, eps=EPS, steps=10, step_size=EPS / 4, seed=seed, lambda_=0.0
        )
        assert torch.equal(pgd, adaptive)
        assert 0.0 < float(pgd.float().mean()) < 1.0


def test_adaptive_penalty_changes_the_attack(sparse_classifier):
    model, x, y = sparse_classifier
    pgd = run_attack("pgd", model, x, y, eps=EPS, steps=10, step_size=EPS / 4)
    heavy = run_attack(
        "adaptive", model, x, y, eps=EPS, steps=10, step_size=EPS / 4, lambda_=1e4, p=2.0, q=2.0
    )
    # A huge lambda makes the attack mostly preserve the masked features instead of raising the loss.
    assert float(heavy.float().mean()) > float(pgd.float().mean())


def test_band_mask_matches_the_operator():
    torch.manual_seed(0)
    op = MeanSparse(3, channel_dim=1, alpha=0.7)
    op.set_statistics(torch.tensor([0.0, 1.0, -1.0]), torch.tensor([1.0, 4.0, 0.25]), count=10)
    z = torch.randn(50, 3, 2, 2) * 2
    mask = band_mask(op, z)
    out = op(z)
    centre = op.mean.view(1, 3, 1, 1).expand_as(z)
    assert torch.equal(mask, (z - centre).abs() <= 0.7 * op.var.sqrt().view(1, 3, 1, 1))
    assert torch.equal(out[mask], centre[mask])  # overwritten where masked (boundary has measure zero)
    assert torch.equal(out[~mask], z[~mask])
    op.set_alpha(0.0)
    assert not bool(band_mask(op, z).any())


def test_adaptive_penalty_matches_hand_computation():
    z = torch.tensor([[1.0, -2.0, 3.0], [0.5, 0.5, 0.5]])
    z_d = torch.tensor([[0.0, 0.0, 0.0], [1.5, 0.5, -0.5]])
    mask = torch.tensor([[True, False, True], [True, True, False]])
    # p = 1, q = 1: sum of |masked differences| = (1 + 3) + (1 + 0).
    assert float(adaptive_penalty([(mask, z)], [z_d], 1.0, 1.0)) == pytest.approx(5.0)
    # p = 2, q = 2: sum of squared masked differences = (1 + 9) + (1 + 0).
    assert float(adaptive_penalty([(mask, z)], [z_d], 2.0, 2.0)) == pytest.approx(11.0)
    # p = 2, q = 1: per-sample Euclidean norms sqrt(10) + 1; two operators add up.
    two = adaptive_penalty([(mask, z), (mask, z)], [z_d, z_d], 2.0, 1.0)
    assert float(two) == pytest.approx(2 * (10**0.5 + 1))
    # A zero masked difference has a zero, not NaN, gradient.
    z_d = z.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(adaptive_penalty([(mask, z)], [z_d], 2.0, 1.0), z_d)
    assert torch.isfinite(grad).all()


def test_adaptive_with_bpda_option_runs_and_restores(sparse_classifier):
    model, x, y = sparse_classifier
    correct = run_attack("adaptive", model, x, y, eps=EPS, steps=5, lambda_=1.0, backward="straight_through")
    assert correct.shape == y.shape
    assert all(op.backward_mode == "exact" for op in operators(model))
    with backward_mode(model, "straight_through"):
        assert all(op.backward_mode == "straight_through" for op in operators(model))


def test_the_backward_switch_runs_an_attack_through_another_backward_and_restores_it(sparse_classifier):
    """bpda-apgd-ce is apgd-ce with backward=straight_through: the same verdicts; the switch applies to every
    gradient attack and the operators' own mode is back afterwards."""
    model, x, y = sparse_classifier
    preset = run_attack("bpda-apgd-ce", model, x, y, eps=EPS, n_iter=5)
    switched = run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=5, backward="straight_through")
    assert torch.equal(preset, switched)
    surrogate = run_attack("surrogate-apgd-ce", model, x, y, eps=EPS, n_iter=5, temperature=0.2)
    assert torch.equal(
        surrogate,
        run_attack("apgd-ce", model, x, y, eps=EPS, n_iter=5, backward="surrogate", temperature=0.2),
    )
    for name in ("pgd", "apgd-dlr", "adaptive"):
        assert (
            run_attack(
                name,
                model,
                x,
                y,
                eps=EPS,
                backward="surrogate",
                **({"steps": 2} if name in ("pgd", "adaptive") else {"n_iter": 2}),
            ).shape
            == y.shape
        )
    assert all(op.backward_mode == "exact" for op in operators(model))
    with pytest.raises(ConfigurationError, match="backward mode must be one of"):
        run_attack("apgd-ce", model, x, y, eps=EPS, backward="sideways")


def test_surrogate_backward_is_the_gradient_of_the_relaxed_operator_hand_derived():
    """One operator, mean 0, variance 1, alpha 1 (threshold 1), temperature 0.5 (width 0.5): the surrogate slope
    is o + |x| o (1 - o) / 0.5 with o = sigmoid((|x| - 1) / 0.5); at |x| = 1 it is 0.5 + 1 * 0.25 / 0.5 = 1,
    at 0 it is sigmoid(-2); and it equals autograd through the relaxed operator x - s(x) x in float64."""
    op = MeanSparse(1, alpha=1.0, backward_mode="surrogate", temperature=0.5)
    op.set_statistics(torch.zeros(1), torch.ones(1), count=10)
    x = torch.tensor([[-3.0], [-1.0], [-0.4], [0.0], [0.7], [1.0], [2.5]], requires_grad=True)
    out = op(x)
    assert torch.equal(out.detach(), torch.where(x.detach().abs() < 1, 0.0, x.detach()))  # forward unchanged
    (grad,) = torch.autograd.grad(out.sum(), x)
    assert grad[5, 0].item() == pytest.approx(1.0, abs=1e-6) and grad[1, 0].item() == pytest.approx(
        1.0, abs=1e-6
    )
    assert grad[3, 0].item() == pytest.approx(torch.sigmoid(torch.tensor(-2.0)).item(), abs=1e-7)
    x64 = x.detach().double().requires_grad_()
    inside = torch.sigmoid((1.0 - x64.abs()) / 0.5)
    (reference,) = torch.autograd.grad((x64 - inside * x64).sum(), x64)
    torch.testing.assert_close(grad.double(), reference, rtol=1e-6, atol=1e-6)
    # small temperatures approach the exact gradient (zero inside the band, one outside) away from the edge,
    # where the relaxed jump becomes a spike
    op.temperature = 1e-3
    (sharp,) = torch.autograd.grad(op(x).sum(), x)
    away = x.detach().abs() != 1
    assert torch.equal(sharp[away].round(), (x.detach().abs() > 1).float()[away])
    assert (sharp[~away] > 100).all()


def test_transfer_base_is_apgd_ce_on_the_base_model_judged_on_the_defended_one(sparse_classifier):
    """Reproduced with pyautoattack directly: APGD-CE on an operator-free copy of the model, the same seed and
    iterations, its points judged on the MeanSparse model."""
    import copy

    from pyautoattack.autopgd_base import APGDAttack

    model, x, y = sparse_classifier
    alphas = [float(op.alpha) for op in operators(model)]
    ours = run_attack("transfer-base", model, x, y, eps=EPS, n_iter=10, seed=3)
    assert [float(op.alpha) for op in operators(model)] == alphas  # the operators are back as they were
    base = copy.deepcopy(model).eval()
    for op in operators(base):
        op.set_alpha(0.0)
    for p in base.parameters():
        p.requires_grad_(False)
    attack = APGDAttack(
        base, n_iter=10, norm="Linf", n_restarts=1, eps=EPS, seed=3, loss="ce", rho=0.75, device=x.device
    )
    with torch.random.fork_rng():
        x_adv = attack.perturb(x, y).clamp(0, 1)
    x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS)
    with torch.no_grad():
        expected = (model.eval()(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)
    assert torch.equal(ours, expected)
    assert [float(op.alpha) for op in operators(model)] == alphas  # judging left the operators as they were
    assert all(alpha > 0 for alpha in alphas)


def test_autoattack_agrees_with_torchattacks(classifier):
    """Our AutoAttack (pyautoattack, standard version) vs torchattacks' independent AutoAttack, same inputs."""
    alias = "_torchattacks_noinit"
    _torchattacks("attacks.apgd")  # registers the private alias packages
    if f"{alias}.wrappers" not in sys.modules:
        wrappers = types.ModuleType(f"{alias}.wrappers")
        wrappers.__path__ = [str(Path(sys.modules[alias].__path__[0]) / "wrappers")]
        sys.modules[f"{alias}.wrappers"] = wrappers
    model, x, y = classifier
    ours = run_attack("autoattack", model, x, y, eps=EPS, seed=0)
    theirs_attack = _torchattacks("attacks.autoattack").AutoAttack(
        model, norm="Linf", eps=EPS, version="standard", n_classes=N_CLASSES, seed=0
    )
    x_adv = theirs_attack(x, y).detach()
    with torch.no_grad():
        theirs = model(x_adv).argmax(1) == y
    assert float((x_adv - x).abs().max()) <= EPS + 1e-6
    assert 0.1 < float(ours.float().mean()) < 0.9
    # both are ensembles of strong attacks: equal up to restart noise, and ours at least as strong as APGD-CE
    assert abs(float(ours.float().mean()) - float(theirs.float().mean())) <= 0.1
    assert float((ours == theirs).float().mean()) >= 0.85
    assert bool((ours <= run_attack("apgd-ce", model, x, y, eps=EPS, seed=0)).all())


def test_band_mask_is_the_operators_own_strict_test_on_the_band_edge():
    """Values exactly on the edge (|z - mean| == alpha * sigma) are kept by the operator (strict <), so the
    adaptive attack's mask must leave them out too; hand-derived with a threshold of exactly 0.5."""
    op = MeanSparse(2, channel_dim=1, alpha=0.5)
    op.set_statistics(torch.tensor([0.0, 1.0]), torch.tensor([1.0, 4.0]), count=10)  # thresholds 0.5 and 1.0
    z = torch.tensor([[[-0.5, 0.5, 0.25, 0.75, 0.0], [0.0, 2.0, 1.5, 2.5, 1.0]]])  # (1, 2, 5)
    expected = torch.tensor([[[False, False, True, False, True], [False, False, True, False, True]]])
    assert torch.equal(band_mask(op, z), expected)
    with torch.no_grad():
        replaced = op(z) != z  # where the forward changed the value (the centre itself is replaced by itself)
    assert torch.equal(replaced, expected & (z != torch.tensor([0.0, 1.0]).view(1, 2, 1)))
    op.set_alpha(0.0)
    assert not band_mask(op, z).any()


def test_each_attacks_facts_are_written_once_and_every_report_reads_its_columns_by_one_rule():
    """The reports' attack lists are views of the facts on each AttackSpec; a column is an attack's verdicts, a
    combined column's parts ANDed, or every attack ANDed (best known) - checked on hand-written verdicts."""
    from meansparse_pl.attacks import (
        BLACK_BOX_ATTACKS,
        BLACK_BOX_OR_TRANSFER,
        COMPOSITE_ATTACKS,
        EXACT_WHITE_BOX,
        MASKING_WORDS,
        WHITE_BOX_ATTACKS,
        column_verdicts,
    )

    assert COMPOSITE_ATTACKS == {"apgd-ce+dlr": ("apgd-ce", "apgd-dlr")}
    assert EXACT_WHITE_BOX == ("apgd-ce", "apgd-dlr", "apgd-t", "pgd", "fab-t")
    assert set(WHITE_BOX_ATTACKS) == {
        *EXACT_WHITE_BOX,
        "autoattack",
        "bpda-apgd-ce",
        "surrogate-apgd-ce",
        "adaptive",
    }
    assert BLACK_BOX_ATTACKS == ("square",) and BLACK_BOX_OR_TRANSFER == ("square", "transfer-base")
    assert tuple(MASKING_WORDS) == ("bpda-apgd-ce", "surrogate-apgd-ce", "transfer-base")
    verdicts = {
        "clean": {0: True, 1: True, 2: True, 3: False},
        "apgd-ce": {0: True, 1: False, 2: True, 3: False},
        "apgd-dlr": {0: True, 1: True, 2: False, 3: False},
        "square": {0: False, 1: True, 2: True, 3: False},
    }
    assert column_verdicts(verdicts, "apgd-ce") == verdicts["apgd-ce"]
    assert column_verdicts(verdicts, "apgd-ce+dlr") == {0: True, 1: False, 2: False, 3: False}
    assert column_verdicts(verdicts, "best_known") == {0: False, 1: False, 2: False, 3: False}
    assert column_verdicts(verdicts, "worst_case") == column_verdicts(verdicts, "best_known")
