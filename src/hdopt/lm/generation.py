"""Greedy generation for the generation tasks (SQuAD, DROP): max 50 new tokens, stop at a newline."""

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
    stop: str = "\n",
    max_length: int = 2048,
) -> list[str]:
    """Greedy continuations of a batch of prompts, each cut at the first ``stop`` string.

    Prompts are left-padded (positions come from the attention mask) and truncated on the left to
    ``max_length - max_new_tokens`` tokens, keeping a leading BOS.
    """
    from transformers import GenerationConfig

    input_ids, mask = _left_padded(tokenizer, prompts, max_length - max_new_tokens)
    device = model.get_input_embeddings().weight.device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
        stop_strings=[stop] if stop else None,
    )  # fmt: skip
    out = model.generate(
        input_ids=input_ids.to(device),
        attention_mask=mask.to(device),
        generation_config=config,
        tokenizer=tokenizer,
    )
    texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
    return [text.split(stop)[0] if stop else text for text in texts]
