"""read-adapters: node perturbation of read-position adapters over the context's cached keys and values."""

from __future__ import annotations

import pytest
import torch

from hdopt.finetune.batches import encode
from hdopt.finetune.config import ConfigError
from hdopt.finetune.read_node_perturbation import ReadNodePerturbation
from hdopt.finetune.trained import load_trained
from hdopt.finetune.trainer import finetune, load_data, setup
from hdopt.lm.read_adapters import attach_read_adapters
from hdopt.lm.read_path import ContextCache, check_read_path, read_path_losses, read_path_scores
from hdopt.lm.tasks import resolve_task
from tests.finetune.conftest import (
    _write_task,
    loss_before_and_after,
    make_model,
    reloaded_test_accuracy,
    toy_config,
)
from tests.finetune.test_top_block import _deep_llama, run_killed_and_resumed

DOWN = "read_adapters.down"


@pytest.fixture(scope="module")
def letter_task(tmp_path_factory):
    """``letters``: a text ending in '+' is labelled 'y', one ending in '-' 'n': one-token label words
    (bytes), read after the sign, so the adapters at the last token can learn it even in a random model."""
    folder = tmp_path_factory.mktemp("letters")
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat", "a big dog", "the sun"]
    rows = [{"text": f"{words[i % 10]} {i} {'+' if i % 2 else '-'}", "label": str(i % 2)} for i in range(64)]
    return _write_task(folder, "letters", rows, 48,
                       "template: '{text}'\nlabel_column: label\nlabel_words: {'0': 'n', '1': 'y'}\n")


def _adapted(rank: int = 4, seed: int = 0, scale: float = 0.3):
    model = _deep_llama()
    adapters = attach_read_adapters(model, rank, seed)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        adapters.down.copy_(torch.randn(adapters.down.shape, generator=generator) * scale)
    return model, adapters


def _batch(task_file, tokenizer, tmp_path, examples: int = 8):
    cfg = toy_config(task_file, tmp_path, "read-adapters")
    task = resolve_task(cfg.data.task)
    return encode(task, tokenizer, load_data(cfg, task).train[:examples], 32, torch.device("cpu"))


def test_the_adapters_act_only_at_each_rows_last_token_and_the_read_path_reproduces_the_model(
        letter_task, tokenizer, tmp_path):  # fmt: skip
    """Right-padded rows of different lengths: the adapted model's logits differ from the model's at each
    row's last token and nowhere else, and the read path over the cached context gives them (float64)."""
    batch = _batch(letter_task, tokenizer, tmp_path)
    lengths = batch.attention_mask.sum(1)
    assert len(set(lengths.tolist())) > 1
    plain = _deep_llama()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    model, _ = _adapted()
    adapted = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    changed = (adapted - plain).abs().amax(-1) > 1e-9  # [S, T]
    real = batch.attention_mask.bool()
    last = torch.zeros_like(changed)
    last[torch.arange(len(lengths)), lengths - 1] = True
    assert torch.equal(changed & real, last)
    cache = ContextCache(model)
    cache.add(batch)
    scores = read_path_scores(model, cache.context(batch), batch)[0]  # [E, 2]
    whole = adapted[batch.target_seq, batch.target_pos, batch.target_token]
    mine = scores[batch.option_example[batch.target_option], batch.option_index[batch.target_option]]
    assert torch.allclose(mine, whole, rtol=1e-9, atol=1e-9)
    check_read_path(model, batch)  # and the run-time check agrees


def test_left_padded_rows_get_the_adapters_at_their_last_token(letter_task, tokenizer, tmp_path):
    batch = _batch(letter_task, tokenizer, tmp_path, examples=4)
    model, _ = _adapted()
    right = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    lengths = batch.attention_mask.sum(1)
    for s, n in enumerate(lengths.tolist()):  # each row alone, left-padded by 3
        ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), batch.input_ids[s : s + 1, :n]], 1)
        mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, n, dtype=torch.long)], 1)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        left = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        assert torch.allclose(left[0, -1], right[s, n - 1], atol=1e-9)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_the_cache_in_a_file_holds_the_same_states_as_in_memory(dtype, letter_task, tokenizer, tmp_path):
    batch = _batch(letter_task, tokenizer, tmp_path)
    model, _ = _adapted()
    in_memory, in_file = ContextCache(model, dtype=dtype), ContextCache(model, tmp_path, dtype=dtype)
    for cache in (in_memory, in_file):
        assert cache.add(batch) == len(batch.labels) and cache.add(batch) == 0  # each row once
    a, b = in_memory.context(batch), in_file.context(batch)
    assert in_file.nbytes == in_memory.nbytes > 0
    for field in ("keys", "values", "mask", "last_ids", "last_pos"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    in_file.close()


@pytest.mark.parametrize(("estimator", "eps", "bound"), [("central", 1e-2, 2e-4), ("one-sided", 1e-4, 5e-3)])
def test_the_estimate_is_node_perturbation_of_the_bottleneck_gradients(estimator, eps, bound, letter_task,
                                                                       tokenizer, tmp_path):  # fmt: skip
    """The estimate equals (1/E) sum_e [(1/N) sum_n (v_n . G_e) v_n,e] x_e^T with G = dL/da from autograd,
    up to the difference's error (central O(eps^2), one-sided O(eps)) and float32 rounding (Llama's norms
    compute in float32 even in a float64 model: ~1e-7 of the loss over a slope of ~eps). Measured: central
    2.4e-5 at eps 1e-2 (bound 2e-4), one-sided 1.4e-3 at eps 1e-4 (bound 5e-3)."""
    batch = _batch(letter_task, tokenizer, tmp_path)
    model, adapters = _adapted()
    cache = ContextCache(model)
    cache.add(batch)
    context = cache.context(batch)
    estimator = ReadNodePerturbation(model, DOWN, directions=3, eps=eps, estimator=estimator)
    got = estimator.estimate(context, batch, key=99).grads[DOWN]
    v = estimator.directions_for(99, len(batch.labels))  # [N, E, L, r]
    offsets = torch.zeros(1, *v.shape[1:], dtype=torch.float64, requires_grad=True)
    inputs: list[torch.Tensor] = []
    losses = read_path_losses(model, context, batch, 1, offsets, inputs)[0]
    (grad_a,) = torch.autograd.grad(losses.sum(), [offsets])  # [1, E, L, r]: dL_e/da_e
    slopes = (v * grad_a).sum((-1, -2))  # [N, E]
    delta = (slopes[..., None, None] * v).mean(0)  # [E, L, r]
    expected = torch.einsum("elr,leh->lrh", delta, torch.stack(inputs).detach()) / len(batch.labels)
    error = float((got - expected).norm() / expected.norm())
    assert error < bound, error


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_the_estimate_points_along_the_gradient(noise, letter_task, tokenizer, tmp_path):
    """Over N = 4000 directions the estimate approaches backprop's gradient of the adapters: one example,
    D = L x r = 12 numbers, relative error about sqrt(D / N) = 0.05 (cosine > 0.99). A sign or scale error
    in the directions or the slopes fails it."""
    batch = _batch(letter_task, tokenizer, tmp_path, examples=1)
    model, adapters = _adapted()
    cache = ContextCache(model)
    cache.add(batch)
    context = cache.context(batch)
    got = ReadNodePerturbation(model, DOWN, 4000, 1e-2, noise).estimate(context, batch, key=3).grads[DOWN]
    (true,) = torch.autograd.grad(read_path_losses(model, context, batch)[0].mean(), [adapters.down])
    assert torch.nn.functional.cosine_similarity(true.flatten(), got.flatten(), dim=0) > 0.99
    assert 0.9 < float(got.norm() / true.norm()) < 1.1


def test_a_run_trains_only_the_adapters_and_load_trained_reproduces_its_test_accuracy(letter_task, tokenizer,
                                                                                      tmp_path):  # fmt: skip
    cfg = toy_config(letter_task, tmp_path / "run", "read-adapters", steps=4, eval_every=2, q=2,
                     estimator="central", keep_best=False)  # fmt: skip
    results, folder = finetune(cfg, _deep_llama(), tokenizer)
    tokens = results["mean_row_tokens"]
    assert results["forwards"] == pytest.approx(4 * 5 / tokens, rel=1e-3)  # 1 + 2N copies of a token a row
    assert results["backwards"] == 0 and results["cache_rows"] == 16 + 8 and results["read_rank"] == 8
    model, _ = load_trained(folder, _deep_llama(), tokenizer)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == [DOWN]
    plain = _deep_llama()
    for name, p in plain.named_parameters():
        assert torch.equal(p, dict(model.named_parameters())[name])  # the model itself did not move
    assert model.read_adapters.down.abs().sum() > 0
    fresh = attach_read_adapters(_deep_llama(), 8, cfg.train.seed)
    assert torch.equal(fresh.up, model.read_adapters.up)  # U is drawn again from the run's seed
    assert reloaded_test_accuracy(model, tokenizer, cfg) == results["test"]


def test_read_adapters_lower_the_training_loss(letter_task, tokenizer, tmp_path):
    cfg = toy_config(letter_task, tmp_path, "read-adapters", steps=30, eval_every=0, lr=3e-2, q=4,
                     keep_best=False)  # fmt: skip
    before, after = loss_before_and_after(cfg, _deep_llama(), tokenizer, 30,
                                          lambda train, t: [train[(8 * t + i) % 16] for i in range(8)])
    assert after < 0.8 * before, (before, after)  # 0.73 -> 0.45; a sign error raises it


def test_a_killed_run_resumes_bitwise(letter_task, tokenizer, tmp_path):
    run_killed_and_resumed(lambda out: toy_config(letter_task, out, "read-adapters", steps=6, eval_every=2,
                                                  q=2), tokenizer, tmp_path)  # fmt: skip


REFUSED = [  # (task fixture, overrides, model family, message)
    ("letter_task", {"zo_blocks": 2}, "llama", "forward passes only"),
    ("letter_task", {"objective": "accuracy"}, "llama", "not differentiable"),
    ("letter_task", {}, "gpt2", "Llama-style"),
    ("task_file", {}, "llama", "one token"),  # ' yes' / ' no' are several byte tokens
    ("qa_task", {}, "llama", "no label words"),  # a generation task
]


@pytest.mark.parametrize(("task", "overrides", "family", "message"), REFUSED)
def test_what_read_adapters_cannot_train_is_refused(task, overrides, family, message, request, tokenizer,
                                                    tmp_path):  # fmt: skip
    cfg = toy_config(request.getfixturevalue(task), tmp_path, "read-adapters", **overrides)
    model = _deep_llama() if family == "llama" else make_model(family)
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        setup(cfg, model, tokenizer)


def test_a_rank_below_one_is_refused(letter_task, tmp_path):
    with pytest.raises(ConfigError, match="read_rank must be >= 1"):
        toy_config(letter_task, tmp_path, "read-adapters", read_rank=0)
