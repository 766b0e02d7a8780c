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

Only the outputs at the positions that predict option tokens enter the loss, so the last block is run at
those positions alone (its keys and values still cover every position): :meth:`TopBlocks.states_at` does
this for Llama-style blocks (pre-norm attention with rotary positions, grouped-query heads, then the MLP),
again checked once per model against the whole top, with the whole top as the fallback. For K = 1 and
prompts of ~40 tokens this is ~10x less work than running the block over every position.

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
    logprobs_from_states,
    option_scores_from_logprobs,
    scores_by_example,
    unwrap_peft,
)


class TopBlocksError(ValueError):
    """The model cannot be split (architecture, K out of range, a sequence missing from the cache)."""


class _Captured(Exception):  # noqa: N818 (control flow, never seen by a user)
    """Raised by the capture hook to stop the body once the bottom's output is known."""


def decoder_layers(body: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The body's list of transformer blocks: ``(owner, attribute name, list)``."""
    count = getattr(getattr(body, "config", None), "num_hidden_layers", None)
    for name, child in body.named_children():
        if isinstance(child, nn.ModuleList) and len(child) > 0 and (count is None or len(child) == count):
            return body, name, child
    raise TopBlocksError(f"{type(body).__name__} has no list of {count} transformer blocks to split")


def split_body(model: nn.Module, what: str) -> tuple[nn.Module, nn.Module]:
    """``(inner model, body)`` of a causal LM (PEFT LoRA unwrapped); :class:`TopBlocksError`, naming
    ``what`` needs them, for a prefix-tuning wrapper or a model without a separate body."""
    inner = unwrap_peft(model)
    if inner is None:
        raise TopBlocksError(f"{what} does not combine with prefix tuning: use full or LoRA")
    body = getattr(inner, "base_model", inner)
    if body is inner:
        raise TopBlocksError(f"{type(inner).__name__} has no separate body (base_model) to split")
    return inner, body


class TopBlocks:
    """A causal LM seen as ``bottom`` (embeddings + blocks ``0 .. L-K-1``) and ``top`` (the last K blocks).

    Args:
        model: a transformers causal LM, optionally wrapped by PEFT (LoRA); prompt-learning wrappers
            (prefix tuning) are not supported.
        k: how many blocks form the top (1 .. L).
    """

    def __init__(self, model: nn.Module, k: int):
        inner, body = split_body(model, "top-block training")
        self.model, self.inner, self.body = model, inner, body
        self.owner, self.attribute, self.layers = decoder_layers(body)
        self.num_layers = len(self.layers)
        if not (isinstance(k, int) and 1 <= k <= self.num_layers):
            raise TopBlocksError(f"zo_blocks must be an integer from 1 to {self.num_layers}, got {k!r}")
        self.k = k
        self.top_layers = nn.ModuleList(list(self.layers)[self.num_layers - k :])
        self.fast = False  # the last-block fast path, enabled by check()

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
    def _swapped(self, layers: Sequence[nn.Module], final_norm: bool = True) -> Iterator[None]:
        """Install ``layers`` as the body's blocks (and, without ``final_norm``, an identity norm)."""
        setattr(self.owner, self.attribute, nn.ModuleList(layers))
        norm = getattr(self.body, "norm", None)
        if not final_norm:
            self.body.norm = nn.Identity()
        try:
            yield
        finally:
            setattr(self.owner, self.attribute, self.layers)
            if not final_norm:
                self.body.norm = norm

    def top(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The body's output (after its final norm), [S, T, H], from the bottom's ``hidden`` states."""
        with self._swapped(self.top_layers):
            return self.body(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)[0]

    def states_at(self, hidden: torch.Tensor, attention_mask: torch.Tensor, seq: torch.Tensor,
                  pos: torch.Tensor) -> torch.Tensor:  # fmt: skip
        """The body's output at positions ``(seq[m], pos[m])``, [M, H], from the bottom's ``hidden`` states.

        With the fast path (see :meth:`check`) the last block runs only at the distinct positions asked for.
        """
        if not self.fast:
            return self.top(hidden, attention_mask)[seq, pos]
        if self.k > 1:  # the blocks below the last one, over every position, without the final norm
            with self._swapped(self.top_layers[:-1], final_norm=False):
                hidden = self.body(inputs_embeds=hidden, attention_mask=attention_mask, use_cache=False)[0]
        width = hidden.shape[1]
        flat, inverse = torch.unique(seq * width + pos, return_inverse=True)
        last = self.top_layers[-1]
        rows = last_block_at(self.body, last, hidden, attention_mask, flat // width, flat % width)
        return self.body.norm(rows)[inverse]

    @torch.no_grad()
    def check(self) -> None:
        """Raise :class:`TopBlocksError` unless ``top(bottom(x))`` reproduces the body's output on a probe;
        enable the last-block fast path when it reproduces it too."""
        if getattr(self.inner, "_hdopt_top_blocks", None) is not None:
            self.fast = self.inner._hdopt_top_blocks
            return
        was_training = self.model.training
        self.model.eval()
        device = self.inner.get_input_embeddings().weight.device
        ids = torch.arange(1, 8, device=device).repeat(2, 1)
        mask = torch.ones_like(ids)
        mask[1, 5:] = 0  # a right-padded row
        real = mask.bool()
        whole = self.body(input_ids=ids, attention_mask=mask, use_cache=False)[0].double()[real]
        bottom = self.bottom(ids, mask)
        scale = whole.abs().max().clamp_min(1e-6)
        if not (_gap(whole, self.top(bottom, mask).double()[real]) / scale < 1e-4):
            self.model.train(was_training)
            raise TopBlocksError(
                f"{type(self.inner).__name__}: running the top blocks on cached states does not reproduce "
                "the model (its body adds something to the input embeddings, e.g. position embeddings); "
                "top-block training supports Llama-style decoders (Llama, Mistral, Qwen2, Gemma, SmolLM2)"
            )
        seq, pos = real.nonzero(as_tuple=True)
        self.fast = True
        try:
            fast = self.states_at(bottom, mask, seq, pos).double()
            self.fast = bool(_gap(whole, fast) / scale < 1e-4)
        except (AttributeError, TypeError, RuntimeError, ValueError):  # not a Llama-style block
            self.fast = False
        self.model.train(was_training)
        self.inner._hdopt_top_blocks = self.fast


def _gap(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - b).abs().max()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotary embedding's half rotation of the last dimension: ``(-x2, x1)``."""
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def last_block_at(body: nn.Module, layer: nn.Module, hidden: torch.Tensor, attention_mask: torch.Tensor,
                   seq: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """A Llama-style block's output at positions ``(seq[m], pos[m])`` only, [M, H].

    Pre-norm attention: keys and values over every position of the rows, queries at the M positions, rotary
    positions, grouped-query heads, causal and padding masks, then the residual and the MLP at the M
    positions. The block's modules are called (so adapters and ZO perturbations act as in its forward).
    """
    attn = layer.self_attn
    rows, width, _ = hidden.shape
    d = attn.head_dim
    x = layer.input_layernorm(hidden)  # [S, T, H]
    keys = attn.k_proj(x).view(rows, width, -1, d).transpose(1, 2)  # [S, kv, T, d]
    values = attn.v_proj(x).view(rows, width, -1, d).transpose(1, 2)
    query = attn.q_proj(x[seq, pos]).view(len(seq), -1, d)  # [M, h, d]
    positions = torch.arange(width, device=hidden.device).unsqueeze(0)
    cos, sin = body.rotary_emb(x, position_ids=positions)  # [1, T, d]
    keys = keys * cos[:, None] + rotate_half(keys) * sin[:, None]
    query = query * cos[0, pos][:, None] + rotate_half(query) * sin[0, pos][:, None]
    groups = query.shape[1] // keys.shape[1]
    keys = keys[seq].repeat_interleave(groups, dim=1)  # [M, h, T, d]
    values = values[seq].repeat_interleave(groups, dim=1)
    scores = torch.einsum("mhd,mhtd->mht", query, keys) * attn.scaling
    allowed = (positions <= pos[:, None]) & attention_mask[seq].bool()  # [M, T]
    scores = scores.masked_fill(~allowed[:, None, :], float("-inf"))
    precision = torch.promote_types(scores.dtype, torch.float32)  # half precision: softmax in float32
    weights = torch.softmax(scores.to(precision), dim=-1).to(query.dtype)
    mixed = torch.einsum("mht,mhtd->mhd", weights, values).reshape(len(seq), -1)
    out = hidden[seq, pos] + attn.o_proj(mixed)
    return out + layer.mlp(layer.post_attention_layernorm(out))


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


def option_logits(blocks: TopBlocks, batch: OptionBatch, states: torch.Tensor) -> torch.Tensor:
    """The logits of one-token options [M] from the body's output at their positions, ``states`` [M, H].

    Only the options' rows of the LM head are applied: for one-token options, cross-entropy over the
    options' log-probabilities equals cross-entropy over these logits (the normaliser is common to an
    example's options, which share one row), and so does the argmax.
    """
    head = blocks.inner.get_output_embeddings()
    logits = (states * head.weight[batch.target_token]).sum(-1)
    if getattr(head, "bias", None) is not None:
        logits = logits + head.bias[batch.target_token]
    return head_transform(blocks.inner.config, logits)


def option_table(blocks: TopBlocks, batch: OptionBatch, bottom: torch.Tensor) -> torch.Tensor:
    """[E, max options] scores whose softmax and argmax over an example's options are the model's, from the
    bottom's states: the label words' logits for one-token options (cheap), else the mean log-likelihood
    (the whole head)."""
    states = blocks.states_at(bottom, batch.attention_mask, batch.target_seq, batch.target_pos)
    if bool((batch.option_length == 1).all()):
        scores = option_logits(blocks, batch, states).float()
    else:
        scores = option_scores_from_logprobs(batch, logprobs_from_states(blocks.inner, batch, states))
    return scores_by_example(batch, scores)


def top_classification_loss(blocks: TopBlocks, bottom: torch.Tensor, batch: OptionBatch) -> torch.Tensor:
    """MeZO's classification loss (cross-entropy over the options) from the bottom's states of ``batch``
    (``TrunkCache.hidden(batch)``: read once, they serve every evaluation of a step)."""
    table = option_table(blocks, batch, bottom)
    return nn.functional.cross_entropy(table, batch.labels, ignore_index=-100)


@torch.no_grad()
def top_predictions(blocks: TopBlocks, bottom: torch.Tensor, batch: OptionBatch) -> torch.Tensor:
    """The predicted option of each example [E], from the bottom's states of ``batch``."""
    return option_table(blocks, batch, bottom).argmax(dim=1)
