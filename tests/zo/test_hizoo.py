"""HiZOO: the Sigma-scaled perturbation, the diagonal Hessian update and the preconditioned step, checked with
numbers (exactly against the closure's losses and regenerated noise; statistically on quadratics, within
standard errors from the estimators' variances); the contract's replay / resume / accumulation / data
parallel properties."""

import io

import pytest
import torch

from hdopt.zo import OPTIMIZERS, HiZOO, optimizer_name, replay
from hdopt.zo.hizoo import PreconditionedDirections
from hdopt.zo.noise import NoiseGenerator, derive_key, name_id, noise
from hdopt.zo.perturb import ParamSlot

from . import test_contract as contract
from . import test_optim as shared
from .models import TinyLM, batch, bitwise_equal, snapshot
from .workers import TwoWorkerMean

KWARGS = {"lr": 1e-2, "hessian_smooth": 1e-3}


def _z(step_key: int, i: int, name: str, n: int) -> torch.Tensor:
    return noise(derive_key(derive_key(step_key, i), name_id(name)), 0, n).double()


# -- the rule, exactly ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sign", [1.0, -1.0])  # -1: negative curvature, |h| keeps D positive
def test_perturbation_hessian_update_and_step_follow_the_rule_exactly(sign):
    model, ids = TinyLM(dtype=torch.float64), batch()
    lr, eps, alpha = 1e-2, 1e-3, 0.3
    opt = HiZOO(model.named_parameters(), lr=lr, eps=eps, hessian_smooth=alpha, seed=3)
    params = dict(model.named_parameters())
    seen = []

    def closure():
        loss = sign * model.loss(ids)
        seen.append(loss.item())
        return loss

    for _ in range(3):  # from D = 1, then from the D the earlier steps built
        key = opt.step_key()
        before = {name: p.detach().clone() for name, p in params.items()}
        d_old = {name: opt.hessian(p).clone().view_as(p) for name, p in params.items()}
        seen.clear()
        assert opt.step(closure) == seen[0]  # the reported loss is l0
        l0, plus, minus = seen
        g, h = (plus - minus) / (2 * eps), (plus + minus - 2 * l0) / (2 * eps**2)
        assert opt.trajectory.records[-1].extras == (pytest.approx(h, rel=1e-12), alpha)
        for name, p in params.items():
            z = _z(key, 0, name, p.numel()).view_as(p)
            d_new = d_old[name] * (1 - alpha + alpha * abs(h) * z * z)
            assert torch.allclose(opt.hessian(p).view_as(p), d_new, rtol=1e-13, atol=0), name
            assert torch.allclose(p.detach(), before[name] - lr * g * z / d_new.sqrt(), rtol=0, atol=1e-14)
        twin = TinyLM(dtype=torch.float64)  # l+ is the loss at theta + eps z / sqrt(D_old)
        with torch.no_grad():
            for name, p in twin.named_parameters():
                p.copy_(before[name] + eps * _z(key, 0, name, p.numel()).view_as(p) / d_old[name].sqrt())
            assert sign * twin.loss(ids).item() == pytest.approx(plus, rel=1e-12)
    assert any(not torch.equal(opt.hessian(p), torch.ones_like(opt.hessian(p))) for p in params.values())


def test_a_preconditioned_direction_is_the_same_tensor_however_it_is_read():
    """z / sqrt(D) through pieces (Gaussian pieces of 64 elements), whole chunks and embedding rows."""
    tensor = torch.zeros(10, 37)
    d = torch.rand(370, generator=torch.Generator().manual_seed(0)) + 0.5
    directions = PreconditionedDirections(NoiseGenerator("gaussian", chunk=64), lambda slot: d)
    slot, key = ParamSlot(tensor, 11), 1234
    expected = noise(key, 0, 370) / d.sqrt()
    for start, length in [(0, 64), (64, 64), (100, 64), (333, 37)]:
        pieces = torch.cat([z.clone() for _, z in directions.pieces(slot, key, start, length)])
        assert torch.equal(pieces, expected[start : start + length])
        assert torch.equal(directions.generate(slot, key, start, length), expected[start : start + length])
    rows = directions.rows(slot, key, torch.tensor([0, 3 * 37, 9 * 37]), 37)
    assert torch.equal(rows, expected.view(10, 37)[[0, 3, 9]])


def test_the_run_does_not_depend_on_the_chunk_size():
    # float64: with chunk = 64 the head is computed in row blocks, whole otherwise (rounding ~1e-16, which
    # the 1/eps of the estimate and the 1/eps^2 of the curvature amplify to ~1e-10 at most)
    ids = batch()
    a, b = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_a = HiZOO(a.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1, chunk=64)
    opt_b = HiZOO(b.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1)
    for _ in range(3):
        assert opt_a.step(lambda: a.loss(ids)) == pytest.approx(opt_b.step(lambda: b.loss(ids)), rel=1e-12)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=0, atol=1e-10), name
        assert torch.allclose(opt_a.hessian(pa), opt_b.hessian(pb), rtol=1e-8, atol=0), name


# -- the estimators, statistically on quadratics ------------------------------------------------------
def _diagonal_quadratic(h: torch.Tensor, theta: torch.Tensor):
    return lambda: 0.5 * (h * theta * theta).sum() + theta.sum()


def test_one_step_hessian_estimate_has_the_mean_of_the_official_rule_on_a_quadratic():
    """alpha = 1: D_new = |h| D z^2 is one sample of the estimate. For L = theta' H theta / 2 (H diagonal)
    h = (1/2) sum_k a_k z_k^2 with a = H/D, so E[D_new_j] = H_j + (D_j/2) sum_k a_k: diag(H) plus the trace
    term the code's rule adds (the unbiased Gaussian-smoothing form has E = diag(H))."""
    h = torch.tensor([0.5, 2.0, 4.0], dtype=torch.float64)
    d0 = torch.tensor([1.0, 0.5, 3.0], dtype=torch.float64)
    theta = torch.zeros(3, dtype=torch.float64)
    opt = HiZOO([("theta", theta)], lr=1e-12, eps=0.1, hessian_smooth=1.0, perturb="inplace", seed=5)
    n = 1000
    samples = torch.empty(n, 3, dtype=torch.float64)
    for t in range(n):
        opt.hessian(theta).copy_(d0)
        opt.step(_diagonal_quadratic(h, theta))
        samples[t] = opt.hessian(theta)
    a = h / d0
    mean = h + d0 / 2 * a.sum()
    # D_new_j = (D_j/2) Y, Y = a_j z_j^4 + z_j^2 R, R = sum_{k != j} a_k z_k^2 (E z^4 = 3, z^6: 15, z^8: 105)
    r1 = a.sum() - a
    r2 = r1**2 + 2 * ((a**2).sum() - a**2)
    second = 105 * a**2 + 30 * a * r1 + 3 * r2
    variance = (d0 / 2) ** 2 * (second - (3 * a + r1) ** 2)
    stderr = (variance / n).sqrt()
    assert torch.all((samples.mean(0) - mean).abs() < 5 * stderr), (samples.mean(0) - mean) / stderr
    assert torch.all((samples.mean(0) - h).abs() > 5 * stderr)  # and it is not diag(H) alone


def test_the_step_is_preconditioned_by_the_inverse_diagonal_hessian():
    """alpha = 0 keeps D; with D = diag(H) the expected step -lr D^{-1} grad is the Newton step."""
    h = torch.tensor([0.25, 4.0, 16.0], dtype=torch.float64)
    start = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    theta = start.clone()
    opt = HiZOO([("theta", theta)], lr=1.0, eps=1e-3, hessian_smooth=0.0, perturb="inplace", seed=7)
    opt.hessian(theta).copy_(h)
    n = 1000
    steps = torch.empty(n, 3, dtype=torch.float64)
    for t in range(n):
        theta.copy_(start)
        opt.step(_diagonal_quadratic(h, theta))
        steps[t] = start - theta
    assert torch.equal(opt.hessian(theta), h)  # alpha = 0: D unchanged
    grad = h * start + 1
    newton = grad / h
    # step_j = (v . z) z_j / sqrt(D_j), v = D^{-1/2} grad: variance (|v|^2 + v_j^2) / D_j
    v = grad / h.sqrt()
    stderr = ((v.pow(2).sum() + v.pow(2)) / h / n).sqrt()
    assert torch.all((steps.mean(0) - newton).abs() < 5 * stderr), (steps.mean(0) - newton) / stderr
    assert torch.all((steps.mean(0) - grad).abs() > 5 * stderr)  # not the unpreconditioned gradient


# -- settings --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,field", [({"noise": "rademacher"}, "noise"),
                                          ({"estimator": "one-sided"}, "estimator"),
                                          ({"hessian_smooth": 1.5}, "hessian_smooth"),
                                          ({"hessian_smooth": -0.1}, "hessian_smooth")])  # fmt: skip
def test_combinations_the_rule_cannot_honour_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        HiZOO([torch.zeros(3)], **kwargs)
    if "hessian_smooth" in kwargs:  # per group too
        with pytest.raises(ValueError, match=field):
            HiZOO([{"params": [torch.zeros(3)], **kwargs}])


def test_paper_defaults_are_the_constructor_defaults_and_it_is_registered():
    opt = HiZOO([torch.zeros(3)])
    group = opt.param_groups[0]
    assert {k: group[k] for k in HiZOO.paper_defaults} == HiZOO.paper_defaults
    assert OPTIMIZERS.get("hizoo") is HiZOO and optimizer_name(HiZOO) == "hizoo"


def test_the_only_state_is_one_float32_diagonal_per_tensor_even_for_bf16_weights():
    model, ids = TinyLM(dtype=torch.bfloat16), batch()
    opt = HiZOO(model.named_parameters(), **KWARGS)
    opt.step(lambda: model.loss(ids))
    for p in model.parameters():
        assert set(opt.state[p]) == {"hessian"}
        assert opt.state[p]["hessian"].dtype == torch.float32 and opt.state[p]["hessian"].numel() == p.numel()
    header = opt.trajectory_header()
    assert header["record_extras"] == 2 and len(opt.trajectory.records[0].extras) == 2  # h_1, alpha


# -- the contract -------------------------------------------------------------------------------------------
def test_replay_rebuilds_the_weights_bitwise(tmp_path):
    shared.test_replay_rebuilds_the_weights_bitwise(HiZOO, KWARGS, tmp_path)  # q = 2 there


def test_replay_rebuilds_the_diagonal_bitwise():
    model, ids = TinyLM(), batch()
    start = snapshot(model)
    opt = HiZOO(model.named_parameters(), lr=1e-2, hessian_smooth=0.1)
    for _ in range(5):
        opt.step(lambda: model.loss(ids))
    twin = TinyLM(seed=4)
    twin.load_state_dict(start)
    rebuilt = replay(twin.named_parameters(), (opt.trajectory_header(), opt.trajectory))
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        assert torch.equal(opt.hessian(p), rebuilt.hessian(q))


def test_state_dict_through_torch_save_continues_and_replays_bitwise():
    contract.test_state_dict_through_torch_save_continues_and_replays_bitwise(HiZOO, KWARGS)


def test_a_bf16_run_replays_and_resumes_bitwise():
    ids = batch()
    model = TinyLM(dtype=torch.bfloat16)
    start = snapshot(model)
    opt = HiZOO(model.named_parameters(), lr=1e-3, eps=1e-2, hessian_smooth=0.1)
    for _ in range(3):
        opt.step(lambda: model.loss(ids))
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, buffer)
    for _ in range(3):
        opt.step(lambda: model.loss(ids))
    final = snapshot(model)
    assert not bitwise_equal(start, final)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = TinyLM(seed=2, dtype=torch.bfloat16)
    resumed.load_state_dict(saved["model"])
    opt2 = HiZOO(resumed.named_parameters(), lr=1e-3, eps=1e-2, hessian_smooth=0.1)
    opt2.load_state_dict(saved["optimizer"])
    assert all(opt2.state[p]["hessian"].dtype == torch.float32 for p in resumed.parameters())
    for _ in range(3):
        opt2.step(lambda: resumed.loss(ids))
    assert bitwise_equal(final, snapshot(resumed))
    model.load_state_dict(start)
    replay(model.named_parameters(), (opt.trajectory_header(), opt.trajectory))
    assert bitwise_equal(final, snapshot(model))


def test_forwards_per_step_counts_the_closure_calls():
    contract.test_forwards_per_step_counts_the_closure_calls(HiZOO, {"q": 2}, 5)


def test_accumulating_micro_batches_equals_the_full_batch():
    # eps = 1e-2: the second difference h = (l+ + l- - 2 l0) / (2 eps^2) turns the losses' rounding (1e-15)
    # into 1e-15 / eps^2 in h; the two runs add the micro-batch losses in different orders
    ids = batch(n=8)
    full, accum = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_full = HiZOO(full.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1)
    opt_accum = HiZOO(accum.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1)
    for _ in range(3):
        opt_full.step(lambda: full.loss(ids))
        for half in (ids[:4], ids[4:]):
            opt_accum.estimate(lambda h=half: accum.loss(h))
        opt_accum.step()
    for key, value in full.state_dict().items():
        assert torch.allclose(value, accum.state_dict()[key], rtol=0, atol=1e-12), key
    for p, q in zip(full.parameters(), accum.parameters(), strict=True):
        assert torch.allclose(opt_full.hessian(p), opt_accum.hessian(q), rtol=1e-10, atol=0)


def test_data_parallel_workers_reduce_the_raw_losses_and_take_the_whole_batch_step():
    ids = batch(n=8)
    whole = TinyLM(dtype=torch.float64)
    opt_whole = HiZOO(whole.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1)
    for _ in range(3):
        opt_whole.step(lambda: whole.loss(ids))
    fake = TwoWorkerMean()
    workers = [TinyLM(dtype=torch.float64) for _ in range(2)]
    optimizers = [HiZOO(m.named_parameters(), lr=1e-2, eps=1e-2, hessian_smooth=0.1, reduce=fake.hook(r))
                  for r, m in enumerate(workers)]  # fmt: skip

    def loop(rank):
        shard = ids[4 * rank : 4 * rank + 4]
        return lambda: [optimizers[rank].step(lambda: workers[rank].loss(shard)) for _ in range(3)]

    fake.run([loop(0), loop(1)])
    assert fake.kinds == ["losses"] * 3  # l0, l+, l-: the Hessian update needs the second difference
    assert bitwise_equal(snapshot(workers[0]), snapshot(workers[1]))
    for p, q in zip(workers[0].parameters(), workers[1].parameters(), strict=True):
        assert torch.equal(optimizers[0].hessian(p), optimizers[1].hessian(q))  # one D on every worker
    for key, value in whole.state_dict().items():
        assert torch.allclose(value, workers[0].state_dict()[key], rtol=0, atol=1e-12), key


def test_it_lowers_the_loss_of_a_tiny_lm():
    shared.test_every_rule_lowers_the_loss_of_a_tiny_lm(HiZOO, KWARGS)
