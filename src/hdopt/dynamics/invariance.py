"""Detect scale-invariant parameters: a structural guess (weights followed by a norm layer) and a numerical
check.

A parameter w is scale-invariant when the network's output satisfies f(c w) = f(w) for all c > 0. That holds
exactly for a bias-free Linear/Conv layer whose only consumer is BatchNorm (with batch statistics), LayerNorm
or GroupNorm; such a layer's weight gets gradients orthogonal to w, which is what the equilibrium and
exponential-lr results need. :func:`find_scale_invariant` finds candidates by tracing the model with torch.fx;
:func:`check_scale_invariance` measures how much the output moves when each parameter is rescaled;
:func:`scale_invariant_parameters` combines both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
)
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def find_scale_invariant(model: nn.Module) -> list[str]:
    """Names of weights of bias-free Linear/Conv layers whose every consumer is a normalization layer.

    The model is traced with ``torch.fx.symbolic_trace``; a model that cannot be traced falls back to a walk
    over consecutive children of ``nn.Sequential`` containers.

    Args:
        model: any module.

    Returns:
        Parameter names (as in ``model.named_parameters()``) that are structurally scale-invariant.
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # untraceable control flow: fall back to Sequential neighbours
        return _sequential_candidates(model)
    modules = dict(model.named_modules())
    names = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], WEIGHT_LAYERS):
            continue
        layer = modules[node.target]
        users = list(node.users)
        if layer.bias is None and users and all(
                u.op == "call_module" and isinstance(modules[u.target], NORM_LAYERS) for u in users):
            names.append(f"{node.target}.weight")
    return names


def _sequential_candidates(model: nn.Module) -> list[str]:
    names = []
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.Sequential):
            continue
        children = list(module.named_children())
        for (name, layer), (_, nxt) in zip(children[:-1], children[1:], strict=True):
            if isinstance(layer, WEIGHT_LAYERS) and layer.bias is None and isinstance(nxt, NORM_LAYERS):
                names.append(f"{prefix + '.' if prefix else ''}{name}.weight")
    return names


@torch.no_grad()
def check_scale_invariance(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor],
                           names: Iterable[str] | None = None,
                           scales: tuple[float, ...] = (0.5, 2.0)) -> dict[str, float]:
    """Largest relative change of the output when one parameter is multiplied by each of ``scales``.

    The model's parameters and buffers are restored afterwards (a train-mode forward updates BN buffers).

    Args:
        model: the network (keep it in the mode in which invariance should hold: train mode for BatchNorm).
        forward: ``forward(model) -> output tensor`` on a fixed probe batch.
        names: parameters to test (default: all).
        scales: multipliers to try.

    Returns:
        ``{name: max_c ||f(c w) - f(w)|| / ||f(w)||}``; ~1e-7 (float32) means exactly invariant.
    """
    params = dict(model.named_parameters())
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    base = forward(model).double()
    deviations = {}
    try:
        for name in names if names is not None else params:
            worst = 0.0
            for c in scales:
                params[name].mul_(c)
                out = forward(model).double()
                params[name].copy_(saved[name])
                worst = max(worst, float((out - base).norm() / base.norm().clamp_min(1e-300)))
            deviations[name] = worst
    finally:
        model.load_state_dict(saved)
    return deviations


def scale_invariant_parameters(model: nn.Module, forward: Callable[[nn.Module], torch.Tensor],
                               rtol: float = 1e-3) -> list[str]:
    """Structural candidates (:func:`find_scale_invariant`) confirmed numerically within ``rtol``.

    Args:
        model: the network.
        forward: ``forward(model) -> output`` on a probe batch.
        rtol: largest relative output change accepted as invariant (a norm layer's eps makes invariance
            approximate, to about eps / Var of its input; 1e-3 accepts BatchNorm's default 1e-5 in float32).

    Returns:
        Names of parameters that are scale-invariant by structure and by measurement.
    """
    candidates = find_scale_invariant(model)
    deviations = check_scale_invariance(model, forward, candidates)
    return [name for name in candidates if deviations[name] <= rtol]
