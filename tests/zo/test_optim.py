import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hdopt.zo import ZOSGD, NonFiniteLossError, ZOAdam, ZOConservative, ZOSign, replay

from .models import TinyLM, batch, bitwise_equal, snapshot

RULES = [
    (ZOSGD, {"lr": 1e-2}),
    (ZOSGD, {"lr": 1e-2, "momentum": 0.5}),
    (ZOAdam, {"lr": 1e-2}),
    (ZOSign, {"lr": 1e-3}),
    (ZOConservative, {"lr": 1e-2}),
]
IDS = [f"{cls.__name__}{'+momentum' if 'momentum' in kw else ''}" for cls, kw in RULES]


# -- the quadratic: exact projected gradients --------------------------------------------------------------
def _quadratic(d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(d, d, generator=g, dtype=torch.float64)
    a = m @ m.T / d + torch.eye(d, dtype=torch.float64)
    b = torch.randn(d, generator=g, dtype=torch.float64)
    theta = torch.randn(d, generator=g, dtype=torch.float64)
    return a, b, theta


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("estimator,q", [("central", 1), ("central", 4), ("one-sided", 2)])
def test_estimates_are_unbiased_on_a_quadratic(noise, estimator, q):
    a, b, theta = _quadratic()
    grad = a @ theta + b
    n = 3000
    opt = ZOSGD([theta], lr=1.0, eps=1e-4, q=q, estimator=estimator, noise=noise, seed=11)
    estimates = torch.empty(n, theta.numel(), dtype=torch.float64)
    start = theta.clone()
    for t in range(n):
        opt.step(lambda: 0.5 * theta @ a @ theta + b @ theta)
        estimates[t] = start - theta  # lr = 1: the update is -ghat
        theta.copy_(start)
    mean = estimates.mean(0)
    # Per-coordinate variance of one direction's z z^T g: Gaussian ||g||^2 + g_j^2,
    # Rademacher ||g||^2 - g_j^2;
    # q directions divide it by q. One-sided adds an O(eps) term, negligible at eps = 1e-4.
    norm2 = grad.pow(2).sum()
    var = (norm2 + grad.pow(2)) if noise == "gaussian" else (norm2 - grad.pow(2))
    stderr = (var / q / n).sqrt()
    assert torch.all((mean - grad).abs() < 5 * stderr + 1e-6), ((mean - grad) / stderr).abs().max()
    # and the spread itself matches the theory (E||ghat||^2 = (d + 2)/q ||g||^2 + ... for Gaussian q = 1)
    emp_var = estimates.var(0)
    assert torch.allclose(emp_var, var / q, rtol=0.25)


def test_zosgd_converges_on_logistic_regression():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    y = (
        x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 1.5], dtype=torch.float64)
        + 0.3 * torch.randn(200, generator=g, dtype=torch.float64)
        > 0
    ).double()
    w = torch.zeros(5, dtype=torch.float64)

    def loss_at(weights):
        return F.binary_cross_entropy_with_logits(x @ weights, y) + 0.01 * weights.pow(2).sum()

    optimum = torch.zeros(5, dtype=torch.float64, requires_grad=True)
    lbfgs = torch.optim.LBFGS([optimum], max_iter=200, tolerance_grad=1e-12, tolerance_change=1e-14)
    lbfgs.step(lambda: (lbfgs.zero_grad(), (l := loss_at(optimum)), l.backward())[1])
    best = loss_at(optimum).item()
    opt = ZOSGD([w], lr=0.1, eps=1e-3, seed=3)
    start = loss_at(w).item()
    for _ in range(1500):
        opt.step(lambda: loss_at(w))
    # d = 5: ZO-SGD is ~d times slower than GD; after 1500 steps the gap is < 0.2% of the initial gap
    assert loss_at(w).item() - best < 2e-3 * (start - best)


# -- exact restore, bad input -----------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_lr_zero_leaves_weights_bitwise_identical(dtype, noise):
    model, ids = TinyLM(dtype=dtype), batch()
    before = snapshot(model)
    opt = ZOSGD(model.named_parameters(), lr=0.0, eps=1e-2, weight_decay=0.1, noise=noise)
    for _ in range(3):
        opt.step(lambda: model.loss(ids))
    assert bitwise_equal(before, snapshot(model))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_inplace_restore_is_exact_where_the_reference_round_trip_drifts(dtype):
    """The defect the design avoids: +eps z, -2 eps z, +eps z written into half-precision weights does not
    give them back. hdopt's in-place perturbation writes the weights too, and gives them back bitwise, 20
    times."""
    model, ids = TinyLM(dtype=dtype), batch()
    before, written = snapshot(model), []

    def closure():  # notes whether the weights it sees were written (perturbed in place)
        written.append(not torch.equal(model.hidden.weight, before["hidden.weight"]))
        return model.loss(ids)

    opt = ZOSGD(model.named_parameters(), lr=0.0, eps=1e-3, perturb="inplace")
    for _ in range(20):
        opt.step(closure)
    assert len(written) == 40 and all(written) and bitwise_equal(before, snapshot(model))
    w = before["hidden.weight"].clone()
    for seed in range(20):  # the reference's sweeps, in the weights' dtype
        z = torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
        for coef in (1e-3, -2e-3, 1e-3):
            w = w + coef * z
    assert (w != before["hidden.weight"]).float().mean() > 0.2


def test_non_scalar_and_non_finite_losses_are_refused_and_weights_kept():
    model, ids = TinyLM(), batch()
    before = snapshot(model)
    opt = ZOSGD(model.named_parameters(), lr=1.0)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: model(ids).sum(-1))
    with pytest.raises(NonFiniteLossError, match="unchanged"):
        opt.step(lambda: model.loss(ids) * float("nan"))
    calls = iter([1.0, float("inf")])
    with pytest.raises(NonFiniteLossError, match="-eps"):
        opt.step(lambda: torch.tensor(next(calls)))
    with pytest.raises(TypeError, match="scalar tensor or float"):
        opt.step(lambda: "1.0")
    assert bitwise_equal(before, snapshot(model))
    assert opt.step_count == 0 and len(opt.trajectory) == 0


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"lr": -1.0}, "lr"),
        ({"eps": 0.0}, "eps"),
        ({"eps": -1e-3}, "eps"),
        ({"q": 0}, "q"),
        ({"weight_decay": -0.1}, "weight_decay"),
        ({"noise": "uniform"}, "noise"),
        ({"estimator": "x"}, "estimator"),
        ({"momentum": 1.0}, "momentum"),
        ({"perturb": "maybe"}, "perturb"),
    ],
)
def test_bad_hyperparameters_raise_value_errors_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ZOSGD([torch.zeros(3)], **{"lr": 1e-3, **kwargs})


def test_step_without_closure_or_estimate_explains_itself():
    opt = ZOSGD([torch.zeros(3)], lr=1e-3)
    with pytest.raises(RuntimeError, match="closure"):
        opt.step()


# -- trajectory, replay, invariances ------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_replay_rebuilds_the_weights_bitwise(cls, kwargs, tmp_path):
    model, ids = TinyLM(), batch()
    start = snapshot(model)
    opt = cls(model.named_parameters(), eps=1e-3, weight_decay=0.01, q=2, **kwargs)
    for _ in range(12):
        opt.step(lambda: model.loss(ids))
    final = snapshot(model)
    opt.save_trajectory(tmp_path / "run.zo")
    model.load_state_dict(start)
    replay(model.named_parameters(), tmp_path / "run.zo")
    assert bitwise_equal(final, snapshot(model))
    assert not bitwise_equal(final, start)


def test_replay_in_bf16_with_stochastic_rounding_and_unnamed_params(tmp_path):
    model, ids = TinyLM(dtype=torch.bfloat16), batch()
    start = snapshot(model)
    opt = ZOSGD(list(model.parameters()), lr=1e-3, eps=1e-2, noise="rademacher", estimator="one-sided")
    for _ in range(10):
        opt.step(lambda: model.loss(ids))
    final = snapshot(model)
    opt.save_trajectory(tmp_path / "run.zo")
    model.load_state_dict(start)
    replay(list(model.parameters()), tmp_path / "run.zo", upto=4)
    assert not bitwise_equal(final, snapshot(model))
    model.load_state_dict(start)
    replay(list(model.parameters()), tmp_path / "run.zo")
    assert bitwise_equal(final, snapshot(model))


def test_ten_thousand_steps_of_log_fit_in_one_megabyte(tmp_path):
    from hdopt.zo import Trajectory, UpdateRecord

    log = Trajectory(UpdateRecord(t, t * 7919, (0.1,), (1e-6,), eps=(1e-3,)) for t in range(10_000))
    header = ZOSGD([torch.zeros(2)], lr=1e-6).trajectory_header()
    log.save(tmp_path / "t.zo", header)
    assert (tmp_path / "t.zo").stat().st_size < 1_000_000
    loaded_header, loaded = Trajectory.load(tmp_path / "t.zo")
    assert loaded.records == log.records and loaded_header["optimizer"] == "ZOSGD"
    (tmp_path / "cut.zo").write_bytes((tmp_path / "t.zo").read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        Trajectory.load(tmp_path / "cut.zo")


def test_noise_ignores_parameter_order_and_chunk_size():
    # float64: the head is computed in row blocks with chunk=64 and whole with 2^20; the two agree to
    # rounding (~1e-16), which the 1/eps in the estimate amplifies to ~1e-13, far inside the tolerance.
    a, b, ids = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64), batch()
    opt_a = ZOSGD(list(a.named_parameters()), lr=1e-2, chunk=64)
    opt_b = ZOSGD(list(reversed(list(b.named_parameters()))), lr=1e-2, chunk=1 << 20)
    for _ in range(3):
        loss_a = opt_a.step(lambda: a.loss(ids))
        loss_b = opt_b.step(lambda: b.loss(ids))
        assert loss_a == pytest.approx(loss_b, rel=1e-10)
    weights_b = b.state_dict()
    for name, pa in a.state_dict().items():
        assert torch.allclose(pa, weights_b[name], rtol=0, atol=1e-10), name


# -- accumulation, schedules, state -------------------------------------------------------------------------
def test_accumulating_micro_batches_equals_the_full_batch():
    ids = batch(n=8)
    full, accum = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_full = ZOSGD(full.named_parameters(), lr=1e-2, eps=1e-4)
    opt_accum = ZOSGD(accum.named_parameters(), lr=1e-2, eps=1e-4)
    for _ in range(3):
        opt_full.step(lambda: full.loss(ids))
        for half in (ids[:4], ids[4:]):
            opt_accum.estimate(lambda h=half: accum.loss(h))
        opt_accum.step()
    for key, value in full.state_dict().items():
        assert torch.allclose(value, accum.state_dict()[key], rtol=0, atol=1e-12), key


def test_lr_schedulers_drive_the_update_and_are_logged():
    model, ids = TinyLM(), batch()
    opt = ZOSGD(model.named_parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(5):
        opt.step(lambda: model.loss(ids))
        sched.step()
    assert [r.lrs[0] for r in opt.trajectory] == [1e-2, 1e-2, 5e-3, 5e-3, 2.5e-3]


@pytest.mark.filterwarnings("ignore:.*not used inside the forward")
def test_weight_decay_skips_1d_tensors_unless_asked():
    model = TinyLM()
    before = snapshot(model)
    groups = [
        {"params": [model.hidden.weight, model.hidden.bias], "weight_decay": 0.5},
        {"params": [model.norm.weight], "weight_decay": 0.5, "decay_1d": True},
    ]
    opt = ZOSGD(groups, lr=0.1)
    opt.step(lambda: torch.tensor(1.0))  # constant loss: projected gradient 0, only decay acts
    after = snapshot(model)
    assert torch.equal(after["hidden.bias"], before["hidden.bias"])
    assert torch.equal(after["hidden.weight"], before["hidden.weight"] * (1 - 0.1 * 0.5))
    assert torch.equal(after["norm.weight"], before["norm.weight"] * (1 - 0.1 * 0.5))


def test_state_dict_round_trip_resumes_bitwise():
    ids = batch()
    straight = TinyLM()
    opt = ZOAdam(straight.named_parameters(), lr=1e-2, seed=5)
    for _ in range(6):
        opt.step(lambda: straight.loss(ids))

    resumed = TinyLM()
    first = ZOAdam(resumed.named_parameters(), lr=1e-2, seed=5)
    for _ in range(3):
        first.step(lambda: resumed.loss(ids))
    saved_state, saved_weights = first.state_dict(), snapshot(resumed)
    fresh = TinyLM(seed=9)
    fresh.load_state_dict(saved_weights)
    second = ZOAdam(fresh.named_parameters(), lr=1e-2, seed=5)
    second.load_state_dict(saved_state)
    assert second.step_count == 3
    for _ in range(3):
        second.step(lambda: fresh.loss(ids))
    assert bitwise_equal(snapshot(straight), snapshot(fresh))


# -- low precision -------------------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:.*not used inside the forward")
def test_stochastic_rounding_moves_bf16_weights_by_the_requested_update_on_average():
    n = 50_000
    w32 = nn.Parameter(torch.full((n,), 0.5))
    w16 = nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16))
    direction = torch.linspace(-1, 1, n)

    def linear_loss(w):
        return lambda: (w.float() * direction).sum()

    lr = 2e-6  # update ~ lr * g * z ~ 1e-4 at most, below bf16's half-ulp at 0.5 (9.8e-4)
    for w, sr in ((w32, None), (w16, True)):
        ZOSGD([("w", w)], lr=lr, eps=1e-2, noise="rademacher", stochastic_rounding=sr).step(linear_loss(w))
    requested = w32.detach() - 0.5
    moved = w16.detach().float() - 0.5
    ratio = (moved * requested.sign()).sum() / requested.abs().sum()
    # each element moves by 0 or one ulp u: variance of the ratio ~ u * sum|r| / (sum|r|)^2
    ulp = 2.0**-8
    tolerance = 5 * math.sqrt(ulp / requested.abs().sum().item())
    assert abs(ratio.item() - 1) < tolerance
    w_rne = nn.Parameter(torch.full((n,), 0.5, dtype=torch.bfloat16))
    ZOSGD([("w", w_rne)], lr=lr, eps=1e-2, noise="rademacher", stochastic_rounding=False).step(
        linear_loss(w_rne)
    )
    assert torch.all(w_rne == 0.5)  # round-to-nearest loses every update


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_stochastic_round_is_unbiased(dtype):
    from hdopt.zo.noise import NoiseGenerator
    from hdopt.zo.rounding import stochastic_round

    n = 1 << 20
    x = torch.full((n,), 1.0 + 3e-4) if dtype == torch.bfloat16 else torch.full((n,), 1.0 + 3e-4)
    words = NoiseGenerator(chunk=n).words(123, 0, n)
    rounded = stochastic_round(x, dtype, words).double()
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    p = 3e-4 / ulp
    assert abs(rounded.mean().item() - (1 + 3e-4)) < 5 * ulp * math.sqrt(p * (1 - p) / n)
    assert set(rounded.unique().tolist()) == {1.0, 1.0 + ulp}


# -- the rules ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_every_rule_lowers_the_loss_of_a_tiny_lm(cls, kwargs):
    model, ids = TinyLM(), batch()
    opt = cls(model.named_parameters(), eps=1e-3, **kwargs)
    start = model.loss(ids).item()
    for _ in range(150):
        opt.step(lambda: model.loss(ids))
    assert model.loss(ids).item() < start - 0.1


def test_conservative_refuses_updates_that_raise_the_loss():
    model, ids = TinyLM(), batch()
    before = snapshot(model)
    opt = ZOConservative(model.named_parameters(), lr=1e4, eps=1e-3)  # any step this large is worse
    opt.step(lambda: model.loss(ids))
    assert opt.trajectory.records[-1].scale == 0.0
    assert bitwise_equal(before, snapshot(model))


def test_bare_tensors_and_parameters_outside_module_forward_are_perturbed():
    scale = nn.Parameter(torch.tensor(2.0))
    model = TinyLM()
    ids = batch()

    def closure():  # `scale` is used outside any module's forward
        return model.loss(ids) * scale

    opt = ZOSGD([("scale", scale), *model.named_parameters()], lr=1e-2)
    with pytest.warns(UserWarning, match="not used inside the forward"):
        opt.step(closure)
    assert scale.item() != 2.0  # it received an update, so it was perturbed


@pytest.mark.parametrize("group_momentum,default", [(None, 1.0), (-0.1, 0.0)])  # the default, a group's own
def test_momentum_outside_zero_one_is_refused_for_the_default_and_per_group(group_momentum, default):
    group = {"params": [nn.Parameter(torch.zeros(3))], "param_names": ["w"]}
    if group_momentum is not None:
        group["momentum"] = group_momentum
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
        ZOSGD([group], lr=1e-3, momentum=default)
