"""FZOO: the normalized one-sided step, checked against the closure's own losses and regenerated directions;
the contract's replay / resume / accumulation / data-parallel properties."""

import pytest
import torch

from hdopt.zo import FZOO, OPTIMIZERS, optimizer_name, replay
from hdopt.zo.noise import derive_key, name_id, noise

from . import test_contract as contract
from . import test_optim as shared
from .models import TinyLM, batch, bitwise_equal, snapshot
from .workers import TwoWorkerMean

KWARGS = {"lr": 1e-2, "q": 4}


def _direction(step_key: int, i: int, name: str, n: int) -> torch.Tensor:
    return noise(derive_key(derive_key(step_key, i), name_id(name)), 0, n, "rademacher").double()


def _recording(model, ids, seen):
    def closure():
        loss = model.loss(ids)
        seen.append(loss.item())
        return loss

    return closure


# -- the defining property: the step is the normalized one-sided estimate -------------------------------
@pytest.mark.parametrize("n", [2, 5])
def test_the_step_is_lr_over_n_sigma_times_the_sum_of_loss_differences_along_the_directions(n):
    model, ids = TinyLM(dtype=torch.float64), batch()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen = []
    opt = FZOO(model.named_parameters(), lr=1e-2, eps=1e-3, q=n, seed=3)
    key = opt.step_key()
    reported = opt.step(_recording(model, ids, seen))
    assert len(seen) == n + 1 == opt.forwards_per_step()
    base, perturbed = seen[0], torch.tensor(seen[1:], dtype=torch.float64)
    assert reported == base  # l_0, the unperturbed loss
    sigma = perturbed.std(unbiased=False)  # the population std of the N perturbed losses (the code's)
    coefficients = (perturbed - base) / sigma
    for name, p in model.named_parameters():
        zs = [_direction(key, i, name, p.numel()).view_as(p) for i in range(n)]
        expected = before[name] - 1e-2 / n * sum(c * z for c, z in zip(coefficients, zs, strict=True))
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13), name
    # each l_i is the loss at theta + eps u_i with u_i the Rademacher direction the update used
    twin = TinyLM(dtype=torch.float64)
    with torch.no_grad():
        for i in range(n):
            for name, p in twin.named_parameters():
                p.copy_(before[name] + 1e-3 * _direction(key, i, name, p.numel()).view_as(p))
            assert twin.loss(ids).item() == pytest.approx(seen[1 + i], rel=1e-12)


def test_the_step_does_not_depend_on_the_scale_or_offset_of_the_loss():
    """Normalized SGD: l_i - l_0 and sigma scale alike, so k L + c takes the step of L."""
    ids = batch()
    plain, scaled = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_plain = FZOO(plain.named_parameters(), lr=1e-2, q=4)
    opt_scaled = FZOO(scaled.named_parameters(), lr=1e-2, q=4)
    for _ in range(3):
        opt_plain.step(lambda: plain.loss(ids))
        opt_scaled.step(lambda: 250.0 * scaled.loss(ids) + 7.0)
    for (name, a), (_, b) in zip(plain.named_parameters(), scaled.named_parameters(), strict=True):
        assert torch.allclose(a, b, rtol=0, atol=1e-12), name


@pytest.mark.filterwarnings("ignore:.*not used inside the forward")
def test_no_spread_in_the_perturbed_losses_means_no_step():
    model = TinyLM()
    before = snapshot(model)
    opt = FZOO(model.named_parameters(), lr=1.0, q=3)
    opt.step(lambda: torch.tensor(2.0))  # every perturbed loss equals l_0: sigma = 0
    assert opt.trajectory.records[0].grads == (0.0, 0.0, 0.0)
    assert bitwise_equal(before, snapshot(model))


@pytest.mark.parametrize("kwargs,field", [({"estimator": "central"}, "estimator"), ({"q": 1}, "q >= 2"),
                                          ({"momentum": 0.9}, "momentum")])  # fmt: skip
def test_combinations_the_rule_cannot_honour_are_refused(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FZOO([torch.zeros(3)], **kwargs)
    if "momentum" in kwargs:  # per group too
        with pytest.raises(ValueError, match=field):
            FZOO([{"params": [torch.zeros(3)], **kwargs}])


def test_paper_defaults_are_the_constructor_defaults_and_it_is_registered():
    opt = FZOO([torch.zeros(3)])
    group = opt.param_groups[0]
    assert {k: group[k] for k in FZOO.paper_defaults} == FZOO.paper_defaults
    assert FZOO.paper_defaults["q"] == 8 and FZOO.paper_defaults["noise"] == "rademacher"
    assert OPTIMIZERS.get("fzoo") is FZOO and optimizer_name(FZOO) == "fzoo"


# -- the contract -------------------------------------------------------------------------------------------
def test_replay_rebuilds_the_weights_bitwise(tmp_path):
    shared.test_replay_rebuilds_the_weights_bitwise(FZOO, {"lr": 1e-2}, tmp_path)  # q = 2 there


def test_state_dict_through_torch_save_continues_and_replays_bitwise():
    contract.test_state_dict_through_torch_save_continues_and_replays_bitwise(FZOO, KWARGS)


def test_forwards_per_step_counts_the_closure_calls():
    contract.test_forwards_per_step_counts_the_closure_calls(FZOO, {"q": 3}, 4)


def test_a_bf16_run_replays_bitwise():
    model, ids = TinyLM(dtype=torch.bfloat16), batch()
    start = snapshot(model)
    opt = FZOO(model.named_parameters(), lr=1e-3, eps=1e-2, q=4)
    for _ in range(8):
        opt.step(lambda: model.loss(ids))
    final = snapshot(model)
    assert not bitwise_equal(start, final)
    model.load_state_dict(start)
    replay(model.named_parameters(), (opt.trajectory_header(), opt.trajectory))
    assert bitwise_equal(final, snapshot(model))


def test_accumulating_micro_batches_equals_the_full_batch():
    ids = batch(n=8)
    full, accum = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_full = FZOO(full.named_parameters(), lr=1e-2, eps=1e-4, q=4)
    opt_accum = FZOO(accum.named_parameters(), lr=1e-2, eps=1e-4, q=4)
    for _ in range(3):
        opt_full.step(lambda: full.loss(ids))
        for half in (ids[:4], ids[4:]):
            opt_accum.estimate(lambda h=half: accum.loss(h))
        opt_accum.step()
    assert opt_accum.forwards_per_step(micro_batches=2) == 10
    for key, value in full.state_dict().items():
        assert torch.allclose(value, accum.state_dict()[key], rtol=0, atol=1e-12), key


def test_data_parallel_workers_reduce_the_raw_losses_and_take_the_whole_batch_step():
    ids = batch(n=8)
    whole = TinyLM(dtype=torch.float64)
    opt_whole = FZOO(whole.named_parameters(), lr=1e-2, eps=1e-4, q=4)
    for _ in range(3):
        opt_whole.step(lambda: whole.loss(ids))
    fake = TwoWorkerMean()
    workers = [TinyLM(dtype=torch.float64) for _ in range(2)]
    optimizers = [FZOO(m.named_parameters(), lr=1e-2, eps=1e-4, q=4, reduce=fake.hook(r))
                  for r, m in enumerate(workers)]  # fmt: skip

    def loop(rank):
        shard = ids[4 * rank : 4 * rank + 4]
        return lambda: [optimizers[rank].step(lambda: workers[rank].loss(shard)) for _ in range(3)]

    fake.run([loop(0), loop(1)])
    assert fake.kinds == ["losses"] * 3  # the N + 1 raw losses, not the projected gradients
    assert bitwise_equal(snapshot(workers[0]), snapshot(workers[1]))  # every worker takes the same step
    for key, value in whole.state_dict().items():  # ... the one process takes on the whole batch
        assert torch.allclose(value, workers[0].state_dict()[key], rtol=0, atol=1e-12), key


def test_it_lowers_the_loss_of_a_tiny_lm():
    shared.test_every_rule_lowers_the_loss_of_a_tiny_lm(FZOO, KWARGS)
