"""Optimizers by name, their constructor keywords, schedules, and one optimizer step (ZO or backprop).

The names live in two registries: :data:`hdopt.zo.OPTIMIZERS` (forward-only rules) and :data:`FO_OPTIMIZERS`
(backprop). A run builds its optimizer as ``cls(params, lr=..., eps=..., ..., **optimizer_args)``: the run's
config fields give the shared hyperparameters, ``optimizer_args`` the rule's own keywords, checked here
against the constructor's signature (an unknown key or a value of the wrong type is a :class:`ConfigError`
naming it). Fields a run leaves unset take the optimizer's ``paper_defaults`` first, then the method's.
"""

from __future__ import annotations

import inspect
import math
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from hdopt.finetune.errors import ConfigError, DivergenceError
from hdopt.registry import Registry
from hdopt.zo import OPTIMIZERS as ZO_OPTIMIZERS
from hdopt.zo import ZOOptimizer

FO_OPTIMIZERS: Registry[type[torch.optim.Optimizer]] = Registry("backprop optimizer", sort=False)
FO_OPTIMIZERS.register("adamw", torch.optim.AdamW)
FO_OPTIMIZERS.register("sgd", torch.optim.SGD)

# constructor keywords a run sets through its own config fields, never through optimizer_args
CONFIG_KEYWORDS = {"lr": "--lr", "eps": "--eps", "weight_decay": "--weight-decay", "momentum": "--momentum",
                   "q": "--q", "estimator": "--estimator", "noise": "--noise", "seed": "--seed",
                   "reduce": "(data parallelism)", "params": "(the method)"}  # fmt: skip
PAPER_FIELDS = ("lr", "eps", "weight_decay", "momentum", "q", "estimator", "noise")  # config fields


def optimizer_names() -> list[str]:
    """Every optimizer a run can name: the ZO registry's, then the backprop ones."""
    return [*ZO_OPTIMIZERS, *FO_OPTIMIZERS]


def paper_defaults(name: str | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(config fields, optimizer_args)`` from the ``paper_defaults`` of optimizer ``name`` (ZO rules)."""
    if name not in ZO_OPTIMIZERS:
        return {}, {}
    defaults = dict(ZO_OPTIMIZERS.get(name).paper_defaults)
    fields = {k: defaults.pop(k) for k in PAPER_FIELDS if k in defaults}
    return fields, defaults


def constructor_parameters(cls: type) -> dict[str, inspect.Parameter]:
    """The keywords ``cls(...)`` takes by name: its ``__init__``'s and, while an ``__init__`` passes
    ``**kwargs`` on, its bases' (up to :class:`hdopt.zo.ZOOptimizer`, whose ``**rule_defaults`` end it)."""
    found: dict[str, inspect.Parameter] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # without self
        for p in params:
            if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                found.setdefault(p.name, p)
        if klass is ZOOptimizer or not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return found


def checked_arguments(cls: type, name: str, args: dict[str, Any] | None) -> dict[str, Any]:
    """``args`` checked against ``cls``'s constructor: known keywords, values of the annotated types
    (a list becomes a tuple where a tuple is expected; an int is a float where a float is)."""
    accepted = constructor_parameters(cls)
    out = {}
    for key, value in (args or {}).items():
        if key in CONFIG_KEYWORDS:
            raise ConfigError(f"optimizer_args: {key!r} is a run setting: set it with {CONFIG_KEYWORDS[key]}")
        if key not in accepted:
            known = sorted(k for k in accepted if k not in CONFIG_KEYWORDS)
            raise ConfigError(f"optimizer_args: {name} ({cls.__name__}) takes no argument {key!r}; "
                              f"it takes {', '.join(known) or 'none'}")  # fmt: skip
        hint = _hint(cls, key)
        try:
            out[key] = _conform(value, hint)
        except TypeError:
            must = f"optimizer_args: {key} of {name} must be {_describe(hint)}"
            raise ConfigError(f"{must}, got {value!r}") from None
    return out


def _hint(cls: type, key: str) -> Any:
    """The resolved annotation of keyword ``key`` (Any when it cannot be resolved)."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or key not in inspect.signature(init).parameters:
            continue
        try:
            return typing.get_type_hints(init).get(key, Any)
        except Exception:  # noqa: BLE001 - an annotation that names something not importable here
            return Any
    return Any


def _conform(value: Any, hint: Any) -> Any:
    """``value`` as type ``hint`` requires (no lossy coercion); raises TypeError when it does not fit."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or hint is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        for alternative in args:
            try:
                return _conform(value, alternative)
            except TypeError:
                continue
        raise TypeError
    if hint is type(None):
        if value is None:
            return None
        raise TypeError
    if hint in (bool, int, str):
        if type(value) is hint or (hint is int and isinstance(value, int) and not isinstance(value, bool)):
            return value
        raise TypeError
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
        raise TypeError
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise TypeError
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise TypeError
            return tuple(_conform(v, a) for v, a in zip(value, args, strict=True))
        item = args[0] if args else Any
        items = [_conform(v, item) for v in value]
        return tuple(items) if origin is tuple else items
    if isinstance(hint, type) and issubclass(hint, torch.Tensor):
        raise TypeError
    return value  # an annotation this check does not know: the constructor validates the value


def _describe(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def build_zo_optimizer(name: str, params, *, lr: float, eps: float, weight_decay: float, q: int,
                       estimator: str, noise: str, seed: int, momentum: float | None = None, reduce=None,
                       args: dict[str, Any] | None = None) -> ZOOptimizer:  # fmt: skip
    """``hdopt.zo.OPTIMIZERS[name](params, lr=..., ..., reduce=reduce, **args)``.

    ``momentum`` goes to rules that take it; 0 (the neutral value) is dropped for the others, any other value
    is refused. A value the rule refuses (e.g. an estimator its paper does not use) is a ConfigError.
    """
    if name not in ZO_OPTIMIZERS:
        raise ConfigError(f"ZO methods take a ZO optimizer ({', '.join(ZO_OPTIMIZERS)}), got {name!r}")
    cls = ZO_OPTIMIZERS.get(name)
    extra = checked_arguments(cls, name, args)
    extra.update(_momentum(cls, name, momentum))
    try:
        return cls(params, lr=lr, eps=eps, weight_decay=weight_decay, q=q, estimator=estimator, noise=noise,
                   seed=seed, reduce=reduce, **extra)  # fmt: skip
    except ValueError as err:
        raise ConfigError(f"optimizer {name}: {err}") from None


def build_fo_optimizer(name: str, params, *, lr: float, weight_decay: float, momentum: float | None = None,
                       args: dict[str, Any] | None = None) -> torch.optim.Optimizer:  # fmt: skip
    """``FO_OPTIMIZERS[name](tensors, lr=..., weight_decay=..., **args)`` (momentum where it applies)."""
    if name not in FO_OPTIMIZERS:
        raise ConfigError(f"backprop methods take {' or '.join(FO_OPTIMIZERS)}, got {name!r}")
    cls = FO_OPTIMIZERS.get(name)
    extra = {**checked_arguments(cls, name, args), **_momentum(cls, name, momentum)}
    try:
        return cls([p for _, p in params], lr=lr, weight_decay=weight_decay, **extra)
    except ValueError as err:
        raise ConfigError(f"optimizer {name}: {err}") from None


def _momentum(cls: type, name: str, momentum: float | None) -> dict[str, float]:
    if momentum is None:
        return {}
    if "momentum" in constructor_parameters(cls):
        return {"momentum": momentum}
    if momentum:
        raise ConfigError(f"optimizer {name} takes no momentum (got --momentum {momentum})")
    return {}


def lr_multiplier(schedule: str, steps: int) -> Callable[[int], float]:
    """``constant`` -> 1; ``linear`` -> ``1 - t/steps`` (0 after the last step)."""
    if schedule == "constant":
        return lambda t: 1.0
    return lambda t: max(0.0, 1.0 - t / steps)


def build_scheduler(optimizer, schedule: str, steps: int) -> LambdaLR:
    return LambdaLR(optimizer, lr_multiplier(schedule, steps))


def zo_step(optimizer, closures: Sequence[Callable[[], torch.Tensor]]) -> float:
    """One ZO step: the projected gradients of every micro-batch, averaged, then one update (a rule that
    evaluates candidate updates does so on the last micro-batch)."""
    for closure in closures[:-1]:
        optimizer.estimate(closure)
    return float(optimizer.step(closures[-1]))


def fo_step(optimizer, closures: Sequence[Callable[[], torch.Tensor]]) -> float:
    """One backprop step with gradient accumulation; raises before updating when the loss is not finite."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for closure in closures:
        loss = closure()
        value = float(loss.detach())
        if not math.isfinite(value):
            optimizer.zero_grad(set_to_none=True)
            raise DivergenceError(f"the loss is {value}; the weights were not updated")
        (loss / len(closures)).backward()
        total += value
    optimizer.step()
    return total / len(closures)
