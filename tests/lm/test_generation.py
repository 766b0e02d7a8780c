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


def cycling_model(tokenizer, cycle: str):
    """A tiny Llama whose greedy continuation walks ``cycle`` (each character is followed by the next).

    The attention and MLP outputs are zeroed, so the last hidden state is the RMS-normalised embedding of
    the last token; cycle character i embeds as the basis vector e_i, and the LM head row of its
    successor is 10 e_i, so that successor wins the argmax by a wide margin.
    """
    model = tiny_model("llama")
    ids = [tokenizer(ch, add_special_tokens=False).input_ids[0] for ch in cycle]
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        embedding, head = model.get_input_embeddings().weight, model.lm_head.weight
        head.zero_()
        for i, token in enumerate(ids):
            embedding[token] = torch.nn.functional.one_hot(torch.tensor(i), embedding.shape[1]).float()
            head[ids[(i + 1) % len(ids)]] = 10 * embedding[token]
    return model


def test_generation_stops_at_newline():
    tokenizer = byte_tokenizer(add_bos=True)
    model = cycling_model(tokenizer, "ab\ncd")
    full = argmax_loop(model, tokenizer, "xa", 12)
    assert full == "b\ncdab\ncdab\n"  # the greedy continuation does contain newlines
    assert greedy_generate(model, tokenizer, ["xa", "a cd"], max_new_tokens=12, stop="\n") == ["b", "ab"]
    assert greedy_generate(model, tokenizer, ["xa"], max_new_tokens=12, stop="")[0] == full
    # several stop strings (lm-eval's until): the earliest occurrence of any of them ends the answer
    assert greedy_generate(model, tokenizer, ["xa"], max_new_tokens=12, stop=["da", "c"]) == ["b\n"]
    assert greedy_generate(model, tokenizer, ["xb"], max_new_tokens=12, stop=["ab", "zz"]) == ["\ncd"]
