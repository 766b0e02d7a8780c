"""Sparse-MeZO: the small-magnitude mask (exact per-tensor thresholds; recomputed from the weights, fixed
within a step), unmasked weights bitwise unchanged, masked forward perturbations, the shared contract."""

import pytest
import torch

from hdopt.zo import OPTIMIZERS, ZOSGD, SparseMeZO
from hdopt.zo.noise import derive_key, name_id, noise
from hdopt.zo.sparse_mezo import kth_smallest_magnitude, magnitude_threshold

from . import rule_checks
from .models import TinyLM, batch, bitwise_equal, snapshot

RULES = [(SparseMeZO, {"lr": 3e-2, "sparsity": 0.5})]
IDS = ["SparseMeZO"]


def _z(step_key: int, direction: int, name: str, numel: int) -> torch.Tensor:
    return noise(derive_key(derive_key(step_key, direction), name_id(name)), 0, numel).double()


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _masks(model, opt) -> dict[str, torch.Tensor]:
    thresholds = {id(p): opt.state[p]["threshold"] for p in model.parameters()}
    return {n: p.detach().float().abs() <= thresholds[id(p)] for n, p in model.named_parameters()}


# -- the threshold: an exact order statistic, read in chunks ------------------------------------------------
def _tensors():
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(10_010, generator=g)
    ties = torch.randint(-40, 40, (3_001,), generator=g).float() / 4  # many equal magnitudes, +-0
    ties[:5] = -0.0
    return [distinct, ties, distinct.to(torch.bfloat16), distinct.double().view(7, 1_430)]


@pytest.mark.parametrize("index", range(4), ids=["float32", "ties", "bfloat16", "float64-2d"])
@pytest.mark.parametrize("chunk", [64, 1 << 20])
def test_kth_smallest_magnitude_equals_kthvalue(index, chunk):
    tensor = _tensors()[index]
    magnitudes = tensor.float().abs().reshape(-1)
    n = magnitudes.numel()
    for k in (1, 2, 17, n // 5, n // 2, n - 1, n):
        assert kth_smallest_magnitude(tensor, k, chunk) == torch.kthvalue(magnitudes, k).values.item(), k
    with pytest.raises(ValueError, match="k must be"):
        kth_smallest_magnitude(tensor, n + 1, chunk)


def test_the_mask_is_the_small_magnitude_set_at_the_papers_sparsity():
    model = TinyLM()
    opt = SparseMeZO(model.named_parameters(), lr=1e-3)  # the paper's sparsity: 0.8
    assert opt.param_groups[0]["sparsity"] == SparseMeZO.paper_defaults["sparsity"] == 0.8
    opt.directions()  # sets the thresholds from the current weights
    for name, keep in _masks(model, opt).items():
        magnitudes = dict(model.named_parameters())[name].detach().abs().reshape(-1)
        kept, frozen = magnitudes[keep.reshape(-1)], magnitudes[~keep.reshape(-1)]
        expected = round(0.2 * magnitudes.numel())
        if magnitudes.unique().numel() == magnitudes.numel():  # distinct weights: exactly 20%
            assert kept.numel() == expected, name
        else:  # ties at the threshold are kept (LayerNorm gains: all 1.0)
            assert kept.numel() >= expected, name
        assert frozen.numel() == 0 or kept.max() < frozen.min(), name
    assert magnitude_threshold(model.hidden.weight, 0.0, 64) == float("inf")


# -- what the mask does ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_weights_outside_the_mask_are_bitwise_unchanged_after_many_steps(dtype):
    model, ids = TinyLM(dtype=dtype), batch()
    start = snapshot(model)
    opt = SparseMeZO(model.named_parameters(), lr=5e-2, eps=1e-2, weight_decay=0.1, sparsity=0.8, q=2)
    opt.directions()
    first_masks = _masks(model, opt)
    for _ in range(40):
        before, masks = snapshot(model), _masks(model, opt)
        opt.step(lambda: model.loss(ids))
        for name, keep in masks.items():  # this step: only the step-start mask moved
            assert torch.equal(_bits(model.state_dict()[name][~keep]), _bits(before[name][~keep])), name
    moved = 0
    for name, keep in first_masks.items():
        now = model.state_dict()[name]
        assert torch.equal(_bits(now[~keep]), _bits(start[name][~keep])), name
        moved += (now[keep] != start[name][keep]).sum().item()
    assert moved > 0.9 * sum(keep.sum().item() for keep in first_masks.values())


@pytest.mark.parametrize("perturb", ["forward", "inplace"])
def test_the_forward_sees_only_masked_perturbations(perturb):
    model, ids = TinyLM(dtype=torch.float64), batch()
    eps = 1e-2
    probe = SparseMeZO(model.named_parameters(), lr=0.0, eps=eps, sparsity=0.7, perturb=perturb)
    step_key = probe.step_key()
    before = snapshot(model)
    with torch.no_grad():
        unperturbed = model.loss(ids).item()
        hooked = probe.evaluate(lambda: model.loss(ids), [(derive_key(step_key, 0), 1.0)], "probe",
                                probe.eps_factors(1.0))  # fmt: skip
        assert bitwise_equal(before, snapshot(model))  # nothing left written
        masks = _masks(model, probe)
        for name, p in model.named_parameters():
            p.add_(eps * _z(step_key, 0, name, p.numel()).view_as(p) * masks[name])
        explicit = model.loss(ids).item()
    assert hooked == pytest.approx(explicit, abs=1e-12)
    assert abs(hooked - unperturbed) > 1e-4


def test_the_update_uses_the_mask_of_the_weights_at_the_start_of_the_step():
    # lr large enough that masked weights cross the threshold during the update: a mask recomputed from
    # the weights being written (between the q directions, or after weight decay) would differ
    model, ids = TinyLM(dtype=torch.float64), batch()
    lr, wd, q = 0.5, 0.1, 2
    opt = SparseMeZO(model.named_parameters(), lr=lr, weight_decay=wd, sparsity=0.6, q=q)
    opt.directions()
    before, masks = snapshot(model), _masks(model, opt)
    opt.step(lambda: model.loss(ids))
    record = opt.trajectory.records[-1]
    crossed = 0
    for name, p in model.named_parameters():
        keep = masks[name]
        decayed = before[name] * (1 - lr * wd) if p.ndim >= 2 else before[name]
        for i, g in enumerate(record.grads):
            decayed = decayed - lr * (g / q) * _z(record.step_key, i, name, p.numel()).view_as(p)
        expected = torch.where(keep, decayed, before[name])
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-13), name
        crossed += (keep & (p.detach().float().abs() > opt.state[p]["threshold"])).sum().item()
    assert crossed > 0


def test_sparsity_zero_is_mezo_bitwise():
    ids = batch()
    sparse, dense = TinyLM(), TinyLM()
    opt_sparse = SparseMeZO(sparse.named_parameters(), lr=1e-2, weight_decay=0.1, sparsity=0.0, q=2)
    opt_dense = ZOSGD(dense.named_parameters(), lr=1e-2, weight_decay=0.1, q=2)
    for _ in range(5):
        opt_sparse.step(lambda: sparse.loss(ids))
        opt_dense.step(lambda: dense.loss(ids))
    assert bitwise_equal(snapshot(sparse), snapshot(dense))


# -- the contract every rule keeps --------------------------------------------------------------------------
@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_replay_is_bitwise(cls, kwargs, tmp_path):
    rule_checks.replays_bitwise(cls, {**kwargs, "q": 2, "weight_decay": 0.01}, tmp_path)


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_a_bf16_run_replays_bitwise(cls, kwargs, tmp_path):
    rule_checks.replays_bitwise(cls, {**kwargs, "eps": 1e-2}, tmp_path, dtype=torch.bfloat16)


@pytest.mark.parametrize("cls,kwargs", RULES, ids=IDS)
def test_state_dict_through_torch_save_continues_bitwise(cls, kwargs):
    # the thresholds come from the starting weights: recomputing them from the weights at the resume would
    # change the masks
    rule_checks.resumes_bitwise(cls, kwargs, steps=8, stop=5)


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
    ({"sparsity": 1.0}, "sparsity"), ({"sparsity": -0.1}, "sparsity"), ({"sparsity": "0.5"}, "sparsity"),
    ({"momentum": 0.9}, "momentum"),
])  # fmt: skip
def test_bad_hyperparameters_name_the_field(kwargs, name):
    with pytest.raises(ValueError, match=name):
        SparseMeZO([torch.zeros(3)], lr=1e-3, **kwargs)
    with pytest.raises(ValueError, match=name):
        SparseMeZO([{"params": [torch.zeros(3)], **kwargs}], lr=1e-3)


def test_registered_and_built_the_way_the_fine_tuning_layer_builds_it():
    cls = OPTIMIZERS.get("sparse-mezo")
    assert cls is SparseMeZO
    model = TinyLM()
    opt = cls(model.named_parameters(), lr=1e-3, eps=1e-3, weight_decay=0.0, q=1, estimator="central",
              noise="gaussian", seed=0, reduce=None, sparsity=cls.paper_defaults["sparsity"])  # fmt: skip
    assert opt.param_groups[0]["sparsity"] == 0.8
