"""The small networks the experiments train (shapes in comments: B = batch, D = input dim, H = width, C =
classes).

* :func:`scale_invariant_mlp` — every trainable weight is followed by batch normalization without affine
  parameters, so the network's output is exactly invariant to rescaling any weight matrix (the setting of
  Li & Arora 2020 and Li, Lyu & Arora 2020).
* :func:`tanh_mlp` — a smooth MLP for edge-of-stability runs (twice differentiable, so Hessians are defined).
* :func:`relu_mlp` — a plain MLP for the SDE experiments.
"""

from __future__ import annotations

import torch
from torch import nn


def scale_invariant_mlp(in_dim: int, width: int, num_classes: int, depth: int = 2, eps: float = 1e-5,
                        generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """MLP ``[Linear(no bias) -> BatchNorm(affine=False) -> ReLU] * depth -> Linear(no bias) -> BatchNorm``.

    Batch statistics are always used (``track_running_stats=False``): running averages mix weights of
    different scales over time and would break the exact invariance the weight-decay/exp-lr equivalence relies
    on. The logits are batch-normalized too, which keeps the last layer scale-invariant.

    Args:
        in_dim, width, num_classes: D, H, C.
        depth: number of hidden layers.
        eps: batch-norm epsilon (> 0); invariance is exact up to ``eps / Var`` (1e-30 makes it exact in
        float64).
        generator: seeds the initialization (Kaiming-uniform).
        dtype: parameter dtype.

    Returns:
        The network; input ``(B, D)``, output logits ``(B, C)``.
    """
    dims = [in_dim] + [width] * depth + [num_classes]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers += [nn.Linear(a, b, bias=False, dtype=dtype),
                   nn.BatchNorm1d(b, eps=eps, affine=False, track_running_stats=False, dtype=dtype)]
        if i < depth:
            layers.append(nn.ReLU())
    return _init(nn.Sequential(*layers), generator)


def tanh_mlp(in_dim: int, width: int, out_dim: int, depth: int = 2, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """MLP ``[Linear -> tanh] * depth -> Linear`` with biases; input ``(B, D)``, output ``(B, out_dim)``."""
    return _mlp(in_dim, width, out_dim, depth, nn.Tanh, generator, dtype)


def relu_mlp(in_dim: int, width: int, out_dim: int, depth: int = 2, generator: torch.Generator | None = None,
             dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """MLP ``[Linear -> ReLU] * depth -> Linear`` with biases; input ``(B, D)``, output ``(B, out_dim)``."""
    return _mlp(in_dim, width, out_dim, depth, nn.ReLU, generator, dtype)


def _mlp(in_dim: int, width: int, out_dim: int, depth: int, act: type[nn.Module],
         generator: torch.Generator | None, dtype: torch.dtype) -> nn.Sequential:
    dims = [in_dim] + [width] * depth + [out_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(a, b, dtype=dtype))
        if i < depth:
            layers.append(act())
    return _init(nn.Sequential(*layers), generator)


@torch.no_grad()
def _init(model: nn.Sequential, generator: torch.Generator | None) -> nn.Sequential:
    """PyTorch's default Linear init (uniform(+-1/sqrt(fan_in))), drawn from ``generator`` for
    reproducibility."""
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for module in model:
        if isinstance(module, nn.Linear):
            bound = module.in_features ** -0.5
            module.weight.copy_(torch.rand(module.weight.shape, generator=gen, dtype=module.weight.dtype)
                                * 2 * bound - bound)
            if module.bias is not None:
                module.bias.copy_(torch.rand(module.bias.shape, generator=gen, dtype=module.bias.dtype)
                                  * 2 * bound - bound)
    return model
