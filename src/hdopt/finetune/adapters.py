"""What a method trains, by name: all weights, LoRA adapters (peft), a prefix, the LM head, the last block's
readout maps, read-position adapters, or nothing.

Each adapter is registered once, as PEFT registers its tuners: a name, the function that attaches it to a
model, and the dataclass of its settings. A settings dataclass declares the adapter's knobs with their
defaults and checks; the run config carries them as flat fields of the same names (``--lora-r`` sets
``method.lora_r``), ``None`` meaning the default declared here.

Adding an adapter: a settings dataclass (if it has knobs, and the same fields in
:class:`~hdopt.finetune.config.MethodConfig`), an ``attach(model, settings, seed)`` function and one
:func:`register_adapter` line.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from hdopt.finetune.errors import ConfigError
from hdopt.finetune.head import add_head
from hdopt.finetune.prefix import add_prefix
from hdopt.lm.read_adapters import attach_read_adapters
from hdopt.lm.readout import readout_modules
from hdopt.lm.top_blocks import TopBlocksError
from hdopt.registry import Registry


@dataclass(frozen=True)
class NoSettings:
    """An adapter without knobs."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA (peft): rank, scale ``alpha / r`` and target modules (None: peft's q and v projections for the
    family; ``c_attn`` for GPT-2). Dropout is 0, so the two ZO forwards see the same function."""

    lora_r: int = 8
    lora_alpha: float = 16.0
    lora_targets: list[str] | None = None

    def __post_init__(self) -> None:
        if self.lora_r < 1:
            raise ConfigError(f"lora_r must be >= 1, got {self.lora_r}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.lora_alpha}")


@dataclass(frozen=True)
class PrefixSettings:
    """Prefix-tuning: virtual tokens per layer, initialised from the ``activations`` the model produces for
    random vocabulary tokens (MeZO's choice) or ``random`` (Gaussian of the same per-layer scale)."""

    prefix_tokens: int = 5
    prefix_init: str = "activations"

    def __post_init__(self) -> None:
        if self.prefix_tokens < 1:
            raise ConfigError(f"prefix_tokens must be >= 1, got {self.prefix_tokens}")
        if self.prefix_init not in ("activations", "random"):
            raise ConfigError(f"prefix_init must be activations or random, got {self.prefix_init!r}")


@dataclass(frozen=True)
class ReadSettings:
    """Read-position adapters (:mod:`hdopt.lm.read_adapters`): the bottleneck's rank in every block."""

    read_rank: int = 8

    def __post_init__(self) -> None:
        if self.read_rank < 1:
            raise ConfigError(f"read_rank must be >= 1, got {self.read_rank}")


@dataclass(frozen=True)
class Adapter:
    """A registered adapter.

    Args:
        name: registry key (``Method.adapter``).
        attach: ``(model, settings, seed) -> model to train``; marks the trainable parameters.
        settings: its settings dataclass (fields named as the run config's).
        frozen_body: the body stays in eval mode while training (head tuning reads frozen features).
        computed_start: its starting weights are computed by the model (the prefix's activations), so they
            depend on float op order (threads, hardware): a run saves them (``initial.safetensors``) and
            data-parallel ranks take rank 0's.
    """

    name: str
    attach: Callable[[nn.Module, Any, int], nn.Module]
    settings: type = NoSettings
    frozen_body: bool = False
    computed_start: bool = False

    def settings_of(self, method_cfg: Any) -> Any:
        """This adapter's settings from a :class:`MethodConfig` (its ``None`` fields: the defaults)."""
        given = {f.name: getattr(method_cfg, f.name, None) for f in dataclasses.fields(self.settings)}
        return self.settings(**{k: v for k, v in given.items() if v is not None})

    def defaults(self) -> dict[str, Any]:
        """The settings' declared defaults, as config fields."""
        return dataclasses.asdict(self.settings())


ADAPTERS: Registry[Adapter] = Registry("adapter")


def register_adapter(adapter: Adapter) -> Adapter:
    """Add an adapter; a name can be registered once."""
    return ADAPTERS.register(adapter.name, adapter)


def check_adapter_settings(method_cfg: Any) -> None:
    """Raise :class:`ConfigError` when a field of any adapter's settings is out of range."""
    for name in ADAPTERS:
        ADAPTERS.get(name).settings_of(method_cfg)


def add_lora(model: nn.Module, settings: LoraSettings, seed: int) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters.

    ``lora_B`` starts at zero, so the wrapped model computes exactly what the base model does; ``lora_A`` is
    drawn from torch's global generator, seeded here with ``seed``.
    """
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=settings.lora_r,
        lora_alpha=settings.lora_alpha,
        lora_dropout=0.0,  # ZO needs the same function at +eps and -eps
        target_modules=settings.lora_targets,
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


def _train_all(model: nn.Module, settings: NoSettings, seed: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _freeze_all(model: nn.Module, settings: NoSettings, seed: int) -> nn.Module:
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _prefix(model: nn.Module, settings: PrefixSettings, seed: int) -> nn.Module:
    return add_prefix(model, settings.prefix_tokens, settings.prefix_init, seed)


def _head(model: nn.Module, settings: NoSettings, seed: int) -> nn.Module:
    return add_head(model)


def _readout(model: nn.Module, settings: NoSettings, seed: int) -> nn.Module:
    """The last block's readout maps (:func:`hdopt.lm.readout.readout_modules`) train; the rest is frozen."""
    try:
        modules = readout_modules(model)
    except TopBlocksError as err:
        raise ConfigError(str(err)) from None
    _freeze_all(model, settings, seed)
    for module in modules.values():
        module.requires_grad_(True)
    return model


def _read(model: nn.Module, settings: ReadSettings, seed: int) -> nn.Module:
    """Read-position adapters in every block (their ``down`` matrices train); the model is frozen."""
    _freeze_all(model, settings, seed)
    try:
        adapters = attach_read_adapters(model, settings.read_rank, seed)
    except TopBlocksError as err:
        raise ConfigError(str(err)) from None
    adapters.down.requires_grad_(True)
    return model


register_adapter(Adapter("full", _train_all))
register_adapter(Adapter("lora", add_lora, LoraSettings))
register_adapter(Adapter("prefix", _prefix, PrefixSettings, computed_start=True))
register_adapter(Adapter("head", _head, frozen_body=True))
register_adapter(Adapter("readout", _readout))  # node perturbation: the last block's per-position maps
register_adapter(Adapter("read", _read, ReadSettings))  # adapters at each row's last token, every block
register_adapter(Adapter("none", _freeze_all))  # the logistic-regression probe: the model stays frozen


def prepare_model(model: nn.Module, adapter: str, cfg: Any, seed: int) -> nn.Module:
    """Return the model to train for ``adapter`` (a registered name), with ``cfg``'s settings for it."""
    entry = ADAPTERS.get(adapter)
    return entry.attach(model, entry.settings_of(cfg), seed)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, parameter)`` of every parameter that requires grad (tied weights appear once)."""
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]
