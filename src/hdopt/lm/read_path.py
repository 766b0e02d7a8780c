"""The read path: the last token of each row through every block, over the context's cached keys and values.

With read-position adapters (:mod:`hdopt.lm.read_adapters`) only each row's last token changes, so the keys
and values of the positions before it are the frozen model's at every layer: :class:`ContextCache` computes
them once per sequence (one forward of the model), and :func:`read_path_states` then runs the last token
alone through all L blocks (its query against the cached keys and its own key; the MLP on one token), in
``C`` copies at once whose adapter bottlenecks may be offset (node perturbation). One copy costs about one
token of the row's forward: 1/T of a forward pass for rows of T tokens (13.15 on average for SST-2).

The cache can live in a file (``directory``): on SmolLM2 (30 layers, 3 key/value heads of 64, float32) it
takes 45 KiB a context token, 599 MiB for SST-2's 1,100 prompts and 1,285 MiB for MR's (benchmarks/
zo_convergence.py's runs), more than the model's 513 MiB of weights; a step reads its
rows back (a few MiB), so the process holds the model and one batch's rows, as inference does.

:func:`check_read_path` verifies once per model that the read path reproduces the model's own forward with
its adapters (Llama-style blocks; others are refused).
"""

from __future__ import annotations

import bisect
import os
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from hdopt.lm.read_adapters import ATTRIBUTE, ReadAdapters, body_and_layers, read_adapters_of
from hdopt.lm.scoring import OptionBatch, scores_by_example, unwrap_peft
from hdopt.lm.top_blocks import TopBlocks, TopBlocksError, option_logits, rotate_half


class _Rows:
    """Tensors by key, in memory or appended to an unnamed temporary file (deleted when closed)."""

    def __init__(self, directory: str | os.PathLike | None) -> None:
        self._file = tempfile.TemporaryFile(dir=directory) if directory is not None else None  # noqa: SIM115
        self._index: dict[tuple[int, ...], tuple[int, torch.Size, torch.dtype] | torch.Tensor] = {}
        self.nbytes = 0

    def __contains__(self, key: tuple[int, ...]) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def put(self, key: tuple[int, ...], tensor: torch.Tensor) -> None:
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        if self._file is None:
            self._index[key] = tensor.clone()
        else:
            offset = self._file.seek(0, os.SEEK_END)
            self._file.write(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._file.flush()
            self._index[key] = (offset, tensor.shape, tensor.dtype)
        self.nbytes += size

    def get(self, key: tuple[int, ...]) -> torch.Tensor:
        entry = self._index[key]
        if isinstance(entry, torch.Tensor):
            return entry
        offset, shape, dtype = entry
        size = shape.numel() * torch.empty((), dtype=dtype).element_size()
        data = bytearray(os.pread(self._file.fileno(), size, offset))
        return torch.frombuffer(data, dtype=torch.uint8).view(dtype).view(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


@dataclass(frozen=True)
class Context:
    """A batch's read path inputs: ``keys``/``values`` [S, L, kv, T, d] of the positions before each row's
    last token (``mask`` [S, T]), and the last token's id and position [S]."""

    keys: torch.Tensor
    values: torch.Tensor
    mask: torch.Tensor
    last_ids: torch.Tensor
    last_pos: torch.Tensor


def _row_keys(batch: OptionBatch) -> list[tuple[int, ...]]:
    lengths = batch.attention_mask.sum(1).tolist()
    return [tuple(batch.input_ids[s, :n].tolist()) for s, n in enumerate(lengths)]


def check_batch(batch: OptionBatch) -> None:
    """Raise :class:`TopBlocksError` unless every option is one token predicted at its row's last token and
    row ``e`` is example ``e`` (label words after a prompt): the read path covers nothing else."""
    lengths = batch.attention_mask.sum(1)
    one_token = bool((batch.option_length == 1).all())
    at_last = bool((batch.target_pos == lengths[batch.target_seq] - 1).all())
    row_per_example = bool((batch.option_example[batch.target_option] == batch.target_seq).all())
    if not (one_token and at_last and row_per_example and batch.input_ids.shape[0] == batch.num_examples):
        raise TopBlocksError("read-position adapters read one position a row: every option must be one token "
                             "(label words) predicted after the prompt")  # fmt: skip


class ContextCache:
    """The frozen model's keys and values of every sequence seen, before its last token, keyed by its ids.

    Args:
        model: the causal LM (with or without its read-position adapters: they do not change the context).
        directory: keep the states in a temporary file there (``None``: in memory).
        dtype: storage precision (default: the model's).
    """

    def __init__(self, model: nn.Module, directory: str | os.PathLike | None = None,
                 dtype: torch.dtype | None = None) -> None:  # fmt: skip
        self.model = model
        self.body, self.layers = body_and_layers(model)
        self.dtype = dtype
        self._rows = _Rows(directory)

    def __len__(self) -> int:
        return len(self._rows)

    @property
    def nbytes(self) -> int:
        """Bytes the cached states take (in memory or in the file)."""
        return self._rows.nbytes

    def close(self) -> None:
        """Delete the file (if any)."""
        self._rows.close()

    @torch.no_grad()
    def add(self, batch: OptionBatch) -> int:
        """Compute and keep the states of the rows of ``batch`` not cached yet; returns how many were new."""
        keys = _row_keys(batch)
        missing = [s for s, key in enumerate(keys) if key not in self._rows]
        if not missing:
            return 0
        rows = torch.tensor(missing, device=batch.input_ids.device)
        out = self.body(input_ids=batch.input_ids[rows], attention_mask=batch.attention_mask[rows],
                        use_cache=True)  # fmt: skip
        cache = getattr(out, "cache", None) or out.past_key_values
        keys_all = torch.stack([layer.keys for layer in cache.layers], 1)  # [S, L, kv, T, d]
        values_all = torch.stack([layer.values for layer in cache.layers], 1)
        for i, s in enumerate(missing):
            n = len(keys[s]) - 1
            both = torch.stack([keys_all[i, :, :, :n], values_all[i, :, :, :n]])
            self._rows.put(keys[s], both.to(self.dtype or both.dtype))
        return len(missing)

    def context(self, batch: OptionBatch) -> Context:
        """The cached states of the rows of ``batch``, padded to its longest context."""
        keys = _row_keys(batch)
        absent = sum(key not in self._rows for key in keys)
        if absent:
            raise TopBlocksError(f"{absent} of {len(keys)} sequences are not in the cache: add(batch) first")
        stored = [self._rows.get(key) for key in keys]
        width = max(1, max(s.shape[3] for s in stored))
        _, layers, heads, _, dim = stored[0].shape
        dtype = unwrap_peft(self.model).get_input_embeddings().weight.dtype
        device = batch.input_ids.device
        both = torch.zeros(2, len(keys), layers, heads, width, dim, dtype=dtype, device=device)
        mask = torch.zeros(len(keys), width, dtype=torch.bool, device=device)
        for s, row in enumerate(stored):
            n = row.shape[3]
            both[:, s, :, :, :n] = row.to(device, dtype)
            mask[s, :n] = True
        lengths = batch.attention_mask.sum(1)
        rows = torch.arange(len(keys), device=device)
        return Context(both[0], both[1], mask, batch.input_ids[rows, lengths - 1], lengths - 1)


# Copies x rows a block runs at once: more copies run in slices, so the block's intermediates (the MLP's
# 3 x 1536 floats a row on SmolLM2) stay those of an inference batch's, whatever the copies.
ROWS_A_PASS = 512


def _against_context(per_copy: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """``per_copy`` [C, S, kv, g, n] times ``shared`` [S, kv, m, n] transposed: [C, S, kv, g, m]. The copies
    and groups share one matrix product per row and head, so the cached keys or values are read, not copied
    C times (an einsum over both can broadcast them: about 0.1 GB for 241 copies of 16 SmolLM2 rows of 40
    context tokens)."""
    copies, rows, heads, groups, n = per_copy.shape
    flat = per_copy.permute(1, 2, 0, 3, 4).reshape(rows, heads, copies * groups, n)
    out = flat @ shared.transpose(-1, -2)  # [S, kv, C g, m]
    return out.view(rows, heads, copies, groups, -1).permute(2, 0, 1, 3, 4)


def _block(layer: nn.Module, index: int, h: torch.Tensor, context: Context, rotary: tuple,
           allowed: torch.Tensor, adapters: ReadAdapters | None,
           shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Block ``index`` on the last tokens' states ``h`` [C, S, H] of C copies over the cached context (its
    adapter's bottleneck moved by ``shift`` [C, S, r] when given): (its output, its normalised input)."""
    copies, rows = h.shape[:2]
    cos, sin = rotary
    attn = layer.self_attn
    d = attn.head_dim
    x = layer.input_layernorm(h)
    query = attn.q_proj(x).view(copies, rows, -1, d)
    key = attn.k_proj(x).view(copies, rows, -1, d)
    value = attn.v_proj(x).view(copies, rows, -1, d)
    query = query * cos + rotate_half(query) * sin
    key = key * cos + rotate_half(key) * sin
    heads = key.shape[2]
    query = query.view(copies, rows, heads, -1, d)  # [C, S, kv, groups, d]
    cached_keys, cached_values = context.keys[:, index], context.values[:, index]  # [S, kv, T, d]
    to_context = _against_context(query, cached_keys)
    to_itself = torch.einsum("cskgd,cskd->cskg", query, key)[..., None]
    scores = torch.cat([to_context, to_itself], -1) * attn.scaling
    scores = scores.masked_fill(~allowed[None, :, None, None], float("-inf"))
    precision = torch.promote_types(scores.dtype, torch.float32)
    weights = torch.softmax(scores.to(precision), dim=-1).to(query.dtype)
    mixed = _against_context(weights[..., :-1], cached_values.transpose(-1, -2))
    mixed = mixed + weights[..., -1:] * value[:, :, :, None]
    out = h + attn.o_proj(mixed.reshape(copies, rows, -1))
    out = out + layer.mlp(layer.post_attention_layernorm(out))
    if adapters is not None:
        a = adapters.bottleneck(index, x)
        if shift is not None:
            a = a + shift.to(a.dtype)
        out = out + adapters.expand(index, a)
    return out, x


def read_path_states(model: nn.Module, context: Context, adapters: ReadAdapters | None = None,
                     copies: int = 1, offsets: torch.Tensor | None = None,
                     inputs: list[torch.Tensor] | None = None,
                     first_layers: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """The body's output (after the final norm) at each row's last token, for ``copies`` copies: [C, S, H].

    ``offsets`` [C, S, L, r] are added to the adapters' bottleneck values ``a_l`` of each copy; ``inputs``,
    when given, receives each block's adapter input ``x_l`` of the first copy ([S, H] per block).
    ``first_layers`` (ascending, ``[0]`` first) names each copy's first block with a nonzero offset: a copy
    is run from there on, starting from the first copy's state, which it equals below (its offsets there
    must be zero), so copy ``c`` costs ``L - first_layers[c]`` blocks instead of ``L``.
    """
    body, layers = body_and_layers(model)
    if first_layers is not None and (len(first_layers) != copies or first_layers[0] != 0
                                     or sorted(first_layers) != list(first_layers)
                                     or first_layers[-1] >= len(layers)):  # fmt: skip
        raise ValueError(f"first_layers must list {copies} ascending blocks from 0 (below {len(layers)})")
    embed = unwrap_peft(model).get_input_embeddings()
    rows = context.last_ids.shape[0]
    h = embed(context.last_ids).unsqueeze(0)  # [1, S, H]: the copies that start later join below
    cos, sin = body.rotary_emb(h[0][:, None], position_ids=context.last_pos[:, None])  # [S, 1, d]
    allowed = torch.cat([context.mask, context.mask.new_ones(rows, 1)], 1)  # [S, T + 1]: the context, itself
    per_pass = max(1, ROWS_A_PASS // rows)  # copies a pass: many copies run in slices, as a batch would
    for index, layer in enumerate(layers):
        started = copies if first_layers is None else bisect.bisect_right(first_layers, index)
        if started > h.shape[0]:
            h = torch.cat([h, h[:1].expand(started - h.shape[0], -1, -1)])
        parts = []
        for first in range(0, h.shape[0], per_pass):
            part = slice(first, min(first + per_pass, h.shape[0]))  # the copies started so far
            shift = None if offsets is None else offsets[part, :, index]
            out, x = _block(layer, index, h[part], context, (cos, sin), allowed, adapters, shift)
            if first == 0 and inputs is not None and adapters is not None:
                inputs.append(x[0])
            parts.append(out)
        h = parts[0] if len(parts) == 1 else torch.cat(parts)
    return body.norm(h)


def read_path_losses(model: nn.Module, context: Context, batch: OptionBatch, copies: int = 1,
                     offsets: torch.Tensor | None = None, inputs: list[torch.Tensor] | None = None,
                     first_layers: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """Per-example classification losses [C, E] (cross-entropy over the label words; 0 without a label);
    the copies as :func:`read_path_states` runs them."""
    scores = read_path_scores(model, context, batch, copies, offsets, inputs, first_layers)
    labels = batch.labels.expand(copies, -1)
    return nn.functional.cross_entropy(scores.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                       reduction="none").view(copies, -1)  # fmt: skip


def read_path_scores(model: nn.Module, context: Context, batch: OptionBatch, copies: int = 1,
                     offsets: torch.Tensor | None = None, inputs: list[torch.Tensor] | None = None,
                     first_layers: list[int] | None = None) -> torch.Tensor:  # fmt: skip
    """The label words' scores [C, E, options] (their logits; -inf for an example's missing options)."""
    adapters = getattr(model, ATTRIBUTE, None)
    states = read_path_states(model, context, adapters, copies, offsets, inputs, first_layers)
    blocks = TopBlocks(model, 1)
    out = []
    for copy in states:  # in float32 at least (half-precision models); float64 models stay exact
        logits = option_logits(blocks, batch, copy[batch.target_seq])
        out.append(scores_by_example(batch, logits.to(torch.promote_types(logits.dtype, torch.float32))))
    return torch.stack(out)


@torch.no_grad()
def check_read_path(model: nn.Module, batch: OptionBatch) -> None:
    """Raise :class:`TopBlocksError` unless the read path reproduces the model's forward (with its adapters,
    set to random values for the check and restored) on ``batch``'s label-word logits."""
    check_batch(batch)
    adapters = read_adapters_of(model)
    kept = adapters.down.detach().clone()
    was_training = model.training
    model.eval()
    try:
        generator = torch.Generator().manual_seed(0)
        adapters.down.copy_(torch.randn(kept.shape, generator=generator).to(kept) * 0.05)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        whole = logits[batch.target_seq, batch.target_pos, batch.target_token].double()
        cache = ContextCache(model)
        cache.add(batch)
        states = read_path_states(model, cache.context(batch), adapters)[0]
        blocks = TopBlocks(model, 1)
        mine = option_logits(blocks, batch, states[batch.target_seq]).double()
        gap = float((whole - mine).abs().max() / whole.abs().max().clamp_min(1e-6))
    finally:
        adapters.down.copy_(kept)
        model.train(was_training)
    if not gap < 1e-4:
        name = type(unwrap_peft(model)).__name__
        raise TopBlocksError(f"{name}: the read path does not reproduce the model "
                             f"(relative gap {gap:.2e}); read-position adapters support Llama-style decoders "
                             "(Llama, Mistral, Qwen2, SmolLM2)")  # fmt: skip
