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
from hdopt.lm.read_path import (
    ContextCache,
    check_read_path,
    read_path_losses,
    read_path_scores,
    read_path_states,
)
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


def _cached(task_file, tokenizer, tmp_path, examples: int = 8):
    """A batch of ``task_file``'s training examples, the adapted model and the batch's cached context."""
    batch = _batch(task_file, tokenizer, tmp_path, examples)
    model, adapters = _adapted()
    cache = ContextCache(model)
    cache.add(batch)
    return batch, model, adapters, cache.context(batch)


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
    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path)
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
    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path, examples=1)
    got = ReadNodePerturbation(model, DOWN, 4000, 1e-2, noise).estimate(context, batch, key=3).grads[DOWN]
    (true,) = torch.autograd.grad(read_path_losses(model, context, batch)[0].mean(), [adapters.down])
    assert torch.nn.functional.cosine_similarity(true.flatten(), got.flatten(), dim=0) > 0.99
    assert 0.9 < float(got.norm() / true.norm()) < 1.1


def _blocks_run(model) -> tuple[list[int], list]:
    """Rows (copies x rows) each block's query map runs on, appended as the model runs; and the hooks."""
    seen: list[int] = []
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, args, out: seen.append(
        args[0].shape[0] * args[0].shape[1])) for layer in model.model.layers]  # fmt: skip
    return seen, hooks


def test_copies_that_start_at_a_later_block_equal_copies_run_through_every_block(letter_task, tokenizer,
                                                                                 tmp_path):  # fmt: skip
    """``first_layers``: a copy run from its first offset block on, from the first copy's state there, gives
    the states of the same copy run through every block (float64 model; Llama's norms compute in float32:
    measured 0, bound 1e-6), and runs only its blocks: the query maps see S x sum_c (L - first_c) rows."""
    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path)
    layers, rank, _ = adapters.down.shape
    rows = len(batch.labels)
    first = [0, 0, 1, layers - 1]
    offsets = torch.zeros(len(first), rows, layers, rank, dtype=torch.float64)
    generator = torch.Generator().manual_seed(5)
    for copy, layer in enumerate(first):
        if copy:
            offsets[copy, :, layer:] = torch.randn(rows, layers - layer, rank, generator=generator)
    seen, hooks = _blocks_run(model)
    lazy = read_path_states(model, context, adapters, len(first), offsets, first_layers=first)
    for hook in hooks:
        hook.remove()
    assert sum(seen) == rows * sum(layers - f for f in first)
    full = read_path_states(model, context, adapters, len(first), offsets)
    assert (lazy - full).abs().max() < 1e-6
    assert (full[3] - full[0]).abs().max() > 1e-3  # the offsets matter: the copies differ


def test_many_copies_run_in_slices_give_the_same_states(letter_task, tokenizer, tmp_path, monkeypatch):
    """With ROWS_A_PASS below copies x rows the copies run through each block in slices (here one copy a
    slice): the states and the first copy's adapter inputs are those of one pass over all copies (float64
    model, float32 norms: measured 0, bound 1e-6), late-starting copies included."""
    from hdopt.lm import read_path

    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path)
    layers, rank, _ = adapters.down.shape
    rows = len(batch.labels)
    first = [0, 0, 1, 1, layers - 1]
    offsets = torch.zeros(len(first), rows, layers, rank, dtype=torch.float64)
    for copy, layer in enumerate(first[1:], 1):
        offsets[copy, :, layer:] = 0.1 * copy
    whole_inputs: list[torch.Tensor] = []
    whole = read_path_states(model, context, adapters, len(first), offsets, whole_inputs, first)
    monkeypatch.setattr(read_path, "ROWS_A_PASS", rows)  # one copy a pass
    seen, hooks = _blocks_run(model)
    sliced_inputs: list[torch.Tensor] = []
    sliced = read_path_states(model, context, adapters, len(first), offsets, sliced_inputs, first)
    for hook in hooks:
        hook.remove()
    assert seen == [rows] * sum(layers - f for f in first)  # every pass one copy of the rows
    assert (sliced - whole).abs().max() < 1e-6
    assert all((a - b).abs().max() < 1e-6 for a, b in zip(sliced_inputs, whole_inputs, strict=True))


@pytest.mark.parametrize(("copies", "first"), [
    (2, [1, 1]),      # the first copy must start at block 0
    (3, [0, 2, 1]),   # not ascending
    (2, [0, 3]),      # past the last of the 3 blocks
    (2, [0]),         # one entry for two copies
])  # fmt: skip
def test_first_layers_out_of_order_or_range_are_refused(copies, first, letter_task, tokenizer, tmp_path):
    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path, examples=2)
    with pytest.raises(ValueError, match="first_layers"):
        read_path_states(model, context, adapters, copies, first_layers=first)


def test_the_coordinates_estimate_is_backprops_gradient_up_to_its_forward_difference(letter_task, tokenizer,
                                                                                      tmp_path):  # fmt: skip
    """Forward differences along each of the L x r bottleneck coordinates: backprop's gradient of the adapters
    up to the one-sided difference's O(eps) and the float32 rounding of Llama's norms, ~2e-7 / eps (measured
    2.6e-4 at eps 1e-3, bound 1e-3; 8.7e-4 at 1e-2, 2.5e-3 at 1e-4; a random-direction estimate at the same
    N = L r is off by more than 0.3), the same whatever the key, and its copies cost 1 + r (L + 1) / 2
    copies of the whole path (counted at the blocks' query maps)."""
    batch, model, adapters, context = _cached(letter_task, tokenizer, tmp_path)
    layers, rank, _ = adapters.down.shape
    exact = ReadNodePerturbation(model, DOWN, None, 1e-3, estimator="coordinates")
    assert exact.directions == layers * rank and exact.copies == 1 + layers * rank
    assert exact.path_copies == 1 + rank * (layers + 1) / 2
    seen, hooks = _blocks_run(model)
    got = exact.estimate(context, batch, key=1).grads[DOWN]
    for hook in hooks:
        hook.remove()
    assert sum(seen) == exact.path_copies * layers * len(batch.labels)
    (true,) = torch.autograd.grad(read_path_losses(model, context, batch)[0].mean(), [adapters.down])
    error = float((got - true).norm() / true.norm())
    assert error < 1e-3, error
    assert torch.equal(exact.estimate(context, batch, key=2).grads[DOWN], got)
    sampled = ReadNodePerturbation(model, DOWN, layers * rank, 1e-3, estimator="one-sided")
    noisy = sampled.estimate(context, batch, key=1).grads[DOWN]
    assert float((noisy - true).norm() / true.norm()) > 0.3  # what the exact estimate is not


def test_the_coordinates_estimator_takes_no_directions(letter_task):
    model, _ = _adapted()
    with pytest.raises(ValueError, match="no number of directions"):
        ReadNodePerturbation(model, DOWN, 8, 1e-2, estimator="coordinates")
    with pytest.raises(ValueError, match="eps"):
        ReadNodePerturbation(model, DOWN, None, 0.0, estimator="coordinates")


def test_an_exact_run_counts_its_copies_and_lowers_the_training_loss(letter_task, tokenizer, tmp_path):
    """read-adapters-exact: each step costs 1 + r (L + 1) / 2 copies of a token a row (r 8, L 3: 17 copies,
    17/T of a forward), and its steps lower the training loss as backprop's would."""
    cfg = toy_config(letter_task, tmp_path / "run", "read-adapters-exact", steps=4, eval_every=2,
                     keep_best=False)  # fmt: skip
    results, _ = finetune(cfg, _deep_llama(), tokenizer)
    assert results["forwards"] == pytest.approx(4 * 17 / results["mean_row_tokens"], rel=1e-3)
    cfg = toy_config(letter_task, tmp_path, "read-adapters-exact", steps=30, eval_every=0, lr=3e-2,
                     keep_best=False)  # fmt: skip
    before, after = loss_before_and_after(cfg, _deep_llama(), tokenizer, 30,
                                          lambda train, t: [train[(8 * t + i) % 16] for i in range(8)])
    assert after < 0.8 * before, (before, after)


def test_an_exact_run_killed_resumes_bitwise(letter_task, tokenizer, tmp_path):
    run_killed_and_resumed(lambda out: toy_config(letter_task, out, "read-adapters-exact", steps=6,
                                                  eval_every=2), tokenizer, tmp_path)  # fmt: skip


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
    ("letter_task", {"estimator": "coordinates"}, "llama", "--q 16 .*use --method read-adapters-exact"),
    ("letter_task", {"method": "read-adapters-exact", "q": 4}, "llama", "--q 4"),
    ("letter_task", {"method": "read-adapters-exact", "noise": "rademacher"}, "llama", "--noise rademacher"),
    ("letter_task", {"method": "read-adapters-exact", "estimator": "one-sided"}, "llama", "needs --q"),
    ("letter_task", {"method": "mezo", "estimator": "coordinates"}, "llama", "read-position adapters' alone"),
    ("letter_task", {"method": "node-perturbation", "estimator": "coordinates"}, "llama", "adapters' alone"),
]


@pytest.mark.parametrize(("task", "overrides", "family", "message"), REFUSED)
def test_what_read_adapters_cannot_train_is_refused(task, overrides, family, message, request, tokenizer,
                                                    tmp_path):  # fmt: skip
    overrides = {"method": "read-adapters", **overrides}
    cfg = toy_config(request.getfixturevalue(task), tmp_path, overrides.pop("method"), **overrides)
    model = _deep_llama() if family == "llama" else make_model(family)
    with pytest.raises(ValueError, match=message):  # ConfigError is a ValueError
        setup(cfg, model, tokenizer)


def test_a_rank_below_one_is_refused(letter_task, tmp_path):
    with pytest.raises(ConfigError, match="read_rank must be >= 1"):
        toy_config(letter_task, tmp_path, "read-adapters", read_rank=0)
