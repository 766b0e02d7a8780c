"""node-perturbation: forward-only gradient estimates of the last block's readout maps."""

from __future__ import annotations

import pytest
import torch

from hdopt.finetune.batches import encode, step_indices
from hdopt.finetune.config import ConfigError
from hdopt.finetune.node_perturbation import NodePerturbation
from hdopt.finetune.trained import load_trained
from hdopt.finetune.trainer import finetune, load_data, setup
from hdopt.lm.readout import ReadPositions, readout_modules, replicated_losses
from hdopt.lm.tasks import resolve_task
from hdopt.lm.top_blocks import TopBlocks, TrunkCache
from hdopt.zo.noise import derive_key
from tests.finetune.conftest import loss_before_and_after, make_model, reloaded_test_accuracy, toy_config
from tests.finetune.test_top_block import _deep_llama, _snapshot, run_killed_and_resumed

READOUT = ("layers.2.self_attn.q_proj.", "layers.2.self_attn.o_proj.", "layers.2.mlp.")


def _toy_batch(task_file, tokenizer, tmp_path, model, examples: int = 8):
    cfg = toy_config(task_file, tmp_path, "node-perturbation")
    task = resolve_task(cfg.data.task)
    splits = load_data(cfg, task)
    examples = [splits.train[i] for i in step_indices(len(splits.train), examples, 0, 0)]
    return encode(task, tokenizer, examples, 32, torch.device("cpu"))


def _estimate_against_backprop_deltas(batch, model, eps: float) -> dict[str, float]:
    """Relative error of each map's estimate against node perturbation's formula with autograd's deltas:
    g_W = (1/E) sum_u [(1/N) sum_n (v_n . G)_e(u) v_{n,u}] x_u^T, G = dL/dy, the same directions v."""
    blocks = TopBlocks(model, 1)
    blocks.check()
    cache = TrunkCache(blocks)
    cache.add(batch)
    bottom, modules = cache.hidden(batch), readout_modules(model)
    estimator = NodePerturbation(blocks, modules, directions=3, eps=eps)
    got = estimator.estimate(bottom, batch, key=12345)

    where = ReadPositions.of(batch)
    generator = torch.Generator().manual_seed(12345)
    noise = {name: estimator._directions(generator, len(where), m) for name, m in modules.items()}
    outputs, inputs = {}, {}

    def capture(name):
        def hook(module, args, out):
            inputs[name] = args[0].detach()
            outputs[name] = torch.zeros_like(out, requires_grad=True)  # its gradient is dL/dy
            return out + outputs[name]

        return hook

    handles = [m.register_forward_hook(capture(n)) for n, m in modules.items()]
    losses = replicated_losses(blocks, bottom, batch, where, 1)[0]
    for handle in handles:
        handle.remove()
    grads = torch.autograd.grad(losses.sum(), [outputs[n] for n in modules])
    delta = dict(zip(modules, grads, strict=True))  # [U, out]: dL_e(u)/dy_u
    slopes = torch.zeros(3, len(batch.labels), dtype=torch.float64)  # v_n . G, per example
    for name in modules:
        slopes.index_add_(1, where.example, (noise[name] * delta[name]).sum(-1))
    assert got.loss == pytest.approx(float(losses.mean()), rel=1e-6)  # float32 losses
    errors = {}
    for name in modules:
        estimate = (slopes[:, where.example, None] * noise[name]).mean(0)
        expected = estimate.T @ inputs[name] / len(batch.labels)
        errors[name] = float((got.grads[f"{name}.weight"] - expected).norm() / expected.norm())
    return errors


def test_the_estimate_is_node_perturbation_of_the_backprop_deltas(task_file, tokenizer, tmp_path):
    """The estimate equals the formula up to the central difference's O(eps^2) (the tiny random model's
    activations are ~1e-2, so its loss bends at that scale): the error at eps 1e-3 is below 1%, and tripling
    eps multiplies it by about 9 (6-12: the losses are float32, ~1e-7 of rounding over a slope of ~eps)."""
    model = _deep_llama()
    batch = _toy_batch(task_file, tokenizer, tmp_path, model)
    assert len(ReadPositions.of(batch)) > len(batch.labels)  # multi-token options: several positions each
    modules = readout_modules(model)
    assert sorted(modules) == ["model.layers.2.mlp.down_proj", "model.layers.2.mlp.gate_proj",
                               "model.layers.2.mlp.up_proj", "model.layers.2.self_attn.o_proj",
                               "model.layers.2.self_attn.q_proj"]  # fmt: skip
    small = _estimate_against_backprop_deltas(batch, model, 1e-3)
    large = _estimate_against_backprop_deltas(batch, model, 3e-3)
    for name in modules:
        assert small[name] < 1e-2, (name, small[name])
        assert 6 < large[name] / small[name] < 12, (name, small[name], large[name])


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
@pytest.mark.parametrize("index", range(5))
def test_the_estimate_points_along_the_gradient(index, noise, task_file, tokenizer, tmp_path):
    """Averaged over N directions one map's estimate approaches backprop's gradient: E[v v^T] = I. One
    example (examples' gradients would partly cancel), one map (perturbed together, each map's estimate also
    carries the others' slopes as noise, large when their scales differ as in this random model): D = 7
    read positions x 32 or 64 outputs; the relative error is about sqrt(D / N) <= 0.24 at N = 8000, a cosine
    of about 0.97. A sign or scale error in the noise or the slopes fails it (cosine < 0 or the norm)."""
    model = _deep_llama()
    batch = _toy_batch(task_file, tokenizer, tmp_path, model, examples=1)
    blocks = TopBlocks(model, 1)
    blocks.check()
    cache = TrunkCache(blocks)
    cache.add(batch)
    bottom = cache.hidden(batch)
    name, module = sorted(readout_modules(model).items())[index]
    assert len(ReadPositions.of(batch)) == 7
    got = NodePerturbation(blocks, {name: module}, directions=8000, eps=1e-3, noise=noise)
    estimate = got.estimate(bottom, batch, key=7).grads[f"{name}.weight"]
    loss = replicated_losses(blocks, bottom, batch, ReadPositions.of(batch), 1)[0].mean()
    (true,) = torch.autograd.grad(loss, [module.weight])
    assert torch.nn.functional.cosine_similarity(true.flatten(), estimate.flatten(), dim=0) > 0.9
    assert 0.8 < float(estimate.norm() / true.norm()) < 1.35  # E|est|^2 = |true|^2 (1 + D/N)


def test_a_run_trains_only_the_readout_maps_and_counts_its_copies_as_last_block_forwards(
        task_file, tokenizer, tmp_path):  # fmt: skip
    cfg = toy_config(task_file, tmp_path / "run", "node-perturbation", steps=4, eval_every=2, q=2,
                     keep_best=False)
    start = _snapshot(_deep_llama())
    results, folder = finetune(cfg, _deep_llama(), tokenizer)
    assert results["forwards"] == pytest.approx(4 * 5 / 3)  # 1 + 2N copies of the last of 3 blocks
    assert results["backwards"] == 0 and results["zo_blocks"] == 1 and results["cache_bytes"] > 0
    model, _ = load_trained(folder, _deep_llama(), tokenizer)
    trained = _snapshot(model)
    moved = [n for n in trained if not torch.equal(trained[n], start[n])]
    assert moved and all(any(part in n for part in READOUT) for n in moved)
    assert reloaded_test_accuracy(model, tokenizer, cfg) == results["test"]


def test_node_perturbation_lowers_the_training_loss(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "node-perturbation", steps=40, eval_every=0, lr=1e-2, q=4,
                     keep_best=False)  # fmt: skip
    before, after = loss_before_and_after(cfg, _deep_llama(), tokenizer, 40, lambda train, t: train[:8])
    assert after < 0.95 * before, (before, after)  # a sign error raises it


def test_a_killed_run_resumes_bitwise(task_file, tokenizer, tmp_path):
    def cfg(out):
        return toy_config(task_file, out, "node-perturbation", steps=6, eval_every=2, q=2)

    run_killed_and_resumed(cfg, tokenizer, tmp_path)


@pytest.mark.parametrize(("overrides", "model", "message"), [
    ({"zo_blocks": 2}, "llama", "trains the last block"),
    ({"objective": "accuracy"}, "llama", "not differentiable"),
    ({}, "gpt2", "not Llama-style"),
])  # fmt: skip
def test_what_node_perturbation_cannot_train_is_refused(overrides, model, message, task_file, tokenizer,
                                                        tmp_path):  # fmt: skip
    cfg = toy_config(task_file, tmp_path, "node-perturbation", **overrides)
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        setup(cfg, _deep_llama() if model == "llama" else make_model(model), tokenizer)


def test_generation_tasks_are_refused(tokenizer, tmp_path, qa_task):
    cfg = toy_config(qa_task, tmp_path, "node-perturbation")
    with pytest.raises(ConfigError, match="generation task"):
        setup(cfg, _deep_llama(), tokenizer)


def test_a_step_averages_its_micro_batches_estimates_each_with_its_own_directions(task_file, tokenizer,
                                                                                   tmp_path):  # fmt: skip
    cfg = toy_config(task_file, tmp_path, "node-perturbation", q=2, batch_size=8, grad_accum=2)
    s = setup(cfg, _deep_llama(), tokenizer)
    micro = [s.kind.closure(s.splits.train[:4]), s.kind.closure(s.splits.train[4:8])]
    estimates = [s.kind.estimator.estimate(m.bottom, m.batch, derive_key(cfg.train.seed, 0, i))
                 for i, m in enumerate(micro)]  # fmt: skip
    seen = {}
    s.kind.optimizer.step = lambda: seen.update({n: p.grad.clone() for n, p in s.params})
    loss = s.kind.step(micro)
    assert loss == pytest.approx((estimates[0].loss + estimates[1].loss) / 2, rel=1e-12)
    assert seen.keys() == estimates[0].grads.keys()
    for name, grad in seen.items():
        assert torch.equal(grad, estimates[0].grads[name] / 2 + estimates[1].grads[name] / 2)
    assert not torch.equal(estimates[0].grads[name], estimates[1].grads[name])
    assert s.kind.passes_per_step() == pytest.approx((2 * 5 / 3, 0))  # 1 + 2N copies a micro-batch
