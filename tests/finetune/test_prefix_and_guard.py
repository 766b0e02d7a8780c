"""Prefix-tuning parity with real activations, ZO on the prefix, objectives, and the divergence guard."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hdopt.finetune import DivergenceError, finetune, rundir
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.prefix import add_prefix
from hdopt.finetune.trainer import LoopState, check_divergence
from hdopt.lm.scoring import encode_options, option_scores
from hdopt.zo import ZOSGD
from tests.finetune.conftest import FAMILIES, make_model, toy_config
from tests.lm.conftest import VOCAB


@pytest.mark.parametrize("family", FAMILIES)
def test_activation_prefix_equals_running_the_random_tokens_first(family):
    model = make_model(family)
    wrapped = add_prefix(model, num_tokens=5, seed=3)
    tokens = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    x = torch.randint(3, VOCAB, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    with torch.no_grad():
        got = wrapped(input_ids=x, attention_mask=mask).logits
        want = model(input_ids=torch.cat([tokens.expand(2, -1), x], 1)).logits[:, 5:]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert wrapped.prefix.keys.shape[:3] == (2, wrapped.prefix.keys.shape[1], 5)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_scoring_fast_path_matches_full_forward_with_prefix(family, tokenizer):
    wrapped = add_prefix(make_model(family), seed=0)
    batch = encode_options(tokenizer, ["ab c", "d"], [[" x", " yz"], [" x", " yz"]], [0, 1])
    with torch.no_grad():
        fast = option_scores(wrapped, batch)  # body + head on gathered positions
        wrapped._hdopt_split_head_ok = False  # force the full-logits path
        full = option_scores(wrapped, batch)
    torch.testing.assert_close(fast, full, atol=1e-5, rtol=1e-5)


def test_prefix_gets_gradients_and_forward_time_zo_perturbation(tokenizer):
    wrapped = add_prefix(make_model("llama"))
    batch = encode_options(tokenizer, ["ab c"], [[" x", " yz"]], [0])
    option_scores(wrapped, batch).sum().backward()
    assert wrapped.prefix.keys.grad.abs().sum() > 0 and wrapped.prefix.values.grad.abs().sum() > 0
    before = wrapped.prefix.keys.detach().clone()
    opt = ZOSGD(wrapped.prefix.named_parameters(), lr=0.0, eps=1e-1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to in-place perturbation
        opt.step(lambda: option_scores(wrapped, batch).sum())
    assert opt.state["zo"]["inplace"] == [] and torch.equal(before, wrapped.prefix.keys)


def test_random_prefix_init_differs_from_activations():
    a = add_prefix(make_model("llama"), init="activations").prefix.keys
    b = add_prefix(make_model("llama"), init="random").prefix.keys
    assert a.shape == b.shape and not torch.equal(a, b)


def test_accuracy_objective_trains_with_zo(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo", steps=3, eval_every=0, objective="accuracy", lr=1e-2)
    results, _ = finetune(cfg, make_model("llama"), tokenizer)
    losses = [r["loss"] for r in rundir.read_metrics(tmp_path) if "loss" in r]
    assert results["status"] == "completed" and all(-1.0 <= v <= 0.0 for v in losses)


def test_non_differentiable_objective_needs_zo(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "ft", objective="accuracy")
    with pytest.raises(ValueError, match="not differentiable"):
        finetune(cfg, make_model("llama"), tokenizer)


def test_guard_stops_on_a_blown_up_loss():
    state = LoopState()
    for loss in (1.0, 1.5, 2.0):
        state.step += 1
        check_divergence(state, loss, factor=10.0, guarded=True)
    with pytest.raises(DivergenceError, match="exceeds 10 x the first loss"):
        for loss in (60.0, 80.0, 100.0):
            state.step += 1
            check_divergence(state, loss, factor=10.0, guarded=True)
    with pytest.raises(DivergenceError, match="nan"):
        check_divergence(LoopState(), float("nan"), factor=10.0, guarded=False)


def test_backprop_divergence_keeps_the_last_good_checkpoint(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "ft", steps=10, eval_every=0, save_every=1, lr=1e5, optimizer="sgd")
    with pytest.raises(DivergenceError, match="exceeds 10 x the first loss"):
        finetune(cfg, make_model("llama"), tokenizer)
    results = json.loads((tmp_path / rundir.RESULTS).read_text())
    assert results["status"] == "diverged" and "lower --lr" in results["error"] and "test" not in results
    weights, _, meta = load_checkpoint(tmp_path / rundir.CHECKPOINT)
    assert meta["step"] == results["steps"] - 1  # saved before the step that blew up
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_zo_nan_loss_stops_with_weights_of_the_last_good_step(task_file, tokenizer, tmp_path, monkeypatch):
    from hdopt.finetune import batches

    calls = {"n": 0}
    real = batches.classification_loss

    def loss_turning_nan(model, batch):
        calls["n"] += 1
        return real(model, batch) * (float("nan") if calls["n"] > 6 else 1.0)  # NaN from step 4 on

    monkeypatch.setattr(batches, "classification_loss", loss_turning_nan)
    cfg = toy_config(task_file, tmp_path, "mezo", steps=10, eval_every=0, save_every=1, lr=1e-2)
    with pytest.raises(DivergenceError, match="nan"):
        finetune(cfg, make_model("llama"), tokenizer)
    assert json.loads((tmp_path / rundir.RESULTS).read_text())["steps"] == 3
    assert load_checkpoint(tmp_path / rundir.CHECKPOINT)[2]["step"] == 3
