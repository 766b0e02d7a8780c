"""Local SGD in one process (the simulated mode) against plain reference loops."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hdopt.distributed import Communicator, LocalSGD, LocalSGDConfig, parameter_bytes

from .scenarios import LOCAL_SGD_STEPS, LocalRun, bn_mlp, dataset


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 12), nn.Tanh(), nn.Linear(12, 4)).double()


def _batches(k, steps, b=8, seed=0):
    x, y = dataset(dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return [[torch.randint(0, len(y), (b,), generator=g) for _ in range(k)] for _ in range(steps)], x, y


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _replicas(k, make=_mlp, lr=0.1, **opt_kw):
    models = [make() for _ in range(k)]
    return models, [torch.optim.SGD(m.parameters(), lr=lr, **opt_kw) for m in models]


def _train(sgd, models, opts, idx_steps, x, y):
    for idxs in idx_steps:
        for m, o, idx in zip(models, opts, idxs, strict=True):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
        sgd.step()


def test_h1_equals_minibatch_sgd_on_the_union_of_the_batches():
    k, steps = 4, 10
    idx_steps, x, y = _batches(k, steps)
    models, opts = _replicas(k)
    _train(LocalSGD(models, opts, LocalSGDConfig(period=1)), models, opts, idx_steps, x, y)
    ref = _mlp()
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    for idxs in idx_steps:
        opt.zero_grad()
        F.cross_entropy(ref(x[torch.cat(idxs)]), y[torch.cat(idxs)]).backward()
        opt.step()
    for m in models:
        torch.testing.assert_close(_flat(m), _flat(ref), rtol=1e-12, atol=1e-12)


def test_period_h_matches_a_hand_written_loop_and_logs_rounds():
    k, steps, h = 3, 11, 4
    idx_steps, x, y = _batches(k, steps)
    models, opts = _replicas(k, momentum=0.9)
    sgd = LocalSGD(models, opts, LocalSGDConfig(period=h))
    _train(sgd, models, opts, idx_steps, x, y)
    ref = [_mlp() for _ in range(k)]
    ref_opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in ref]
    for t, idxs in enumerate(idx_steps, start=1):
        for m, o, idx in zip(ref, ref_opts, idxs, strict=True):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            o.step()
        if t % h == 0:
            with torch.no_grad():
                for ps in zip(*(m.parameters() for m in ref), strict=True):
                    mean = sum(ps) / k
                    for p in ps:
                        p.copy_(mean)
    for m, r in zip(models, ref, strict=True):  # step 11 is mid-round: replicas differ, each as in the loop
        torch.testing.assert_close(_flat(m), _flat(r), rtol=1e-12, atol=1e-12)
    assert [r.step for r in sgd.rounds] == [4, 8] and all(r.period == h for r in sgd.rounds)
    assert sgd.bytes_communicated == 2 * parameter_bytes(models[0])
    assert not torch.equal(_flat(models[0]), _flat(models[1]))
    last = sgd.synchronize()  # the partial last round (3 steps)
    assert last.period == 3 and torch.equal(_flat(models[0]), _flat(models[2]))
    assert sgd.synchronize() is None and len(sgd.rounds) == 3


def test_post_local_phase_keeps_replicas_identical_then_diverges():
    k = 3
    idx_steps, x, y = _batches(k, 8)
    models, opts = _replicas(k)
    sgd = LocalSGD(models, opts, LocalSGDConfig(period=3, post_local_steps=5))
    _train(sgd, models, opts, idx_steps[:5], x, y)
    assert all(torch.equal(_flat(m), _flat(models[0])) for m in models)
    assert sgd.rounds == [] and sgd.bytes_communicated == 5 * parameter_bytes(models[0])
    _train(sgd, models, opts, idx_steps[5:7], x, y)
    assert not torch.equal(_flat(models[0]), _flat(models[1]))
    _train(sgd, models, opts, idx_steps[7:], x, y)
    assert [r.step for r in sgd.rounds] == [8]


def test_batchnorm_statistics_and_optimizer_state_are_averaged():
    k = 2
    x, y = dataset()
    models = [bn_mlp() for _ in range(k)]
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in models]
    sgd = LocalSGD(models, opts, LocalSGDConfig(period=2, average_optimizer_state=True))
    before = None
    for t in range(2):
        for j, (m, o) in enumerate(zip(models, opts, strict=True)):
            o.zero_grad()
            F.cross_entropy(m(x[16 * j + 40 * t:16 * j + 40 * t + 16]), y[:16]).backward()
        if t == 1:
            before = [m[1].running_mean.clone() for m in models]
            moments = [o.state[m[0].weight]["exp_avg_sq"].clone() for m, o in zip(models, opts, strict=True)]
        sgd.step()
    assert not torch.equal(before[0], before[1])
    for m in models:
        torch.testing.assert_close(m[1].running_mean, (before[0] + before[1]) / 2)
    # Adam steps first, then its moments are averaged: compare with the moments after the local step
    assert torch.equal(opts[0].state[models[0][0].weight]["exp_avg_sq"],
                       opts[1].state[models[1][0].weight]["exp_avg_sq"])
    assert not torch.equal(moments[0], moments[1])


def test_optimizer_state_is_left_alone_by_default():
    idx_steps, x, y = _batches(2, 2)
    models, opts = _replicas(2, momentum=0.9)
    _train(LocalSGD(models, opts, LocalSGDConfig(period=2)), models, opts, idx_steps, x, y)
    bufs = [o.state[m[0].weight]["momentum_buffer"] for m, o in zip(models, opts, strict=True)]
    assert not torch.equal(bufs[0], bufs[1])


def test_outer_nesterov_step_follows_the_formula():
    k, h, lr_out, mu = 2, 3, 0.7, 0.9
    idx_steps, x, y = _batches(k, 2 * h)
    models, opts = _replicas(k)
    cfg = LocalSGDConfig(period=h, outer_lr=lr_out, outer_momentum=mu, outer_nesterov=True)
    sgd = LocalSGD(models, opts, cfg)
    ref, ref_opts = _replicas(k)
    theta, m_buf = _flat(ref[0]).clone(), None
    for t, idxs in enumerate(idx_steps, start=1):
        for m, o, idx in zip(ref, ref_opts, idxs, strict=True):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            o.step()
        if t % h == 0:
            delta = theta - sum(_flat(m) for m in ref) / k
            m_buf = delta.clone() if m_buf is None else mu * m_buf + delta
            theta = theta - lr_out * (delta + mu * m_buf)
            with torch.no_grad():
                for m in ref:
                    torch.nn.utils.vector_to_parameters(theta.clone(), m.parameters())
    _train(sgd, models, opts, idx_steps, x, y)
    for m in models:
        torch.testing.assert_close(_flat(m), theta, rtol=1e-10, atol=1e-12)


def test_qsr_grows_the_period_as_the_cosine_lr_decays():
    k, steps, alpha, base = 2, 120, 0.06, 2
    idx_steps, x, y = _batches(k, steps)
    models, opts = _replicas(k, lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opts[0], steps)
    sgd = LocalSGD(models, opts, LocalSGDConfig(period=base, schedule="qsr", qsr_alpha=alpha))
    lrs_at_round_start = {}
    for t, idxs in enumerate(idx_steps):
        if sgd.counters.local_steps == 0:
            lrs_at_round_start[t] = opts[0].param_groups[0]["lr"]
        for m, o, idx in zip(models, opts, idxs, strict=True):
            o.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
        sgd.step()
        assert opts[1].param_groups[0]["lr"] == opts[0].param_groups[0]["lr"]  # the lead's lr is copied
        sched.step()
    periods = [r.period for r in sgd.rounds]
    starts = [r.step - r.period for r in sgd.rounds]
    expected = [max(base, int((alpha / lrs_at_round_start[s]) ** 2)) for s in starts]
    assert periods == expected
    assert periods[0] == base and periods[-1] >= 4 * base and len(set(periods)) >= 3  # grows as lr decays
    assert periods == sorted(periods)


def test_state_dict_round_trip_continues_identically():
    a = LocalRun([0, 1], Communicator.single())
    a.train(7)
    saved = copy.deepcopy(a.state_dict())
    a.train(LOCAL_SGD_STEPS - 7)
    b = LocalRun([0, 1], Communicator.single())
    b.load_state_dict(saved)
    b.train(LOCAL_SGD_STEPS - 7)
    for k in range(2):
        assert torch.equal(a.flat(k), b.flat(k))
    untimed = [[(r.step, r.period, r.lr, r.bytes) for r in run.sgd.rounds] for run in (a, b)]
    assert untimed[0] == untimed[1] and len(untimed[0]) == 4


def test_replicas_with_different_weights_are_refused():
    models = [_mlp(0), _mlp(1)]
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in models]
    with pytest.raises(ValueError, match="replica 1 differs"):
        LocalSGD(models, opts, LocalSGDConfig())


def test_state_with_other_replica_count_is_refused():
    a = LocalRun([0, 1], Communicator.single())
    b = LocalRun([0], Communicator.single())
    with pytest.raises(ValueError, match="2 replicas"):
        b.sgd.load_state_dict(a.sgd.state_dict())
