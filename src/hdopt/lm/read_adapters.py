"""Read-position adapters: a small bottleneck in every block that acts only at each row's last token.

A prompt-based classifier reads the model at one position per row: the last token of the prompt, whose
output predicts the label word. Adapters that act only there leave every other position's states, and so
the keys and values the last token attends to, exactly as the frozen model computes them. In block ``l``:

    out_l <- out_l + U_l (D_l x_l)        at each row's last token only

with ``x_l`` the block's normalised input there (its ``input_layernorm``), ``D_l`` [r, H] trained (zero at
the start, so the adapted model starts as the model) and ``U_l`` [H, r] fixed, drawn from a seed
(Gaussian, variance 1/r). Training ``D`` alone keeps the adapter's output in an r-dimensional space a block,
``a_l = D_l x_l``: :mod:`hdopt.finetune.read_node_perturbation` estimates the loss gradient with respect to
those ``L x r`` numbers an example from forward passes, and ``dL/dD_l = (dL/da_l) x_l^T``.

:func:`attach_read_adapters` installs the adapters into a model as ``model.read_adapters`` with forward
hooks, so the model's own forward (evaluation, :func:`hdopt.finetune.load_trained`) applies them at the
last non-padding token of every row (right or left padding, from the attention mask; the last position
without one). :mod:`hdopt.lm.read_path` computes the same function from cached keys and values.
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.lm.scoring import unwrap_peft
from hdopt.lm.top_blocks import TopBlocksError, decoder_layers, split_body

ATTRIBUTE = "read_adapters"


class ReadAdapters(nn.Module):
    """``down`` [L, r, H] (trained, zeros) and ``up`` [L, H, r] (fixed, Gaussian / sqrt(r) from ``seed``)."""

    def __init__(self, layers: int, hidden: int, rank: int, seed: int) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        generator = torch.Generator().manual_seed(seed)
        self.down = nn.Parameter(torch.zeros(layers, rank, hidden))
        self.register_buffer("up", torch.randn(layers, hidden, rank, generator=generator) / rank**0.5)
        self._last: torch.Tensor | None = None  # [S]: each row's last token, set by the body's pre-hook

    @property
    def rank(self) -> int:
        return self.down.shape[1]

    def bottleneck(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``a = D_l x`` for inputs ``x`` [..., H]: [..., r]."""
        return x @ self.down[layer].to(x.dtype).T

    def expand(self, layer: int, a: torch.Tensor) -> torch.Tensor:
        """``U_l a`` for bottleneck values ``a`` [..., r]: [..., H]."""
        return a @ self.up[layer].to(a.dtype).T


def last_tokens(attention_mask: torch.Tensor | None, rows: int, width: int, device) -> torch.Tensor:
    """Each row's last non-padding position [rows] (right or left padding); ``width - 1`` without a 2-D mask
    or when the mask also covers earlier, cached positions (generation): then the input's last token."""
    if attention_mask is None or attention_mask.dim() != 2 or attention_mask.shape[-1] != width:
        return torch.full((rows,), width - 1, dtype=torch.long, device=device)
    flipped = attention_mask.flip(-1).long().argmax(-1)  # distance of the last 1 from the end
    return (width - 1 - flipped).to(device)


def body_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The model's body and its blocks; :class:`TopBlocksError` unless they are Llama-style."""
    inner, body = split_body(model, "read-position adapters")
    _, _, layers = decoder_layers(body)
    if not all(hasattr(layer, "input_layernorm") for layer in layers):
        raise TopBlocksError(f"{type(inner).__name__}: read-position adapters need Llama-style blocks "
                             "(input_layernorm before attention): Llama, Mistral, Qwen2, "
                             "SmolLM2")  # fmt: skip
    return body, layers


def attach_read_adapters(model: nn.Module, rank: int, seed: int) -> ReadAdapters:
    """Install read-position adapters of rank ``rank`` into ``model`` (``model.read_adapters``), with the
    hooks that apply them in its forward; returns them. Raises :class:`TopBlocksError` for a model without
    Llama-style blocks, or one that has them already."""
    if getattr(model, ATTRIBUTE, None) is not None:
        raise TopBlocksError("this model has read-position adapters already")
    body, layers = body_and_layers(model)
    weight = unwrap_peft(model).get_input_embeddings().weight
    dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype  # fp32 master
    adapters = ReadAdapters(len(layers), weight.shape[1], rank, seed).to(weight.device, dtype)
    setattr(model, ATTRIBUTE, adapters)

    def remember_rows(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        shaped = ids if ids is not None else embeds
        rows, width = shaped.shape[0], shaped.shape[1]
        adapters._last = last_tokens(kwargs.get("attention_mask"), rows, width, shaped.device)

    def add_at_last(index: int, layer: nn.Module):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            rows = torch.arange(out.shape[0], device=out.device)
            last = adapters._last if adapters._last is not None else torch.full_like(rows, out.shape[1] - 1)
            x = layer.input_layernorm(hidden_in[rows, last])
            out = out.clone()
            out[rows, last] = out[rows, last] + adapters.expand(index, adapters.bottleneck(index, x))
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    body.register_forward_pre_hook(remember_rows, with_kwargs=True)
    for index, layer in enumerate(layers):
        layer.register_forward_hook(add_at_last(index, layer), with_kwargs=True)
    return adapters


def read_adapters_of(model: nn.Module) -> ReadAdapters:
    """The adapters :func:`attach_read_adapters` installed (``TopBlocksError`` when there are none)."""
    adapters = getattr(model, ATTRIBUTE, None)
    if not isinstance(adapters, ReadAdapters):
        raise TopBlocksError("this model has no read-position adapters (attach_read_adapters)")
    return adapters
