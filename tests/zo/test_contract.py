"""The ZO optimizer contract: hyperparameters per group, state_dict that continues and replays, reduce hook,
direction sources."""

import io
import json
import struct

import pytest
import torch

from hdopt.zo import (
    OPTIMIZERS,
    ZOSGD,
    Directions,
    NonFiniteLossError,
    Trajectory,
    ZOAdam,
    ZOConservative,
    ZOSign,
    optimizer_class,
    replay,
)
from hdopt.zo.noise import derive_key, name_id, noise

from . import rule_checks
from .models import TinyLM, batch, bitwise_equal, snapshot

RULES = [
    (ZOSGD, {"lr": 1e-2}),
    (ZOSGD, {"lr": 1e-2, "momentum": 0.5}),
    (ZOAdam, {"lr": 1e-2}),
    (ZOSign, {"lr": 1e-3}),
    (ZOConservative, {"lr": 1e-2}),
]
IDS = [f"{cls.__name__}{'+momentum' if 'momentum' in kw else ''}" for cls, kw in RULES]


def _z(step_key: int, direction: int, name: str, n: int) -> torch.Tensor:
    return noise(derive_key(derive_key(step_key, direction), name_id(name)), 0, n).double()


# -- hyperparameters live in param_groups, per group --------------------------------------------------------
def test_each_group_is_perturbed_and_updated_with_its_own_eps():
    a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w1, w2 = torch.zeros(30, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    seen = []

    def closure():  # a linear loss: SPSA is exact, so every number below is known in closed form
        seen.append((w1.clone(), w2.clone()))
        return a[:30] @ w1 + a[30:] @ w2

    groups = [{"params": [("w1", w1)], "eps": 1e-2}, {"params": [("w2", w2)], "eps": 1e-1}]
    opt = ZOSGD(groups, lr=0.5, perturb="inplace", seed=3)
    key = opt.step_key()
    opt.step(closure)
    z1, z2 = _z(key, 0, "w1", 30), _z(key, 0, "w2", 20)
    (p1, p2), (m1, m2) = seen
    assert torch.allclose(p1, 1e-2 * z1, rtol=1e-12, atol=0) and torch.allclose(m1, -1e-2 * z1, rtol=1e-12)
    assert torch.allclose(p2, 1e-1 * z2, rtol=1e-12, atol=0) and torch.allclose(m2, -1e-1 * z2, rtol=1e-12)
    # g = (L+ - L-) / (2 eps_1) = a1.z1 + (eps_2/eps_1) a2.z2; ghat_g = g (eps_1/eps_g) z_g
    g = a[:30] @ z1 + 10 * (a[30:] @ z2)
    assert opt.trajectory.records[0].grads[0] == pytest.approx(g.item(), rel=1e-9)
    assert torch.allclose(w1, -0.5 * g * z1, rtol=1e-9, atol=1e-15)
    assert torch.allclose(w2, -0.5 * g * 0.1 * z2, rtol=1e-9, atol=1e-15)
    assert opt.trajectory.records[0].eps == (1e-2, 1e-1)


def test_each_group_is_updated_with_its_own_lr():
    a = torch.randn(50, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    w1, w2 = torch.zeros(30, dtype=torch.float64), torch.zeros(20, dtype=torch.float64)
    groups = [{"params": [("w1", w1)]}, {"params": [("w2", w2)], "lr": 0.05}]
    opt = ZOSGD(groups, lr=0.5, eps=1e-2, perturb="inplace", seed=3)
    key = opt.step_key()
    opt.step(lambda: a[:30] @ w1 + a[30:] @ w2)
    z1, z2 = _z(key, 0, "w1", 30), _z(key, 0, "w2", 20)
    g = a[:30] @ z1 + a[30:] @ z2  # a linear loss: SPSA is exact
    assert opt.trajectory.records[0].lrs == (0.5, 0.05)
    assert torch.allclose(w1, -0.5 * g * z1, rtol=1e-9, atol=1e-15)
    assert torch.allclose(w2, -0.05 * g * z2, rtol=1e-9, atol=1e-15)


def test_momentum_is_heavy_ball_on_the_estimate():
    """torch.optim.SGD's momentum (no dampening) on ghat: ``buf <- mu buf + ghat + wd theta``,
    ``theta <- theta - lr buf``; on a linear loss every ghat is known in closed form."""
    a = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    w = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    lr, mu, wd = 0.1, 0.9, 0.01
    opt = ZOSGD([("w", w)], lr=lr, eps=1e-2, weight_decay=wd, momentum=mu, perturb="inplace", seed=5)
    expected, buf = w.clone(), torch.zeros(5, 6, dtype=torch.float64)
    for _ in range(3):
        z = _z(opt.step_key(), 0, "w", 30).view(5, 6)
        opt.step(lambda: (a * w).sum())
        buf = mu * buf + (a * z).sum() * z + wd * expected
        expected = expected - lr * buf
    assert torch.allclose(w, expected, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("name,value", [("q", 2), ("estimator", "one-sided"), ("noise", "rademacher"),
                                        ("seed", 7), ("chunk", 128)])  # fmt: skip
def test_fields_shared_by_every_group_are_refused_per_group(name, value):
    groups = [{"params": [torch.zeros(3)]}, {"params": [torch.zeros(2)], name: value}]
    with pytest.raises(ValueError, match=f"{name} is shared by all param groups"):
        ZOSGD(groups, lr=1e-3)


@pytest.mark.parametrize("bad", [{"lr": float("inf")}, {"lr": float("nan")}, {"eps": float("inf")},
                                 {"weight_decay": float("nan")}, {"q": True}, {"seed": 1.5}])  # fmt: skip
def test_non_finite_or_mistyped_hyperparameters_are_refused_in_any_group(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        ZOSGD([{"params": [torch.zeros(3)], **bad}], lr=1e-3)


def test_hyperparameters_are_in_param_groups_and_the_trajectory_header():
    opt = ZOSGD([torch.zeros(3)], lr=1e-3, eps=2e-3, q=2, noise="rademacher", seed=9, perturb="inplace")
    group = opt.param_groups[0]
    assert (group["eps"], group["q"], group["noise"], group["seed"], group["perturb"]) == (
        2e-3, 2, "rademacher", 9, "inplace")  # fmt: skip
    header = opt.trajectory_header()
    shared = {"q": 2, "estimator": "central", "noise": "rademacher", "seed": 9, "chunk": 1 << 20}
    assert header["config"] == shared
    assert header["groups"][0]["settings"]["eps"] == 2e-3


# -- state_dict: continue and replay bitwise in a plain loop ------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_state_dict_through_torch_save_continues_and_replays_bitwise(cls, kwargs):
    # a plain loop: 3 steps, save weights + optimizer, then a new process-like start from the files
    settings = {"eps": 1e-3, "weight_decay": 0.01, "seed": 4, **kwargs}
    rule_checks.resumes_bitwise(cls, settings, steps=6, stop=3)


@pytest.mark.parametrize("field,value", [("seed", 1), ("noise", "rademacher"), ("q", 2),
                                         ("estimator", "one-sided")])  # fmt: skip
def test_loading_a_state_saved_with_other_directions_is_refused(field, value):
    model, ids = TinyLM(), batch()
    opt = ZOSGD(model.named_parameters(), lr=1e-3)
    opt.step(lambda: model.loss(ids))
    other = ZOSGD(TinyLM().named_parameters(), lr=1e-3, **{field: value})
    with pytest.raises(ValueError, match=f"saved with {field}="):
        other.load_state_dict(opt.state_dict())
    assert other.step_count == 0


def test_loading_another_rules_state_is_refused_and_eps_is_restored_like_lr():
    model, ids = TinyLM(), batch()
    opt = ZOSGD(model.named_parameters(), lr=1e-3, eps=1e-3)
    opt.step(lambda: model.loss(ids))
    with pytest.raises(ValueError, match="ZOSGD into a ZOAdam"):
        ZOAdam(TinyLM().named_parameters(), lr=1e-3).load_state_dict(opt.state_dict())
    other = ZOSGD(TinyLM().named_parameters(), lr=5e-3, eps=0.5)
    other.load_state_dict(opt.state_dict())
    assert (other.param_groups[0]["lr"], other.param_groups[0]["eps"], other.step_count) == (1e-3, 1e-3, 1)


def test_a_state_whose_trajectory_lost_records_is_refused():
    model, ids = TinyLM(), batch()
    opt = ZOSGD(model.named_parameters(), lr=1e-3)
    for _ in range(2):
        opt.step(lambda: model.loss(ids))
    state = opt.state_dict()
    state["state"]["zo"]["trajectory"] = state["state"]["zo"]["trajectory"][:48]
    with pytest.raises(ValueError, match="1 records for 2 steps"):
        ZOSGD(TinyLM().named_parameters(), lr=1e-3).load_state_dict(state)


# -- the reduce hook -----------------------------------------------------------------------------------------
class RecordingReduce:
    """A stand-in for a cross-worker reduction: records the calls and returns ``factor * values``."""

    def __init__(self, factor=1.0):
        self.calls, self.factor = [], factor

    def __call__(self, values, kind):
        self.calls.append((kind, list(values)))
        return [v * self.factor for v in values]


def test_the_reduce_hook_combines_the_projected_gradients_before_the_update():
    ids = batch()
    plain, reduced = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    hook = RecordingReduce(factor=0.5)
    opt_plain = ZOSGD(plain.named_parameters(), lr=5e-3, q=2)
    opt_reduced = ZOSGD(reduced.named_parameters(), lr=1e-2, q=2, reduce=hook)
    opt_plain.step(lambda: plain.loss(ids))
    opt_reduced.step(lambda: reduced.loss(ids))
    assert [kind for kind, _ in hook.calls] == ["projected_gradients"]
    assert len(hook.calls[0][1]) == 2
    assert opt_reduced.trajectory.records[0].grads == tuple(0.5 * g for g in hook.calls[0][1])
    for name, value in plain.state_dict().items():  # lr 1e-2 on half the gradient = lr 5e-3 on all of it
        assert torch.allclose(value, reduced.state_dict()[name], rtol=0, atol=1e-15), name


def test_conservative_reduces_its_candidate_losses_too():
    model, ids = TinyLM(), batch()
    hook = RecordingReduce()
    ZOConservative(model.named_parameters(), lr=1e-2, reduce=hook).step(lambda: model.loss(ids))
    assert [kind for kind, _ in hook.calls] == ["projected_gradients", "candidate_losses"]
    assert len(hook.calls[1][1]) == 3


def test_with_a_reduce_hook_a_local_nan_still_joins_the_reduction_then_raises():
    model, ids = TinyLM(), batch()
    before = snapshot(model)
    hook = RecordingReduce()
    opt = ZOSGD(model.named_parameters(), lr=1e-2, reduce=hook)
    factors = iter([float("nan"), 1.0])
    with pytest.raises(NonFiniteLossError, match=r"nan at \+eps direction 0"):
        opt.step(lambda: model.loss(ids) * next(factors))
    assert len(hook.calls) == 1 and hook.calls[0][1][0] != hook.calls[0][1][0]  # it joined, with NaN
    assert bitwise_equal(before, snapshot(model)) and opt.step_count == 0
    # a peer's failure arrives as NaN from the reduction: every worker raises alike
    peer = ZOSGD(model.named_parameters(), lr=1e-2, reduce=lambda values, kind: [float("nan")] * len(values))
    with pytest.raises(NonFiniteLossError, match="another worker"):
        peer.step(lambda: model.loss(ids))
    assert bitwise_equal(before, snapshot(model))
    opt.step(lambda: model.loss(ids))  # the failure is not carried over to the next step
    assert opt.step_count == 1


def test_a_rule_that_cannot_be_data_parallel_refuses_a_reduce_hook():
    class Local(ZOSGD):
        """Its state depends on each worker's own batch."""

        data_parallel = False

    with pytest.raises(NotImplementedError, match="cannot run data-parallel"):
        Local([torch.zeros(2)], lr=1e-3, reduce=RecordingReduce())


# -- forwards per step ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs,expected", [
    (ZOSGD, {"q": 2}, 4), (ZOSGD, {"q": 3, "estimator": "one-sided"}, 4), (ZOConservative, {}, 5),
])  # fmt: skip
def test_forwards_per_step_counts_the_closure_calls(cls, kwargs, expected):
    model, ids = TinyLM(), batch()
    opt = cls(model.named_parameters(), lr=1e-3, **kwargs)
    calls = []
    opt.step(lambda: (calls.append(1), model.loss(ids))[1])
    assert len(calls) == opt.forwards_per_step() == expected
    assert opt.forwards_per_step(micro_batches=2) == 2 * expected - (3 if cls is ZOConservative else 0)


# -- direction sources --------------------------------------------------------------------------------------
class MaskedDirections(Directions):
    """Directions zero outside the first half of every tensor (a Sparse-MeZO-like source)."""

    def _mask(self, slot, start, length):
        offsets = torch.arange(start, start + length)
        return (offsets < slot.tensor.numel() // 2).float()

    def pieces(self, slot, key, start, length):
        for at, z in super().pieces(slot, key, start, length):
            yield at, z * self._mask(slot, start + at, z.numel())

    def generate(self, slot, key, start, length):
        return super().generate(slot, key, start, length) * self._mask(slot, start, length)

    def rows(self, slot, key, offsets, width):
        rows = super().rows(slot, key, offsets, width)
        cols = offsets.view(-1, 1) + torch.arange(width)
        return rows * (cols < slot.tensor.numel() // 2).float()


class MaskedSGD(ZOSGD):
    def make_directions(self, generator):
        return MaskedDirections(generator)


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_a_direction_source_is_used_by_the_perturbation_and_the_update(momentum):
    model, ids = TinyLM(), batch()
    before = snapshot(model)
    opt = MaskedSGD(model.named_parameters(), lr=1e-1, momentum=momentum)
    for _ in range(3):
        opt.step(lambda: model.loss(ids))
    after = snapshot(model)
    for name, value in after.items():
        flat, old = value.view(-1), before[name].view(-1)
        half = flat.numel() // 2
        assert torch.equal(flat[half:], old[half:]), name  # never perturbed, never updated
        assert not torch.equal(flat[:half], old[:half]), name
    # the perturbed forward saw exactly the masked directions: the loss differences match explicit weights
    twin = TinyLM()
    twin.load_state_dict(after)
    probe = MaskedSGD(twin.named_parameters(), lr=0.0)
    key = probe.step_key()
    with torch.no_grad():
        plus = probe.evaluate(lambda: twin.loss(ids), [(derive_key(key, 0), 1.0)], "probe",
                              probe.eps_factors(1.0))  # fmt: skip
        for name, p in twin.named_parameters():
            z = _z(key, 0, name, p.numel()).float()
            z[p.numel() // 2 :] = 0
            p.add_((1e-3 * z).view_as(p))
        explicit = twin.loss(ids).item()
    assert plus == pytest.approx(explicit, abs=1e-6)


# -- registry and old trajectory files --------------------------------------------------------------------
def test_registry_names_every_rule_once():
    assert set(OPTIMIZERS) >= {"zosgd", "zoadam", "zosign", "zoconservative"}
    assert len(set(OPTIMIZERS.values())) == len(OPTIMIZERS)
    with pytest.raises(ValueError, match="already registered"):
        OPTIMIZERS.register("zosgd", ZOSGD)
    assert optimizer_class("ZOAdam") is ZOAdam and optimizer_class("zoadam") is ZOAdam
    with pytest.raises(ValueError, match="unknown zeroth-order optimizer 'adam'; known: zosgd"):
        optimizer_class("adam")


def test_first_format_trajectory_files_still_replay(tmp_path):
    model, ids = TinyLM(), batch()
    start = snapshot(model)
    opt = ZOSGD(model.named_parameters(), lr=1e-2, eps=1e-3, weight_decay=0.01)
    for _ in range(4):
        opt.step(lambda: model.loss(ids))
    # the first format: eps and the shared fields in "config", no eps per record
    header = opt.trajectory_header()
    names = header["groups"][0]["names"]
    moved = ("eps", "q", "estimator", "noise", "seed", "chunk", "perturb")
    settings = {k: v for k, v in header["groups"][0]["settings"].items() if k not in moved}
    v1 = {"format": "hdopt-zo-trajectory/1", "optimizer": "ZOSGD",
          "config": {"eps": 1e-3, "q": 1, "estimator": "central", "noise": "gaussian", "seed": 0,
                     "chunk": 1 << 20, "perturb": "auto"},
          "groups": [{"settings": settings, "names": names, "size": len(names)}]}  # fmt: skip
    body = b"".join(struct.pack("<QQddd", r.step, r.step_key, r.scale, r.grads[0], r.lrs[0])
                    for r in opt.trajectory)  # fmt: skip
    (tmp_path / "old.zo").write_bytes(json.dumps(v1).encode() + b"\n" + body)
    _, loaded = Trajectory.load(tmp_path / "old.zo")
    assert [r.eps for r in loaded] == [(1e-3,)] * 4
    rebuilt = TinyLM(seed=3)
    rebuilt.load_state_dict(start)
    replay(rebuilt.named_parameters(), tmp_path / "old.zo")
    assert bitwise_equal(snapshot(model), snapshot(rebuilt))


@pytest.mark.parametrize("cls,kwargs", [(ZOAdam, {"lr": 1e-2}), (ZOSGD, {"lr": 1e-2, "momentum": 0.5})],
                         ids=["ZOAdam", "ZOSGD+momentum"])  # fmt: skip
def test_float32_buffers_of_bf16_weights_stay_float32_through_a_state_dict_round_trip(cls, kwargs):
    """torch's load_state_dict casts optimizer state to the parameter's dtype: bf16 would round buffers."""
    ids = batch()
    straight, first = TinyLM(dtype=torch.bfloat16), TinyLM(dtype=torch.bfloat16)
    opt = cls(straight.named_parameters(), eps=1e-2, seed=4, **kwargs)
    opt1 = cls(first.named_parameters(), eps=1e-2, seed=4, **kwargs)
    for _ in range(3):
        opt.step(lambda: straight.loss(ids))
        opt1.step(lambda: first.loss(ids))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = TinyLM(seed=9, dtype=torch.bfloat16)
    second.load_state_dict(saved["model"])
    opt2 = cls(second.named_parameters(), eps=1e-2, seed=4, **kwargs)
    opt2.load_state_dict(saved["optimizer"])
    buffers = [v for p in second.parameters() for v in opt2.state[p].values() if isinstance(v, torch.Tensor)]
    assert buffers and all(b.dtype == torch.float32 for b in buffers)
    for _ in range(3):
        opt.step(lambda: straight.loss(ids))
        opt2.step(lambda: second.loss(ids))
    assert bitwise_equal(snapshot(straight), snapshot(second))
