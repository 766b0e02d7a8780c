"""Greedy generation for the generation tasks (SQuAD, DROP): max 50 new tokens, stop at a newline (or at
the first of several stop strings, as lm-eval's ``until``)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hdopt.lm.scoring import starts_with_bos, truncate_left


def _left_padded(tokenizer, prompts: Sequence[str], budget: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt).input_ids
        rows.append(truncate_left(ids, budget, starts_with_bos(tokenizer, ids)))
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, width - len(ids) :] = torch.tensor(ids)
        mask[i, width - len(ids) :] = 1
    return input_ids, mask


@torch.no_grad()
def greedy_generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 50,
    stop: str | Sequence[str] = "\n",
    max_length: int = 2048,
) -> list[str]:
    """Greedy continuations of a batch of prompts, each cut at the first ``stop`` string (one string or
    several; empty: only EOS and ``max_new_tokens`` end it).

    Prompts are left-padded (positions come from the attention mask) and truncated on the left to
    ``max_length - max_new_tokens`` tokens, keeping a leading BOS.
    """
    from transformers import GenerationConfig

    input_ids, mask = _left_padded(tokenizer, prompts, max_length - max_new_tokens)
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    stops = [stop] if isinstance(stop, str) else list(stop)
    stops = [s for s in stops if s]
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        stop_strings=stops or None,
    )  # fmt: skip
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [cut_at_stop(text, stops) for text in texts]


def cut_at_stop(text: str, stops: Sequence[str]) -> str:
    """``text`` up to the earliest occurrence of any stop string (all of it when none occurs)."""
    ends = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return text[: min(ends)] if ends else text
