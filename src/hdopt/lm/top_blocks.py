"""Splitting a decoder into a frozen bottom and a trainable top of K blocks, with the bottom's outputs cached.

When only the top K of L transformer blocks are trained, the bottom ``L - K`` blocks compute the same hidden
states for a training example at every step. :class:`TopBlocks` runs the two parts separately and
:class:`TrunkCache` keeps the bottom's output for every training sequence, so a forward pass during training
costs the top K blocks only (about K/L of a full forward, less the embedding and the LM head):

    h = bottom(ids)                      # once per sequence: embeddings + blocks 0 .. L-K-1 (cached)
    out = top(h)                         # every evaluation: blocks L-K .. L-1 + the final norm

Both parts run the model's own modules through its own forward (the top part by giving the body the cached
states as ``inputs_embeds`` with only the top blocks installed), so masks, rotary positions and adapters
(LoRA layers inside the top blocks) work as in the whole model, and a perturbation of the top blocks'
weights (:mod:`hdopt.zo.perturb`) acts exactly as it would in a full forward. :meth:`TopBlocks.check`
verifies once per model that ``top(bottom(x))`` reproduces the body's output; families whose body adds
something to ``inputs_embeds`` (GPT-2 and OPT add position embeddings) fail it and are refused.

With one-token options (label words), the classification loss needs only the label words' rows of the LM
head: cross-entropy over the options' log-probabilities equals cross-entropy over their logits (the
log-normaliser is shared), so :func:`option_logits` skips the ``hidden x vocab`` product.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from hdopt.lm.scoring import (
    OptionBatch,
    head_transform,
    logprobs_from_hidden,
    option_scores_from_logprobs,
    scores_by_example,
    unwrap_peft,
)


class TopBlocksError(ValueError):
    """The model cannot be split (architecture, K out of range, a sequence missing from the cache)."""


class _Captured(Exception):  # noqa: N818 (control flow, never seen by a user)
    """Raised by the capture hook to stop the body once the bottom's output is known."""


def _decoder_layers(body: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The body's list of transformer blocks: ``(owner, attribute name, list)``."""
    count = getattr(getattr(body, "config", None), "num_hidden_layers", None)
    for name, child in body.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and (count is None or len(child) == count):
            return body, name, child
    raise TopBlocksError(f"{type(body).__name__} has no list of {count} transformer blocks to split")


class TopBlocks:
    """A causal LM seen as ``bottom`` (embeddings + blocks ``0 .. L-K-1``) and ``top`` (the last K blocks).

    Args:
        model: a transformers causal LM, optionally wrapped by PEFT (LoRA); prompt-learning wrappers
            (prefix tuning) are not supported.
        k: how many blocks form the top (1 .. L).
    """

    def __init__(self, model: nn.Module, k: int):
        inner = unwrap_peft(model)
        if inner is None:
            raise TopBlocksError("top-block training does not combine with prefix tuning: use full or LoRA")
        body = getattr(inner, "base_model", inner)
        if body is inner:
            raise TopBlocksError(f"{type(inner).__name__} has no separate body (base_model) to split")
        self.model, self.inner, self.body = model, inner, body
        self.owner, self.attribute, self.layers = _decoder_layers(body)
        self.num_layers = len(self.layers)
        if not (isinstance(k, int) and 1 <= k <= self.num_layers):
            raise TopBlocksError(f"zo_blocks must be an integer from 1 to {self.num_layers}, got {k!r}")
        self.k = k
        self.top_layers = nn.ModuleList(list(self.layers)[self.num_layers - k :])

    @property
    def fraction(self) -> float:
        """K / L: the share of the blocks a top-only forward runs."""
        return self.k / self.num_layers

    def top_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Named parameters of the top blocks and of what follows them (the final norm), as ``model`` names
        them; the embeddings and the LM head (often tied to them) stay frozen."""
        first = self.num_layers - self.k
        layer_ids = {id(p) for layer in self.top_layers for p in layer.parameters()}
        bottom_ids = {id(p) for layer in list(self.layers)[:first] for p in layer.parameters()}
        frozen = {id(p) for p in self.inner.get_input_embeddings().parameters()}
        frozen |= {id(p) for p in self.inner.get_output_embeddings().parameters()}
        out = []
        for name, p in self.model.named_parameters():
            after = id(p) not in bottom_ids and id(p) not in frozen and _after_layers(name)
            if id(p) in layer_ids or after:
                out.append((name, p))
        return out

    @torch.no_grad()
    def bottom(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states entering block ``L-K``, shape [S, T, H] (the embeddings when K = L)."""
        captured: list[torch.Tensor] = []

        def capture(module, args, kwargs):
            captured.append(args[0] if args else kwargs["hidden_states"])
            raise _Captured

        handle = self.layers[self.num_layers - self.k].register_forward_pre_hook(capture, with_kwargs=True)
        try:
            self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        except _Captured:
            pass
        finally:
            handle.remove()
        return captured[0]

    @contextlib.contextmanager
    def _only_top(self) -> Iterator[None]:
        setattr(self.owner, self.attribute, self.top_layers)
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.layers)

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's output (after its final norm), [S, T, H], from the bottom's ``hidden`` states."""
        with self._only_top():
            return self.body(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)[0]

    @torch.no_grad()
    def check(self) -> None:
        """Raise :class:`TopBlocksError` unless ``top(bottom(x))`` reproduces the body's output on a probe."""
        if getattr(self.inner, "_hdopt_top_blocks_ok", None) is True:
            return
        was_training = self.model.training
        self.model.eval()
        device = self.inner.get_input_embeddings().weight.device
        ids = torch.arange(1, 7, device=device).unsqueeze(0)
        mask = torch.ones_like(ids)
        whole = self.body(input_ids=ids, attention_mask=mask, use_cache=False)[0].double()
        split = self.top(self.bottom(ids, mask), mask).double()
        self.model.train(was_training)
        scale = whole.abs().max().clamp_min(1e-6)
        if not ((whole - split).abs().max() / scale < 1e-4):
            raise TopBlocksError(
                f"{type(self.inner).__name__}: running the top blocks on cached states does not reproduce "
                "the model (its body adds something to the input embeddings, e.g. position embeddings); "
                "top-block training supports Llama-style decoders (Llama, Mistral, Qwen2, Gemma, SmolLM2)"
            )
        self.inner._hdopt_top_blocks_ok = True


def _after_layers(name: str) -> bool:
    """True for the final norm's parameters (named like ``model.norm.weight`` / ``...final_layernorm...``)."""
    leaf = name.rsplit(".", 2)
    return len(leaf) >= 2 and "norm" in leaf[-2] and ".layers." not in name and ".h." not in name


class TrunkCache:
    """The bottom's output for every sequence seen, keyed by the sequence's token ids.

    A row's bottom states do not depend on the other rows or on right padding (causal attention), so a
    sequence is computed once, whatever batch it is first met in. ``dtype`` (default the model's) sets the
    storage precision.
    """

    def __init__(self, blocks: TopBlocks, dtype: torch.dtype | None = None):
        self.blocks = blocks
        self.dtype = dtype
        self._rows: dict[tuple[int, ...], torch.Tensor] = {}

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes held by the cached states."""
        return sum(t.numel() * t.element_size() for t in self._rows.values())

    @staticmethod
    def _keys(batch: OptionBatch) -> list[tuple[int, ...]]:
        lengths = batch.attention_mask.sum(1).tolist()
        return [tuple(batch.input_ids[s, :n].tolist()) for s, n in enumerate(lengths)]

    @torch.no_grad()
    def add(self, batch: OptionBatch) -> None:
        """Compute and keep the bottom states of the rows of ``batch`` not cached yet."""
        keys = self._keys(batch)
        missing = [s for s, key in enumerate(keys) if key not in self._rows]
        if not missing:
            return
        rows = torch.tensor(missing, device=batch.input_ids.device)
        hidden = self.blocks.bottom(batch.input_ids[rows], batch.attention_mask[rows])
        for i, s in enumerate(missing):
            states = hidden[i, : len(keys[s])]
            self._rows[keys[s]] = states.to(self.dtype or states.dtype).clone()

    def hidden(self, batch: OptionBatch) -> torch.Tensor:
        """The cached bottom states of the rows of ``batch``, right-padded to its width: [S, T, H]."""
        keys = self._keys(batch)
        states = [self._rows.get(key) for key in keys]
        if any(s is None for s in states):
            raise TopBlocksError(
                f"{sum(s is None for s in states)} of {len(keys)} sequences are not in the cache: "
                "add(batch) first"
            )
        width = batch.input_ids.shape[1]
        dtype = self.blocks.inner.get_input_embeddings().weight.dtype
        out = states[0].new_zeros((len(states), width, states[0].shape[-1]), dtype=dtype)
        for s, row in enumerate(states):
            out[s, : row.shape[0]] = row
        return out


def option_logits(blocks: TopBlocks, batch: OptionBatch, hidden: torch.Tensor) -> torch.Tensor:
    """The logits of one-token options at their positions, [M], from the body's output ``hidden``.

    Only the options' rows of the LM head are applied: for one-token options, cross-entropy over the
    options' log-probabilities equals cross-entropy over these logits (the normaliser is common to an
    example's options, which share one row), and so does the argmax.
    """
    head = blocks.inner.get_output_embeddings()
    states = hidden[batch.target_seq, batch.target_pos]  # [M, H]
    logits = (states * head.weight[batch.target_token]).sum(-1)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[batch.target_token]
    return head_transform(blocks.inner.config, logits)


def option_table(blocks: TopBlocks, batch: OptionBatch, hidden: torch.Tensor) -> torch.Tensor:
    """[E, max options] scores whose softmax and argmax over an example's options are the model's: the
    label words' logits for one-token options (cheap), else the mean log-likelihood (the whole head)."""
    if bool((batch.option_length == 1).all()):
        scores = option_logits(blocks, batch, hidden).float()
    else:
        scores = option_scores_from_logprobs(batch, logprobs_from_hidden(blocks.inner, batch, hidden))
    return scores_by_example(batch, scores)


def top_classification_loss(blocks: TopBlocks, cache: TrunkCache, batch: OptionBatch) -> torch.Tensor:
    """MeZO's classification loss (cross-entropy over the options) with the bottom read from ``cache``."""
    table = option_table(blocks, batch, blocks.top(cache.hidden(batch), batch.attention_mask))
    return nn.functional.cross_entropy(table, batch.labels, ignore_index=-100)


@torch.no_grad()
def top_predictions(blocks: TopBlocks, cache: TrunkCache, batch: OptionBatch) -> torch.Tensor:
    """The predicted option of each example [E], with the bottom read from ``cache``."""
    return option_table(blocks, batch, blocks.top(cache.hidden(batch), batch.attention_mask)).argmax(dim=1)


def encode_and_cache(cache: TrunkCache, tokenizer, examples: Sequence, max_length: int, batch_size: int,
                     device) -> None:  # fmt: skip
    """Fill ``cache`` with the bottom states of ``examples``' classification rows, a batch at a time."""
    from hdopt.lm.scoring import encode_examples

    for start in range(0, len(examples), batch_size):
        cache.add(encode_examples(tokenizer, examples[start : start + batch_size], max_length).to(device))
