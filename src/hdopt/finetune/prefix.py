"""Prefix-tuning: trainable key/value vectors for ``n`` virtual tokens in every attention layer.

Li & Liang (2021), as MeZO uses it (section 3, Appendix E.5): 5 virtual tokens per layer, initialised from
the key/value activations the model itself produces for 5 random vocabulary tokens (random initialisation
trains much worse with ZO). The prefix enters through transformers' cache API: every forward receives a
``DynamicCache`` already holding the prefix, so any causal LM with a key/value cache works (Llama, Gemma,
OPT, GPT-2), and rows see the positions after the prefix, as the initialising activations did.

Why not ``peft``'s prefix tuning: it initialises the prefix randomly (or through an MLP) with no way to
start from real activations, and its wrapper hides the model body, so :mod:`hdopt.lm.scoring` would compute
full-vocabulary logits at every position. Here the wrapper exposes ``base_model`` (body + prefix) and the LM
head, and scoring keeps its fast path.

Shapes: ``keys``/``values`` are ``[layers, kv_heads, n, head_dim]``; the cache gets them expanded to batch B.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn


def cache_kwarg(module: nn.Module) -> str:
    """``cache`` (transformers >= 5) or ``past_key_values`` (older), whichever ``forward`` takes."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def activation_prefix(lm: nn.Module, num_tokens: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Keys/values ``[layers, kv_heads, n, head_dim]`` of ``n`` random vocabulary tokens through ``lm``."""
    device = lm.get_input_embeddings().weight.device
    vocab = lm.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, num_tokens), generator=generator).to(device)
    out = lm(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values
    keys = torch.stack([layer.keys[0] for layer in cache.layers])
    values = torch.stack([layer.values[0] for layer in cache.layers])
    return keys, values


class PrefixKV(nn.Module):
    """Owns the prefix; its forward runs a model (the body or the whole LM) with the prefix in the cache.

    The parameters are used only inside this module's forward, so :mod:`hdopt.zo`'s forward-time
    perturbation sees them like any module weight.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, config) -> None:
        super().__init__()
        self.keys = nn.Parameter(keys.clone())
        self.values = nn.Parameter(values.clone())
        self._config = config  # not a module: the cache reads its layer types (sliding windows)

    @property
    def num_tokens(self) -> int:
        return self.keys.shape[2]

    def cache(self, batch: int):
        """A fresh ``DynamicCache`` holding the prefix for ``batch`` rows (differentiable)."""
        from transformers import DynamicCache

        layers = [
            (k.unsqueeze(0).expand(batch, -1, -1, -1), v.unsqueeze(0).expand(batch, -1, -1, -1))
            for k, v in zip(self.keys, self.values, strict=True)
        ]
        return DynamicCache(ddp_cache_data=layers, config=self._config)

    def forward(self, run: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs):  # fmt: skip
        """``run(input_ids, mask with the prefix, cache=prefix)``; ``use_cache`` is forced on."""
        batch, length = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones(batch, length, dtype=torch.long, device=input_ids.device)
        ones = torch.ones(batch, self.num_tokens, dtype=attention_mask.dtype, device=attention_mask.device)
        kwargs.pop("use_cache", None)
        kwargs[cache_kwarg(run)] = self.cache(batch)
        mask = torch.cat([ones, attention_mask], dim=1)  # [B, n + T]
        return run(input_ids=input_ids, attention_mask=mask, use_cache=True, **kwargs)


class _PrefixedBody:
    """``model.base_model`` of a :class:`PrefixLM`: the body with the prefix (what scoring calls)."""

    def __init__(self, owner: PrefixLM) -> None:
        self.owner = owner

    def __call__(self, **kwargs):
        return self.owner.prefix(self.owner.lm.base_model, **kwargs)


class PrefixLM(nn.Module):
    """A causal LM with a trainable prefix. Trainable parameters: ``prefix.keys`` and ``prefix.values``.

    Quacks like the wrapped model where hdopt.lm needs it: ``forward`` returns its output (``.logits``),
    ``base_model`` gives hidden states, ``get_input_embeddings``/``get_output_embeddings``, ``config`` and
    ``generate`` (greedy, the prefix first in the key/value cache).
    """

    def __init__(self, lm: nn.Module, prefix: PrefixKV) -> None:
        super().__init__()
        self.lm = lm
        self.prefix = prefix

    @property
    def config(self):
        return self.lm.config

    @property
    def base_model(self) -> _PrefixedBody:
        return _PrefixedBody(self)

    def get_input_embeddings(self) -> nn.Module:
        return self.lm.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm.get_output_embeddings()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs):
        return self.prefix(self.lm, input_ids, attention_mask, **kwargs)

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 generation_config=None, tokenizer=None, **kwargs) -> torch.Tensor:  # fmt: skip
        """Greedy generation after the prefix (see :mod:`hdopt.finetune.prefix_generation`).

        Takes what :func:`hdopt.lm.generation.greedy_generate` passes to ``transformers``' ``generate``:
        left-padded ``input_ids``/``attention_mask``, a ``GenerationConfig`` (``max_new_tokens``,
        ``eos_token_id``, ``pad_token_id``, ``stop_strings``; keyword arguments override it) and the
        tokenizer for the stop strings. Returns ``[B, T + new tokens]``. Sampling and beams raise
        ``ValueError``.
        """
        from hdopt.finetune.prefix_generation import GreedySettings, greedy_with_prefix

        settings = GreedySettings.from_config(generation_config, **kwargs)
        return greedy_with_prefix(self.lm, self.prefix, input_ids, attention_mask, settings, tokenizer)


def add_prefix(lm: nn.Module, num_tokens: int = 5, init: str = "activations", seed: int = 0) -> PrefixLM:
    """Wrap ``lm`` with a prefix of ``num_tokens`` virtual tokens per layer.

    Args:
        lm: a causal LM whose forward returns a key/value cache (``use_cache=True``).
        num_tokens: virtual tokens per layer (MeZO: 5).
        init: ``activations`` (keys/values of random vocabulary tokens) or ``random`` (Gaussian with the
            activations' per-layer standard deviation).
        seed: draws the tokens (and the random init).
    """
    generator = torch.Generator().manual_seed(seed)
    was_training = lm.training
    lm.eval()
    keys, values = activation_prefix(lm, num_tokens, generator)
    lm.train(was_training)
    if init == "random":
        keys = torch.randn(keys.shape, generator=generator).to(keys) * keys.std(dim=(1, 2, 3), keepdim=True)
        values = torch.randn(values.shape, generator=generator).to(values) * values.std(
            dim=(1, 2, 3), keepdim=True
        )
    for p in lm.parameters():
        p.requires_grad_(False)
    return PrefixLM(lm, PrefixKV(keys, values, lm.config))
