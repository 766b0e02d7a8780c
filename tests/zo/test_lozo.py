"""LOZO / LOZO-M: low-rank directions U V^T rebuilt from the counter-based noise, V shared by a window of nu
steps, the factor momentum, and the contract every rule keeps."""

import pytest
import torch

from hdopt.zo import LOZO, OPTIMIZERS
from hdopt.zo.lozo import V_TAG, LowRankDirections
from hdopt.zo.noise import NoiseGenerator, derive_key, name_id, noise
from hdopt.zo.perturb import ParamSlot

from . import rule_checks
from .models import TinyLM, batch, snapshot

RULES = [
    (LOZO, {"lr": 1e-2, "rank": 2, "interval": 3}),
    (LOZO, {"lr": 1e-2, "rank": 2, "interval": 3, "momentum": 0.9}),
]
IDS = ["LOZO", "LOZO-M"]


def _u(step_key: int, direction: int, name: str, rows: int, rank: int) -> torch.Tensor:
    """U of a tensor: its direction stream read row-major (float64 of the float32 noise)."""
    key = derive_key(derive_key(step_key, direction), name_id(name))
    return noise(key, 0, rows * rank).double().view(rows, rank)


def _v(seed: int, window: int, name: str, cols: int, rank: int) -> torch.Tensor:
    return noise(derive_key(seed, V_TAG, window, name_id(name)), 0, cols * rank).double().view(cols, rank)


def _z(step_key: int, direction: int, name: str, numel: int) -> torch.Tensor:
    return noise(derive_key(derive_key(step_key, direction), name_id(name)), 0, numel).double()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to the float32 rounding of the factors' products (relative 6e-8 per element)."""
    return torch.allclose(actual, expected, rtol=1e-5, atol=1e-6 * expected.abs().max().item())


# -- the rule, rebuilt from the noise -----------------------------------------------------------------------
def test_each_update_is_minus_lr_g_u_v_transposed_with_v_fixed_for_a_window():
    model, ids = TinyLM(dtype=torch.float64), batch()
    lr, rank, interval, q, seed = 1e-2, 2, 3, 2, 7
    opt = LOZO(model.named_parameters(), lr=lr, rank=rank, interval=interval, q=q, seed=seed)
    for t in range(7):  # windows 0, 0, 0, 1, 1, 1, 2
        before = snapshot(model)
        opt.step(lambda: model.loss(ids))
        record = opt.trajectory.records[-1]
        coefs = [g / q for g in record.grads]
        for name, p in model.named_parameters():
            delta = p.detach() - before[name]
            if p.ndim == 2:
                v = _v(seed, t // interval, name, p.shape[1], rank)
                us = [_u(record.step_key, i, name, p.shape[0], rank) for i in range(q)]
                expected = -lr * sum(c * u @ v.T for c, u in zip(coefs, us, strict=True))
            else:  # 1-D: MeZO's i.i.d. directions
                expected = -lr * sum(c * _z(record.step_key, i, name, p.numel()) for i, c in enumerate(coefs))
            assert _close(delta, expected), (t, name)


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_every_matrix_update_has_rank_at_most_r_and_a_window_spans_r_dimensions(cls, kwargs):
    # float64 weights, factors' products rounded in float32: spurious singular values are ~1e-7 of the
    # largest, real ones ~1e-1 (checked), so rank is counted at rtol 1e-5
    model, ids = TinyLM(dtype=torch.float64), batch()
    opt = cls(model.named_parameters(), q=2, **{**kwargs, "interval": 4})
    snapshots = [snapshot(model)]
    for _ in range(6):  # windows 0, 0, 0, 0, 1, 1
        opt.step(lambda: model.loss(ids))
        snapshots.append(snapshot(model))
    for name in ("embed.weight", "hidden.weight"):
        for before, after in zip(snapshots[:-1], snapshots[1:], strict=True):
            delta = after[name] - before[name]
            singular = torch.linalg.svdvals(delta)
            assert singular[1] > 1e-3 * singular[0] and singular[2] < 1e-5 * singular[0], name
            assert torch.linalg.matrix_rank(delta, rtol=1e-5) == 2
        within = snapshots[4][name] - snapshots[0][name]  # four steps along one V
        across = snapshots[6][name] - snapshots[2][name]  # two steps of window 0, two of window 1
        assert torch.linalg.matrix_rank(within, rtol=1e-5) == 2, name
        assert torch.linalg.matrix_rank(across, rtol=1e-5) == 4, name


def test_the_forward_sees_eps_u_v_transposed_through_the_embedding_and_the_tied_head():
    model, ids = TinyLM(dtype=torch.float64), batch()
    rank, interval, seed, eps = 3, 2, 5, 1e-3
    probe = LOZO(model.named_parameters(), lr=0.0, eps=eps, rank=rank, interval=interval, seed=seed)
    for _ in range(3):  # lr 0: the weights stay, the step count moves to 3 (window 1)
        probe.step(lambda: model.loss(ids))
    step_key = probe.step_key()
    with torch.no_grad():
        unperturbed = model.loss(ids).item()
        hooked = probe.evaluate(lambda: model.loss(ids), [(derive_key(step_key, 0), 1.0)], "probe",
                                probe.eps_factors(1.0))  # fmt: skip
        for name, p in model.named_parameters():
            if p.ndim == 2:
                direction = _u(step_key, 0, name, p.shape[0], rank) @ _v(seed, 1, name, p.shape[1], rank).T
            else:
                direction = _z(step_key, 0, name, p.numel()).view_as(p)
            p.add_(eps * direction)
        explicit = model.loss(ids).item()
    # the hooked copies add eps times float32 products: they differ from the float64 ones by ~1e-10
    assert hooked == pytest.approx(explicit, abs=1e-8)
    assert abs(hooked - unperturbed) > 1e-5  # the perturbation is visible at this tolerance


# -- the directions: any cut, rows, the layout --------------------------------------------------------------
def _directions(tensor: torch.Tensor, chunk: int, rank: int = 3) -> tuple[LowRankDirections, ParamSlot]:
    source = LowRankDirections(NoiseGenerator("gaussian", chunk), seed=3)
    source.configure(step=5, seed=3, specs={id(tensor): (rank, 2)})
    return source, ParamSlot(tensor, ident=name_id("w"))


def _whole(source, slot, key, numel):
    out = torch.empty(numel)
    for at, values in source.pieces(slot, key, 0, numel):
        out[at : at + values.numel()] = values
    return out


@pytest.mark.parametrize("shape", [(37, 150), (5, 4, 30), (40, 2)])  # rows longer than a chunk; 3-D; n < r
def test_directions_do_not_depend_on_the_cut_and_rows_match_the_stream(shape):
    tensor = torch.zeros(shape)
    numel, m = tensor.numel(), shape[0]
    n = numel // m
    key = 12345
    big, slot = _directions(tensor, 1 << 20)
    small, _ = _directions(tensor, 64)
    reference = _whole(big, slot, key, numel)
    assert torch.equal(_whole(small, slot, key, numel), reference)  # rows split, partial rows
    for start, length in [(0, 64), (7, 50), (abs(n - 3), 9), (numel - 64, 64), (2 * n + 1, 1)]:
        assert torch.equal(small.generate(slot, key, start, length), reference[start : start + length])
    aligned = torch.tensor([0, 2, m - 1]) * n
    assert torch.equal(small.rows(slot, key, aligned, n), reference.view(m, n)[[0, 2, m - 1]])
    unaligned = torch.tensor([1, n + 5])
    rows = small.rows(slot, key, unaligned, 8)
    assert torch.equal(rows, torch.stack([reference[o : o + 8] for o in unaligned.tolist()]))
    # the layout: U row-major from the key, V from (seed, V_TAG, step // interval, ident)
    u = noise(key, 0, m * 3).double().view(m, 3)
    v = noise(derive_key(3, V_TAG, 5 // 2, name_id("w")), 0, n * 3).double().view(n, 3)
    assert _close(reference.double().view(m, n), u @ v.T)


def test_one_dimensional_tensors_get_iid_noise():
    tensor = torch.zeros(100)
    source, slot = _directions(tensor, 64)
    assert torch.equal(source.generate(slot, 99, 10, 50), noise(99, 10, 50))


# -- LOZO-M ------------------------------------------------------------------------------------------------
def test_lozo_m_keeps_momentum_in_the_m_by_r_factor_and_carries_it_to_the_next_v():
    model, ids = TinyLM(dtype=torch.float64), batch()
    start = snapshot(model)
    lr, rank, interval, beta, seed = 1e-2, 2, 3, 0.9, 11
    opt = LOZO(model.named_parameters(), lr=lr, rank=rank, interval=interval, momentum=beta, seed=seed)
    for _ in range(8):  # windows 0, 0, 0, 1, 1, 1, 2, 2
        opt.step(lambda: model.loss(ids))

    # the rule in plain torch, float64: N_0 = g U; N_t = beta N~ + (1 - beta) g U; W -= lr N V^T
    weights = {k: v.clone() for k, v in start.items()}
    momentum: dict[str, torch.Tensor] = {}
    for record in opt.trajectory:
        t, g = record.step, record.grads[0]
        for name, w in weights.items():
            if name == "head.weight":
                continue  # tied to embed.weight
            if w.ndim == 2:
                v = _v(seed, t // interval, name, w.shape[1], rank)
                fresh = g * _u(record.step_key, 0, name, w.shape[0], rank)
                if t == 0:
                    momentum[name] = fresh
                else:
                    carried = momentum[name]
                    if t % interval == 0:
                        v_old = _v(seed, t // interval - 1, name, w.shape[1], rank)
                        carried = carried @ (v_old.T @ v) / w.shape[1]
                    momentum[name] = beta * carried + (1 - beta) * fresh
                w -= lr * momentum[name] @ v.T
            else:
                fresh = g * _z(record.step_key, 0, name, w.numel()).view_as(w)
                momentum[name] = fresh if t == 0 else beta * momentum[name] + (1 - beta) * fresh
                w -= lr * momentum[name]
    for name, p in model.named_parameters():
        assert _close(p.detach() - start[name], weights[name] - start[name]), name
    # the state: an m x r factor per matrix, a full buffer only for 1-D tensors
    for p in model.parameters():
        state = opt.state[p]
        if p.ndim == 2:
            assert state["factor_momentum"].shape == (p.shape[0], rank) and "momentum_buffer" not in state
            assert state["factor_window"] == 2
        else:
            assert state["momentum_buffer"].shape == p.shape


# -- the contract every rule keeps --------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_replay_is_bitwise(cls, kwargs, tmp_path):
    rule_checks.replays_bitwise(cls, {**kwargs, "q": 2, "weight_decay": 0.01}, tmp_path)


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_a_bf16_run_replays_bitwise(cls, kwargs, tmp_path):
    rule_checks.replays_bitwise(cls, {**kwargs, "eps": 1e-2}, tmp_path, dtype=torch.bfloat16)


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_state_dict_through_torch_save_continues_bitwise_mid_window(cls, kwargs):
    rule_checks.resumes_bitwise(cls, kwargs, steps=8, stop=5)  # stops inside window 1


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_gradient_accumulation_equals_the_full_batch(cls, kwargs):
    rule_checks.accumulates_like_the_full_batch(cls, {**kwargs, "eps": 1e-4})


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_the_reduce_hook_combines_the_projected_gradients(cls, kwargs):
    rule_checks.reduces_the_projected_gradients(cls, {**kwargs, "q": 2})


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_lowers_the_loss_of_a_tiny_lm(cls, kwargs):
    rule_checks.lowers_the_loss(cls, kwargs)


# -- construction --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,name", [
    ({"rank": 0}, "rank"), ({"interval": 0}, "interval"), ({"rank": 1.5}, "rank"),
    ({"momentum": 1.0}, "momentum"),
])  # fmt: skip
def test_bad_hyperparameters_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        LOZO([torch.zeros(3, 3)], lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match=name):
        LOZO([{"params": [torch.zeros(3, 3)], **kwargs}], lr=1e-3)


def test_registered_and_built_the_way_the_fine_tuning_layer_builds_it():
    cls = OPTIMIZERS.get("lozo")
    assert cls is LOZO
    model = TinyLM()
    defaults = {k: v for k, v in cls.paper_defaults.items() if k not in ("lr", "eps")}
    opt = cls(model.named_parameters(), lr=1e-3, eps=1e-3, weight_decay=0.0, q=1, estimator="central",
              noise="gaussian", seed=0, reduce=None, momentum=0.9, **defaults)  # fmt: skip
    assert (opt.param_groups[0]["rank"], opt.param_groups[0]["interval"]) == (2, 50)
    assert opt.trajectory_header()["groups"][0]["settings"]["momentum"] == 0.9
