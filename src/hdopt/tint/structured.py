"""The structured TinT: the construction's computation as index/einsum ops on the auxiliary's tensors.

One call of :meth:`StructuredTinT.forward` on ``[context | query]`` does what one TinT forward pass does:

1. run the auxiliary model on the context (blocks below the simulated ones just run forward, once);
2. ``n_steps`` times: forward the top ``n_layers`` blocks keeping activations, take the gradient of the
   context loss by hand (:mod:`hdopt.tint.backward`), and apply ``theta <- theta - inner_lr * grad``;
3. run the updated auxiliary on ``[context | query]`` and return the logits from the last context token on.

Each sequence of a batch gets its own simulated fine-tuning (updated weights carry a batch dimension). The
explicit realization (:mod:`hdopt.tint.explicit`) computes the same thing with a real transformer whose
prefix tokens hold the weights; the structured one skips the mostly-zero matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hdopt.tint.aux import AuxSpec, Block
from hdopt.tint.backward import block_backward, lm_loss_grad
from hdopt.tint.config import TinTConfig
from hdopt.tint.functional import attention_mask, block_forward, embed, final_logits, rope_tables

KVCache = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class TinTOutput:
    """Result of one TinT forward pass.

    Attributes:
        query_logits: (B, T - context_len + 1, V); row i predicts token ``context_len + i`` (row 0 is read at
            the last context token, the last row predicts the token after the input).
        inner_losses: (n_steps, B) context loss before each simulated step.
        blocks: the updated top blocks (per-example tensors with a leading batch dimension).
    """

    query_logits: torch.Tensor
    inner_losses: torch.Tensor
    blocks: list[Block]


class StructuredTinT(nn.Module):
    """TinT on an auxiliary :class:`AuxSpec`, computed with dense per-token ops (the fast path)."""

    def __init__(self, spec: AuxSpec, config: TinTConfig):
        super().__init__()
        if config.n_layers > spec.n_layers:
            raise ValueError(f"n_layers={config.n_layers} but the auxiliary model has {spec.n_layers} blocks")
        self.spec, self.config = spec, config
        self.first = spec.n_layers - config.n_layers  # index of the lowest fine-tuned block

    def num_parameters(self) -> int:
        """Stored parameters: the auxiliary's own (the construction's fixed patterns are code here)."""
        return self.spec.num_parameters()

    def _ctx(self, Tq: int, Tk: int, key_mask, device) -> dict:
        ctx = {"allowed": attention_mask(Tq, Tk, key_mask, device)}
        if self.spec.family == "llama":
            ctx["cos"], ctx["sin"] = rope_tables(self.spec, torch.arange(Tk - Tq, Tk, device=device),
                                                 self.spec.dtype)
        return ctx

    @torch.no_grad()
    def adapt(self, ids: torch.Tensor, targets: torch.Tensor | None = None,
              key_mask: torch.Tensor | None = None,
              hidden: torch.Tensor | None = None) -> tuple[list[Block], torch.Tensor]:
        """Simulate ``n_steps`` of SGD on the context ``ids`` (B, T).

        Args:
            targets: (B, T) bool, tokens that are training targets (default: every token but the first,
                and not padding). Use it for label-token-only losses.
            key_mask: (B, T) 1 for real tokens, 0 for right padding.
            hidden: the output of the frozen blocks (:meth:`lower`), if already computed.
        Returns:
            (updated top blocks, each tensor with a leading batch dim; losses (n_steps, B)).
        """
        spec, cfg = self.spec, self.config
        B, T = ids.shape
        if targets is None:
            targets = torch.ones_like(ids, dtype=torch.bool)
            targets[:, 0] = False
            if key_mask is not None:
                targets &= key_mask.bool()
        ctx = self._ctx(T, T, key_mask, ids.device)
        x = self.lower(ids, key_mask)[0] if hidden is None else hidden  # frozen blocks: forward once
        top = [{k: v.unsqueeze(0) for k, v in p.items()} for p in spec.blocks[self.first:]]  # (1, ...)
        losses = []
        for _ in range(cfg.n_steps):
            h, caches = x, []
            for p in top:
                h, cache, _ = block_forward(spec, p, h, ctx, keep=True)
                caches.append(cache)
            loss, dh = lm_loss_grad(spec, h, ids, targets, cfg.reduction, cfg)
            losses.append(loss)
            for i in reversed(range(len(top))):
                dh, grads = block_backward(spec, cfg, top[i], caches[i], dh, ctx)
                top[i] = {k: (v - cfg.inner_lr * grads[k]) if k in grads else v for k, v in top[i].items()}
        inner = torch.stack(losses) if losses else torch.zeros(0, B, dtype=x.dtype)
        return top, inner

    def blocks_with(self, top: list[Block] | None) -> list[Block]:
        """All blocks of the auxiliary with the top ones replaced (None: the original model)."""
        return self.spec.blocks if top is None else self.spec.blocks[:self.first] + top

    def _prepare(self, T: int, past: KVCache | None, key_mask: torch.Tensor | None,
                 device) -> tuple[int, dict]:
        """(number of cached tokens, block context for T new tokens after them)."""
        start = 0 if not past else past[0][0].shape[2]
        if past and key_mask is not None:
            key_mask = torch.cat((key_mask.new_ones(key_mask.shape[0], start), key_mask), dim=1)
        return start, self._ctx(T, start + T, key_mask, device)

    def _stack(self, x: torch.Tensor, blocks: list[Block], ctx: dict, past: KVCache | None,
               want_cache: bool) -> tuple[torch.Tensor, KVCache]:
        cache: KVCache = []
        for i, p in enumerate(blocks):
            ctx["past"] = None if past is None else past[i]
            x, _, kv = block_forward(self.spec, p, x, ctx)
            if want_cache:
                cache.append(kv)
        return x, cache

    @torch.no_grad()
    def lower(self, ids: torch.Tensor, key_mask: torch.Tensor | None = None, past: KVCache | None = None,
              want_cache: bool = False) -> tuple[torch.Tensor, KVCache]:
        """Output (B, T, D) of the frozen blocks (shared by every method) and their KV cache."""
        start, ctx = self._prepare(ids.shape[1], past, key_mask, ids.device)
        return self._stack(embed(self.spec, ids, start), self.spec.blocks[:self.first], ctx, past, want_cache)

    @torch.no_grad()
    def upper(self, hidden: torch.Tensor, top: list[Block] | None, key_mask: torch.Tensor | None = None,
              past: KVCache | None = None, logits_from: int = 0, want_cache: bool = False,
              positions: torch.Tensor | None = None):
        """The top blocks (``top``, None: the original ones) on :meth:`lower`'s output, then the logits.

        ``past`` is the top blocks' KV cache. Returns (logits as in :meth:`run`, KV cache or None).
        """
        start, ctx = self._prepare(hidden.shape[1], past, key_mask, hidden.device)
        top = self.spec.blocks[self.first:] if top is None else top
        x, cache = self._stack(hidden, top, ctx, past, want_cache)
        x = x[torch.arange(x.shape[0]), positions][:, None] if positions is not None else x[:, logits_from:]
        return final_logits(self.spec, x), (cache if want_cache else None)

    @torch.no_grad()
    def run(self, ids: torch.Tensor, blocks: list[Block], key_mask: torch.Tensor | None = None,
            past: KVCache | None = None, logits_from: int = 0, want_cache: bool = False,
            positions: torch.Tensor | None = None):
        """Auxiliary forward with the given blocks; ``past`` is a KV cache of earlier tokens (batch 1 or B).

        Returns (logits (B, T - logits_from, V), or (B, 1, V) at ``positions`` (B,) when given; the KV cache
        of all tokens or None).
        """
        start, ctx = self._prepare(ids.shape[1], past, key_mask, ids.device)
        x, cache = self._stack(embed(self.spec, ids, start), blocks, ctx, past, want_cache)
        x = x[torch.arange(x.shape[0]), positions][:, None] if positions is not None else x[:, logits_from:]
        return final_logits(self.spec, x), (cache if want_cache else None)

    def forward(self, input_ids: torch.Tensor, context_len: int, targets: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None) -> TinTOutput:
        """One TinT forward pass on ``input_ids`` = [context | query] (B, T); see the module docstring."""
        if not 1 <= context_len <= input_ids.shape[1]:
            raise ValueError(f"context_len must be in [1, {input_ids.shape[1]}], got {context_len}")
        ctx_mask = None if attention_mask is None else attention_mask[:, :context_len]
        ctx_targets = None if targets is None else targets[:, :context_len]
        top, losses = self.adapt(input_ids[:, :context_len], ctx_targets, ctx_mask)
        logits, _ = self.run(input_ids, self.blocks_with(top), attention_mask, logits_from=context_len - 1)
        return TinTOutput(query_logits=logits, inner_losses=losses, blocks=top)
