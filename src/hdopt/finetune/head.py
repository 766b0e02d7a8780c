"""Head tuning: train only the LM head (the output embedding); the body and the input embedding are frozen.

MeZO's linear-probing baseline for tasks without fixed label words (multiple choice such as COPA, and
generation such as SQuAD) tunes the LM head with backprop instead of fitting a logistic regression. Many
small models tie the head to the input embedding (SmolLM2, Gemma, GPT-2, OPT): training that shared matrix
would also change what the body reads. :func:`untie_head` gives the head its own copy first, so the input
embedding stays bitwise unchanged and the trained head (``lm_head.weight``, plus a bias where the family
has one) is all a run's checkpoints need to hold.
"""

from __future__ import annotations

import torch
from torch import nn


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a is b:
        return True
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def is_tied(model: nn.Module) -> bool:
    """True when the LM head's weight is the input embedding's (the same tensor or storage)."""
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    return head is not None and embed is not None and _shares_storage(head.weight, embed.weight)


def untie_head(model: nn.Module) -> nn.Module:
    """Give a tied LM head its own weight (a copy of the shared matrix); returns the head module.

    The model computes exactly what it did before. ``config.tie_word_embeddings`` is set to False so that
    transformers does not tie the two again (``tie_weights``, ``save_pretrained``/``from_pretrained``).
    """
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError(
            f"{type(model).__name__} has no LM head with a weight (get_output_embeddings() is {head!r}): "
            "head tuning needs one"
        )
    if is_tied(model):
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        config = getattr(model, "config", None)
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    return head


def add_head(model: nn.Module) -> nn.Module:
    """Freeze ``model`` except its (untied) LM head; returns the same model, ready for head tuning."""
    for p in model.parameters():
        p.requires_grad_(False)
    head = untie_head(model)
    for p in head.parameters():
        p.requires_grad_(True)
    return model
