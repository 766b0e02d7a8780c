"""Option scoring equals a brute-force per-option forward; the losses are the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch

from hdopt.lm.scoring import (
    answer_loss,
    classification_loss,
    encode_answers,
    encode_options,
    encode_prefix,
    option_scores,
    predict,
    truncate_left,
)
from hdopt.lm.tasks import Example
from tests.lm.conftest import tiny_model

PROMPTS = ["the movie was long. It was", "Is it raining?\n", "a"]
OPTIONS = [[" terrible", " great"], ["Yes", "No", "Maybe"], [" bb", " a longer option, with punctuation!"]]
LABELS = [1, 2, 0]
# fp32 log-probabilities here are O(log 259) ~ 5.6; batched vs single-row matmuls differ by a few ulps per op
# (~1e-7 relative) over a few hundred accumulations, so 1e-5 absolute is a ~100x margin, while an off-by-one
# position or a missing head transform changes a score by O(0.1).
ATOL = 1e-5


def assert_scores_close(scores: torch.Tensor, expected: list[float]) -> None:
    torch.testing.assert_close(
        scores.double(), torch.tensor(expected, dtype=torch.float64), atol=ATOL, rtol=0
    )


def brute_force_score(model, tokenizer, prompt: str, option: str) -> float:
    """Full-vocabulary logits over the unpadded sequence, one (prompt, option) pair at a time."""
    prompt_ids = tokenizer(prompt).input_ids
    option_ids = tokenizer(option, add_special_tokens=False).input_ids
    ids = torch.tensor([prompt_ids + option_ids])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
    n = len(prompt_ids)
    return sum(logp[n + i - 1, t].item() for i, t in enumerate(option_ids)) / len(option_ids)


@pytest.fixture(params=["llama", "gpt2", "gemma3"])
def family(request):
    return request.param


@pytest.fixture
def case(family, tokenizer_bos, tokenizer_plain):
    tokenizer = tokenizer_plain if family == "gpt2" else tokenizer_bos
    return tiny_model(family), tokenizer


def test_option_scores_equal_brute_force(case):
    model, tokenizer = case
    batch = encode_options(tokenizer, PROMPTS, OPTIONS, LABELS)
    with torch.no_grad():
        scores = option_scores(model, batch)
    expected = [
        brute_force_score(model, tokenizer, p, o)
        for p, opts in zip(PROMPTS, OPTIONS, strict=True)
        for o in opts
    ]
    assert scores.shape == (len(expected),)
    assert_scores_close(scores, expected)
    assert model._hdopt_split_head_ok is True  # the fast path (head on gathered positions) ran


def test_classification_loss_is_cross_entropy_over_mean_loglik(case):
    model, tokenizer = case
    batch = encode_options(tokenizer, PROMPTS, OPTIONS, LABELS)
    loss = classification_loss(model, batch)
    expected = 0.0
    for prompt, opts, label in zip(PROMPTS, OPTIONS, LABELS, strict=True):
        s = [brute_force_score(model, tokenizer, prompt, o) for o in opts]
        expected += -(s[label] - math.log(sum(math.exp(x) for x in s)))
    assert loss.item() == pytest.approx(expected / len(PROMPTS), abs=ATOL)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and sum(g.abs().sum().item() for g in grads) > 0


def test_answer_loss_is_token_mean_nll(case):
    model, tokenizer = case
    examples = [Example(f"x{i}", p, (), None, ("a",), " the answer\n") for i, p in enumerate(PROMPTS)]
    loss = answer_loss(model, encode_answers(tokenizer, examples))
    n_tokens = len(tokenizer(" the answer\n", add_special_tokens=False).input_ids)
    per_example = [brute_force_score(model, tokenizer, p, " the answer\n") for p in PROMPTS]
    # every answer has the same length, so the token mean is the mean of the per-example means
    assert loss.item() == pytest.approx(-sum(per_example) / len(PROMPTS), abs=ATOL)
    assert n_tokens == 12
    loss.backward()
    assert model.get_output_embeddings().weight.grad is not None


def test_one_token_options_share_a_row(case):
    model, tokenizer = case
    prompts, options = ["is it? ", "and this one?"], [["Y", "N"], ["Y", "N", "M"]]  # one byte token each
    batch = encode_options(tokenizer, prompts, options, [0, 2])
    assert batch.input_ids.shape[0] == 2  # one sequence per example, not one per option
    with torch.no_grad():
        scores = option_scores(model, batch)
    assert_scores_close(
        scores,
        [
            brute_force_score(model, tokenizer, p, o)
            for p, os in zip(prompts, options, strict=True)
            for o in os
        ],
    )


def test_predict_takes_argmax_and_pads_missing_options(case):
    model, tokenizer = case
    batch = encode_options(tokenizer, PROMPTS, OPTIONS, LABELS)
    preds, table = predict(model, batch)
    assert table.shape == (3, 3)
    assert math.isinf(table[0, 2].item()) and table[0, 2].item() < 0  # example 0 has two options
    assert preds.tolist() == table.argmax(1).tolist()


def test_left_truncation_keeps_bos_and_option(tokenizer_bos):
    batch = encode_options(tokenizer_bos, ["0123456789"], [[" ab"]], max_length=8)
    ids = batch.input_ids[0].tolist()
    # 8 tokens in all: BOS + "6789" + " ab"; the last option token is predicted, never fed
    assert len(ids) == 7 and ids[0] == tokenizer_bos.bos_token_id
    assert tokenizer_bos.decode(ids[1:]) == "6789 a"
    assert batch.target_pos.tolist() == [4, 5, 6]  # " ab": the last prompt token predicts " "
    assert tokenizer_bos.decode(batch.target_token) == " ab"
    assert truncate_left([1, 2, 3, 4], 2, keep_first=False) == [3, 4]
    assert truncate_left([1, 2, 3, 4], 3, keep_first=True) == [1, 3, 4]


def test_truncated_scores_equal_brute_force_on_the_kept_tokens(tokenizer_plain):
    model = tiny_model("gpt2")
    batch = encode_options(tokenizer_plain, ["abcdefghij"], [[" yes", " no"]], max_length=9)
    with torch.no_grad():
        scores = option_scores(model, batch)
    # " yes" is 4 byte tokens -> 5 prompt tokens kept; " no" is 3 -> 6 kept
    expected = [brute_force_score(model, tokenizer_plain, "fghij", " yes"),
                brute_force_score(model, tokenizer_plain, "efghij", " no")]  # fmt: skip
    assert_scores_close(scores, expected)


def test_prefix_cache_scores_equal_uncached(case):
    """ICL demonstrations run once as a cached prefix give the same scores as prepending their text."""
    model, tokenizer = case
    demos = "a demo. It was great\n\nanother demo, rather longer than the window. It was terrible\n\n"
    uncached = encode_options(tokenizer, [demos + p for p in PROMPTS], OPTIONS, LABELS)
    rows = encode_options(tokenizer, PROMPTS, OPTIONS, LABELS, add_special_tokens=False)
    prefix = encode_prefix(model, tokenizer(demos).input_ids)
    assert prefix.length + rows.input_ids.shape[1] == uncached.input_ids.shape[1]
    with torch.no_grad():
        expected = option_scores(model, uncached)
        cached = option_scores(model, rows, prefix)
        cached_again = option_scores(model, rows, prefix)  # the prefix cache is not consumed
    torch.testing.assert_close(cached, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(cached_again, expected, atol=ATOL, rtol=0)
