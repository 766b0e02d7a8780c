"""What a method trains: all weights, LoRA adapters (peft), a prefix or the LM head; the rest is frozen."""

from __future__ import annotations

import torch
from torch import nn

from hdopt.finetune.config import MethodConfig
from hdopt.finetune.head import add_head
from hdopt.finetune.prefix import add_prefix


def add_lora(model: nn.Module, cfg: MethodConfig, seed: int) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters (default targets: peft's q and v projections of the family).

    ``lora_B`` starts at zero, so the wrapped model computes exactly what the base model does; ``lora_A`` is
    drawn from torch's global generator, seeded here with ``seed``.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=0.0,  # ZO needs the same function at +eps and -eps
        target_modules=cfg.lora_targets,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(seed)
    try:
        return get_peft_model(model, lora)
    except ValueError as err:
        raise ValueError(
            f"LoRA could not find its target modules ({err}); pass --lora-targets with the names of this "
            "model's query/value projections"
        ) from err


def prepare_model(model: nn.Module, adapter: str, cfg: MethodConfig, seed: int) -> nn.Module:
    """Return the model to train for ``adapter`` (``full``, ``lora``, ``prefix``, ``head`` or ``none``)."""
    if adapter == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if adapter == "lora":
        return add_lora(model, cfg, seed)
    if adapter == "prefix":
        return add_prefix(model, cfg.prefix_tokens, cfg.prefix_init, seed)
    if adapter == "head":
        return add_head(model)
    if adapter == "none":
        for p in model.parameters():
            p.requires_grad_(False)
        return model
    raise ValueError(f"unknown adapter {adapter!r}")


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires grad (tied weights appear once)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
