"""Greedy generation with a tuned prefix: the prefix is the first entry of the key/value cache.

:func:`hdopt.lm.generation.greedy_generate` calls ``model.generate(input_ids, attention_mask,
generation_config, tokenizer)`` with left-padded prompts; :meth:`hdopt.finetune.prefix.PrefixLM.generate`
answers that call with :func:`greedy_with_prefix`:

1. **prefill**: the prefix module's own forward runs the prompts with a fresh cache holding the prefix (so
   :mod:`hdopt.zo`'s forward-time perturbation of the prefix applies, e.g. with ``--objective f1``), the
   mask ``[ones(n), prompt mask]`` and positions counted from the mask: the first real token of every row
   sits at position ``n``, right after the virtual tokens, as in training;
2. **decode**: one token per step through the wrapped model with the growing cache.

A row is finished once it produced an EOS token or its continuation contains a stop string; its later
tokens are the pad token, and decoding ends when every row is finished or after ``max_new_tokens`` tokens,
as transformers' greedy search does. Only greedy decoding is supported (no sampling, no beams).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hdopt.finetune.prefix import cache_kwarg

UNSUPPORTED = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}  # field -> its only value
KNOWN = {"max_new_tokens", "eos_token_id", "pad_token_id", "stop_strings", *UNSUPPORTED}


@dataclass(frozen=True)
class GreedySettings:
    """What greedy decoding needs from a ``GenerationConfig`` (or ``generate`` keyword arguments)."""

    max_new_tokens: int
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")

    @classmethod
    def from_config(cls, generation_config=None, **kwargs) -> GreedySettings:
        """Read ``max_new_tokens``, ``eos_token_id``, ``pad_token_id`` and ``stop_strings``; keyword arguments
        override the config's fields. Sampling, beams or several sequences per prompt raise ``ValueError``."""

        unknown = set(kwargs) - KNOWN
        if unknown:
            raise ValueError(
                f"generation with a prefix does not take {sorted(unknown)}; it takes {sorted(KNOWN)}"
            )

        def get(name: str, default=None):
            if name in kwargs:
                return kwargs[name]
            return getattr(generation_config, name, default) if generation_config is not None else default

        for name, allowed in UNSUPPORTED.items():
            value = get(name, allowed)
            if value is not None and value != allowed:
                raise ValueError(
                    f"generation with a prefix is greedy only: {name}={value!r} is not supported "
                    f"(use {name}={allowed!r})"
                )
        max_new = get("max_new_tokens")
        if max_new is None:
            raise ValueError("generation with a prefix needs max_new_tokens")
        eos = get("eos_token_id")
        eos = () if eos is None else (eos,) if isinstance(eos, int) else tuple(int(e) for e in eos)
        pad = get("pad_token_id")
        if pad is None and eos:
            pad = eos[0]  # what transformers does, with a warning, when no pad token is set
        stops = get("stop_strings")
        stops = () if not stops else (stops,) if isinstance(stops, str) else tuple(stops)
        return cls(int(max_new), eos, pad, stops)


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position of every slot: the number of real tokens before it (padding gets its neighbour's, unused)."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


def _accepts(module: nn.Module, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def _output_cache(output):
    """The key/value cache of a model output (``cache`` in transformers >= 5, ``past_key_values`` before)."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def _hits_stop(tokenizer, tokens: list[int], stops: Sequence[str]) -> bool:
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    return any(stop in text for stop in stops)


def _mark_finished(finished: torch.Tensor, generated: list[torch.Tensor], settings: GreedySettings,
                   tokenizer) -> None:  # fmt: skip
    """Rows whose last token is an EOS, or whose continuation now contains a stop string, are finished."""
    if settings.eos_token_ids:
        eos = torch.tensor(settings.eos_token_ids, dtype=torch.long, device=finished.device)
        finished |= torch.isin(generated[-1], eos)
    if settings.stop_strings:
        rows = torch.stack(generated, dim=1).tolist()
        for r in (~finished).nonzero().flatten().tolist():
            finished[r] = _hits_stop(tokenizer, rows[r], settings.stop_strings)


@torch.no_grad()
def greedy_with_prefix(
    lm: nn.Module,
    prefix: nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    settings: GreedySettings,
    tokenizer=None,
) -> torch.Tensor:
    """Greedy continuations of ``input_ids`` ``[B, T]`` (left-padded) after the virtual tokens of ``prefix``.

    Args:
        lm: the causal LM (its forward takes a key/value cache and returns one).
        prefix: a :class:`hdopt.finetune.prefix.PrefixKV` (``prefix(lm, ids, mask)`` runs ``lm`` after it).
        input_ids, attention_mask: the prompts, padded on the left (``attention_mask`` 0 on padding).
        settings: length, EOS/pad tokens and stop strings.
        tokenizer: decodes continuations to look for the stop strings (needed when there are any).

    Returns:
        ``[B, T + k]``: the prompts followed by ``k <= max_new_tokens`` generated tokens per row (the pad
        token after a row finished), like ``transformers``' ``generate``.
    """
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be [batch, length] with length >= 1, got {tuple(input_ids.shape)}")
    if settings.stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer: pass generate(..., tokenizer=tokenizer)")
    batch, device = input_ids.shape[0], input_ids.device
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    ones = torch.ones(batch, prefix.num_tokens, dtype=attention_mask.dtype, device=device)
    mask = torch.cat([ones, attention_mask], dim=1)  # [B, n + T]
    pos = positions_from_mask(mask)
    with_pos = _accepts(lm, "position_ids")
    extra = {"position_ids": pos[:, prefix.num_tokens :]} if with_pos else {}
    if _accepts(lm, "logits_to_keep"):
        extra["logits_to_keep"] = 1  # only the last position's logits (the vocabulary can be large)
    out = prefix(lm, input_ids, attention_mask, **extra)
    cache, cache_kw = _output_cache(out), cache_kwarg(lm)
    next_pos = pos[:, -1:] + 1
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    generated: list[torch.Tensor] = []
    for step in range(settings.max_new_tokens):
        token = out.logits[:, -1].argmax(dim=-1)
        if settings.pad_token_id is not None:
            token = torch.where(finished, torch.full_like(token, settings.pad_token_id), token)
        generated.append(token)
        _mark_finished(finished, generated, settings, tokenizer)
        if bool(finished.all()) or step == settings.max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype, device=device)], dim=1)
        inputs = {cache_kw: cache, **({"position_ids": next_pos} if with_pos else {})}
        out = lm(input_ids=token[:, None], attention_mask=mask, use_cache=True, **inputs)
        cache = _output_cache(out)
        next_pos = next_pos + 1
    return torch.cat([input_ids, torch.stack(generated, dim=1)], dim=1)
