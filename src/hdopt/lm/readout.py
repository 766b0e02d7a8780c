"""The last block's readout path: the maps that act only at the positions a classification loss reads.

In a causal decoder the loss of a prompt-based classifier reads the body's output at a few positions (those
that predict the option tokens). In the last block, the key and value projections (and the norm before them)
act at every position, since later queries attend to earlier keys, but the query projection, the output
projection and the MLP act on each position separately, and the last block's outputs elsewhere feed
nothing the loss reads. So the loss depends on these *readout* maps only through their outputs at the read
positions: :func:`readout_modules` names them, and :func:`replicated_losses` evaluates the per-example loss
on several copies of those positions at once (forward hooks on the readout modules may change each copy's
activations), from the bottom's cached states (:mod:`hdopt.lm.top_blocks`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hdopt.lm.scoring import OptionBatch, logprobs_from_states, option_scores_from_logprobs, scores_by_example
from hdopt.lm.top_blocks import TopBlocks, TopBlocksError, last_block_at, option_logits


def readout_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """The last block's query and output projections and its MLP's linear maps, by module name (as
    ``model.named_modules()`` gives them, so ``name + ".weight"`` is the parameter's name).

    Raises :class:`TopBlocksError` for a block that is not Llama-style (``self_attn.q_proj``/``o_proj`` and
    an ``mlp`` of linear maps).
    """
    last = TopBlocks(model, 1).top_layers[-1]
    attn, mlp = getattr(last, "self_attn", None), getattr(last, "mlp", None)
    wanted = [getattr(attn, "q_proj", None), getattr(attn, "o_proj", None)]
    wanted += [m for m in (mlp.modules() if mlp is not None else ()) if isinstance(m, nn.Linear)]
    if any(not isinstance(m, nn.Linear) for m in wanted) or len(wanted) < 3:
        raise TopBlocksError(f"{type(model).__name__}: the last block is not Llama-style (self_attn.q_proj, "
                             "self_attn.o_proj and an MLP of linear maps): node perturbation supports Llama, "
                             "Mistral, Qwen2, Gemma and SmolLM2")  # fmt: skip
    ids = {id(m) for m in wanted}
    return {name: m for name, m in model.named_modules() if id(m) in ids}


@dataclass(frozen=True)
class ReadPositions:
    """The distinct positions a batch's loss reads: ``seq``/``pos`` [U]; ``inverse`` [M] (option token m is
    predicted at position ``inverse[m]``); ``example`` [U] (the example a position belongs to)."""

    seq: torch.Tensor
    pos: torch.Tensor
    inverse: torch.Tensor
    example: torch.Tensor

    @classmethod
    def of(cls, batch: OptionBatch) -> ReadPositions:
        width = batch.input_ids.shape[1]
        flat, inverse = torch.unique(batch.target_seq * width + batch.target_pos, return_inverse=True)
        example = torch.empty_like(flat)
        example[inverse] = batch.option_example[batch.target_option]  # a sequence belongs to one example
        return cls(flat // width, flat % width, inverse, example)

    def __len__(self) -> int:
        return int(self.seq.numel())


def replicated_losses(blocks: TopBlocks, bottom: torch.Tensor, batch: OptionBatch, where: ReadPositions,
                      copies: int) -> torch.Tensor:  # fmt: skip
    """Per-example classification losses [copies, E] of ``copies`` copies of the read positions.

    The last block runs once over the rows ``copy * U + u`` (copy-major; its keys and values once per
    sequence), so forward hooks on the readout modules see ``copies * U`` rows and may change each copy's
    activations. ``blocks`` must have K = 1 and the fast path (:meth:`TopBlocks.check`). Examples without a
    label get loss 0.
    """
    if blocks.k != 1 or not blocks.fast:
        raise TopBlocksError("replicated losses need the last block alone on its fast path (K = 1, "
                             "Llama-style)")
    u = len(where)
    seq, pos = where.seq.repeat(copies), where.pos.repeat(copies)
    rows = last_block_at(blocks.body, blocks.top_layers[-1], bottom, batch.attention_mask, seq, pos)
    states = blocks.body.norm(rows).view(copies, u, -1)
    one_token = bool((batch.option_length == 1).all())
    out = []
    for copy in states:
        at_targets = copy[where.inverse]  # [M, H]
        if one_token:
            scores = option_logits(blocks, batch, at_targets).float()
        else:
            scores = option_scores_from_logprobs(batch, logprobs_from_states(blocks.inner, batch, at_targets))
        table = scores_by_example(batch, scores)
        out.append(nn.functional.cross_entropy(table, batch.labels, ignore_index=-100, reduction="none"))
    return torch.stack(out)
