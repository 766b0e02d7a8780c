"""Greedy generation with a tuned prefix: cached decoding equals a full recompute at every step, the
activation prefix generates what running its tokens first generates, and prefix methods train and evaluate
on a generation task (F1 / exact match)."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import GenerationConfig

from hdopt.finetune import finetune, rundir
from hdopt.finetune.prefix import add_prefix
from hdopt.finetune.prefix_generation import GreedySettings
from hdopt.finetune.trainer import LoopState, setup, train_loop
from hdopt.lm.generation import greedy_generate
from tests.finetune.conftest import FAMILIES, make_model, toy_config
from tests.lm.conftest import VOCAB

EOS, PAD, NEW = 2, 0, 12


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :], mask[i, width - len(p) :] = torch.tensor(p), 1
    return ids, mask


@torch.no_grad()
def reference_greedy(wrapped, prompt: list[int], steps: int, eos: int | None = EOS) -> list[int]:
    """One unpadded row; every step recomputes the whole prefixed forward (no cache carried over)."""
    seq, new = list(prompt), []
    for _ in range(steps):
        token = int(wrapped(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
        new.append(token)
        seq.append(token)
        if token == eos:
            break
    return new


def prompts_for(family: str) -> list[list[int]]:
    if family == "gemma3":  # sliding window 8: padding would take window slots, so equal lengths
        return [[5, 9, 33, 40, 41, 50], [7, 8, 100, 3, 4, 5]]
    return [[5, 9, 33, 40, 41, 50, 60], [7, 8, 100], [200, 201, 202, 203, 204]]


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefix_generation_equals_full_recompute(family):
    wrapped = add_prefix(make_model(family), num_tokens=5, seed=3)
    noise = torch.randn(wrapped.prefix.keys.shape, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # a trained prefix, not the activations of real tokens
        wrapped.prefix.keys.add_(0.3 * noise)
    prompts = prompts_for(family)
    ids, mask = left_padded(prompts)
    refs = [reference_greedy(wrapped, p, NEW, eos=None) for p in prompts]
    # EOS: none (all rows run NEW tokens), or the third token of row 0, so that rows end at different steps
    for eos in (None, refs[0][2]):
        config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=eos)
        out = wrapped.generate(input_ids=ids, attention_mask=mask, generation_config=config)
        assert out.shape[0] == len(prompts) and torch.equal(out[:, : ids.shape[1]], ids)
        ends = [ref.index(eos) + 1 if eos in ref else NEW for ref in refs]
        assert out.shape[1] == ids.shape[1] + max(ends)  # decoding ends when every row is finished
        for row, ref, end in zip(out[:, ids.shape[1] :].tolist(), refs, ends, strict=True):
            assert row[:end] == ref[:end]
            assert all(t == PAD for t in row[end:])  # after its EOS, a row gets padding


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_activation_prefix_generates_what_its_tokens_generate(family):
    """The initial prefix is the cache of 5 random tokens: generating after it is transformers' generate
    with those tokens in front of the (left-padded) prompts."""
    model = make_model(family)
    wrapped = add_prefix(model, num_tokens=5, seed=3)
    tokens = torch.randint(0, VOCAB, (1, 5), generator=torch.Generator().manual_seed(3))
    ids, mask = left_padded(prompts_for(family))
    config = GenerationConfig(max_new_tokens=NEW, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    got = wrapped.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    rows = ids.shape[0]
    plain = model.generate(
        input_ids=torch.cat([tokens.expand(rows, -1), ids], 1),
        attention_mask=torch.cat([torch.ones(rows, 5, dtype=torch.long), mask], 1),
        generation_config=config,
    )
    assert torch.equal(got, torch.cat([ids, plain[:, 5 + ids.shape[1] :]], 1))


def _stop_index(tokenizer, tokens: list[int], stop: str) -> int:
    """The index of the token after which the decoded continuation first contains ``stop``."""
    return next(i for i in range(len(tokens)) if stop in tokenizer.decode(tokens[: i + 1]))


@pytest.mark.parametrize("stop", ["\n", "."])
def test_greedy_generate_with_a_prefix_cuts_at_the_stop_string(stop, tokenizer):
    """hdopt.lm's generation path (stop string, max tokens, skip special tokens) runs on PrefixLM; the
    random model never writes a newline in 12 tokens, but both rows write a "." early."""
    wrapped = add_prefix(make_model("llama"), seed=0)
    prompts = ["Q: say ab\nA:", "Q: a longer question\nA:"]
    got = greedy_generate(wrapped, tokenizer, prompts, max_new_tokens=NEW, stop=stop, max_length=64)
    refs = [reference_greedy(wrapped, tokenizer(p).input_ids, NEW) for p in prompts]
    texts = [tokenizer.decode(r) for r in refs]
    assert got == [t.split(stop)[0] for t in texts]
    assert all("." in t and "\n" not in t for t in texts)
    if stop == ".":  # each row ends at its first ".", padding follows, and decoding ends when both did
        ids, mask = left_padded([tokenizer(p).input_ids for p in prompts])
        out = wrapped.generate(ids, mask, max_new_tokens=NEW, eos_token_id=EOS, pad_token_id=PAD,
                               stop_strings=[stop], tokenizer=tokenizer)[:, ids.shape[1] :]  # fmt: skip
        ends = [_stop_index(tokenizer, r, stop) for r in refs]
        assert out.shape[1] == max(ends) + 1 < NEW
        for row, ref, end in zip(out.tolist(), refs, ends, strict=True):
            assert row[: end + 1] == ref[: end + 1] and all(t == PAD for t in row[end + 1 :])


def test_prefix_generation_refuses_what_it_does_not_do():
    wrapped = add_prefix(make_model("llama"), seed=0)
    ids = torch.tensor([[5, 6, 7]])
    with pytest.raises(ValueError, match="greedy only: do_sample=True"):
        wrapped.generate(ids, generation_config=GenerationConfig(max_new_tokens=3, do_sample=True))
    with pytest.raises(ValueError, match="greedy only: num_beams=4"):
        wrapped.generate(ids, max_new_tokens=3, num_beams=4)
    with pytest.raises(ValueError, match="does not take"):
        wrapped.generate(ids, max_new_tokens=3, temperature=0.5)
    with pytest.raises(ValueError, match="need the tokenizer"):
        wrapped.generate(ids, max_new_tokens=3, stop_strings=["\n"])
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        GreedySettings(0)


@pytest.mark.parametrize("method, lr", [("mezo-prefix", 1e-1), ("ft-prefix", 1e-2)])
def test_prefix_methods_on_a_generation_task(method, lr, qa_task, tokenizer, tmp_path):
    cfg = toy_config(qa_task, tmp_path, method, steps=3, eval_every=3, num_dev=4, num_eval=4, batch_size=4,
                     lr=lr)  # fmt: skip
    results, folder = finetune(cfg, make_model("llama"), tokenizer)
    assert results["status"] == "completed" and results["metric"] == "f1"
    assert 0.0 <= results["test_f1"] <= 100.0 and 0.0 <= results["test_em"] <= 100.0
    assert results["test"] == results["test_f1"] and results["best_step"] in (0, 3)
    dev = [r for r in rundir.read_metrics(folder) if "dev_f1" in r]
    assert [r["step"] for r in dev] == [0, 3] and all("dev_em" in r for r in dev)
    assert (folder / rundir.BEST).is_file() == (method == "ft-prefix")  # ZO: the trajectory, no weights


def test_f1_objective_perturbs_the_prefix_at_forward_time(qa_task, tokenizer, tmp_path):
    """With ``--objective f1`` ZO evaluates greedy answers: the prefix is perturbed inside its own forward
    (the prefill), never in place."""
    cfg = toy_config(qa_task, tmp_path, "mezo-prefix", steps=2, eval_every=0, num_dev=4, num_eval=4,
                     batch_size=4, objective="f1", lr=1e-1)  # fmt: skip
    s = setup(cfg, make_model("llama"), tokenizer)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback to in-place perturbation
        train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path))
    assert s.optimizer.state["zo"]["inplace"] == []
    losses = [r["loss"] for r in rundir.read_metrics(tmp_path) if "loss" in r]
    assert losses and all(-1.0 <= v <= 0.0 for v in losses)
