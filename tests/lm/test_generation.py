"""Batched greedy generation equals a one-prompt-at-a-time argmax loop without a cache."""

from __future__ import annotations

import torch

from hdopt.lm.generation import greedy_generate
from tests.lm.conftest import byte_tokenizer, tiny_model


def argmax_loop(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt).input_ids
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(input_ids=torch.tensor([ids + new])).logits[0, -1]
            new.append(int(logits.argmax()))
            if new[-1] == tokenizer.eos_token_id:
                break
    return tokenizer.decode(new, skip_special_tokens=True)


def test_greedy_generate_matches_argmax_loop():
    model, tokenizer = tiny_model("llama"), byte_tokenizer(add_bos=True)
    prompts = ["Title: x\nQuestion: who?\nAnswer:", "short", "a somewhat longer prompt to force left padding"]
    out = greedy_generate(model, tokenizer, prompts, max_new_tokens=12, stop="\n")
    expected = [argmax_loop(model, tokenizer, p, 12).split("\n")[0] for p in prompts]
    assert out == expected
    assert all("\n" not in text for text in out)


def test_generation_stops_at_newline():
    model, tokenizer = tiny_model("gpt2"), byte_tokenizer(add_bos=False)
    # find a prompt whose greedy continuation contains a newline, then check the cut
    full = argmax_loop(model, tokenizer, "abc", 40)
    out = greedy_generate(model, tokenizer, ["abc"], max_new_tokens=40, stop="\n")
    assert out == [full.split("\n")[0]]
    assert greedy_generate(model, tokenizer, ["abc"], max_new_tokens=40, stop="")[0] == full
