"""Node perturbation: a forward-only gradient estimate for the last block's readout maps.

For a linear map ``y = W x + b`` applied at the read positions u (:mod:`hdopt.lm.readout`), the loss
gradient is ``dL/dW = sum_u delta_u x_u^T`` and ``dL/db = sum_u delta_u``, where ``delta_u = dL/dy_u``.
Weight perturbation (MeZO) estimates ``dL/dW`` from the loss change along a random direction in the space of
W (d_out x d_in numbers); node perturbation perturbs the map's *outputs* instead (d_out numbers a
position) and forms the weight gradient from the estimated ``delta`` and the inputs ``x``, which the
forward pass has anyway. A step:

    y_u <- y_u + s * eps * v_{n,u}     for directions n = 1..N, s = +1 and -1 (central) or +1 (one-sided)
    c_{n,e} = (L_e(+) - L_e(-)) / (2 eps)      (one-sided: (L_e(+) - L_e) / eps), per example e
    delta_u ~ (1/N) sum_n c_{n,e(u)} v_{n,u}  (e(u): the example position u belongs to)
    g_W = (1/E) sum_u delta_u x_u^T,  g_b = (1/E) sum_u delta_u

with ``v`` Gaussian (or Rademacher: E[v v^T] = I either way), independent for every map, position and
direction, so each map's estimate is unbiased up to O(eps^2) whichever maps are perturbed together. All
copies run in one forward of the last block at the read positions (``1 + 2N`` copies, central), from the
bottom's cached states. Each example's loss reads only its own positions, so the estimate of ``delta_u``
has the variance of a d_out-dimensional problem per map, not d_out x d_in as for weight perturbation.

References: Flower & Jabri, "Summed weight neuron perturbation: an O(N) improvement over weight
perturbation", NeurIPS 1992 (node perturbation); Ren, Kornblith, Liao & Hinton, "Scaling forward gradient
with local losses", ICLR 2023 (activity-perturbed forward gradients).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from hdopt.lm.readout import ReadPositions, replicated_losses
from hdopt.lm.scoring import OptionBatch
from hdopt.lm.top_blocks import TopBlocks
from hdopt.zo.noise import GAUSSIAN, RADEMACHER

CENTRAL, ONE_SIDED = "central", "one-sided"


def check_settings(directions: int, eps: float, noise: str, estimator: str) -> None:
    """Raise ``ValueError`` for a node-perturbation setting out of range (N, eps, noise, estimator)."""
    if noise not in (GAUSSIAN, RADEMACHER):
        raise ValueError(f"noise must be {GAUSSIAN} or {RADEMACHER}, got {noise!r}")
    if estimator not in (CENTRAL, ONE_SIDED):
        raise ValueError(f"estimator must be {CENTRAL} or {ONE_SIDED}, got {estimator!r}")
    if directions < 1 or not eps > 0:
        raise ValueError(f"need directions >= 1 and eps > 0, got {directions} and {eps}")


@dataclass(frozen=True)
class Estimate:
    """One micro-batch's estimate: the unperturbed loss (mean over labelled examples) and the gradient of
    every trainable parameter of the readout maps (``name -> tensor``, as the model names them)."""

    loss: float
    grads: dict[str, torch.Tensor]


class NodePerturbation:
    """Estimates the readout maps' gradients from forward passes (see the module docstring).

    Args:
        blocks: the model split with K = 1, its fast path enabled (:meth:`TopBlocks.check`).
        modules: the readout maps by module name (:func:`hdopt.lm.readout.readout_modules`).
        directions: N, perturbation directions a step.
        eps: the perturbation's scale, in the units of the maps' outputs.
        noise: ``gaussian`` or ``rademacher``.
        estimator: ``central`` (2N perturbed copies) or ``one-sided`` (N, against the unperturbed loss).
    """

    def __init__(self, blocks: TopBlocks, modules: dict[str, nn.Linear], directions: int, eps: float,
                 noise: str = GAUSSIAN, estimator: str = CENTRAL):  # fmt: skip
        check_settings(directions, eps, noise, estimator)
        self.blocks, self.modules = blocks, modules
        self.directions, self.eps, self.noise, self.estimator = directions, eps, noise, estimator

    @property
    def copies(self) -> int:
        """Copies of the read positions one estimate evaluates: the unperturbed one and the perturbed."""
        return 1 + self.directions * (2 if self.estimator == CENTRAL else 1)

    def _directions(self, generator: torch.Generator, positions: int, module: nn.Linear) -> torch.Tensor:
        shape = (self.directions, positions, module.out_features)
        w = module.weight
        if self.noise == GAUSSIAN:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(w.device, w.dtype)
        signs = torch.randint(0, 2, shape, generator=generator, dtype=torch.int8)
        return (signs * 2 - 1).to(w.device, w.dtype)

    @contextlib.contextmanager
    def _perturbed(self, offsets: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor],
                   positions: int) -> Iterator[None]:  # fmt: skip
        """Add ``offsets[name]`` to each map's output and keep its unperturbed input rows in ``inputs``."""

        def hook(name: str):
            def add(module, args, out):
                inputs[name] = args[0][:positions].detach()
                return out + offsets[name]

            return add

        handles = [m.register_forward_hook(hook(n)) for n, m in self.modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    @torch.no_grad()
    def estimate(self, bottom: torch.Tensor, batch: OptionBatch, key: int) -> Estimate:
        """The estimate on one micro-batch (``bottom``: its cached states) with the directions of ``key``."""
        where = ReadPositions.of(batch)
        u, n = len(where), self.directions
        generator = torch.Generator().manual_seed(key & (2**63 - 1))
        noise = {name: self._directions(generator, u, m) for name, m in self.modules.items()}
        signs = (1.0, -1.0) if self.estimator == CENTRAL else (1.0,)
        offsets = {name: torch.cat([v.new_zeros(1, *v.shape[1:])] + [s * self.eps * v for s in signs])
                   .reshape(-1, v.shape[-1]) for name, v in noise.items()}  # fmt: skip
        inputs: dict[str, torch.Tensor] = {}
        with self._perturbed(offsets, inputs, u):
            losses = replicated_losses(self.blocks, bottom, batch, where, self.copies)  # [copies, E]
        if self.estimator == CENTRAL:
            slopes = (losses[1 : 1 + n] - losses[1 + n :]) / (2 * self.eps)  # [N, E]
        else:
            slopes = (losses[1:] - losses[:1]) / self.eps
        labelled = (batch.labels != -100).sum().clamp_min(1)
        at_positions = slopes[:, where.example]  # [N, U]
        grads = {}
        for name, module in self.modules.items():
            delta = (at_positions[..., None].to(noise[name].dtype) * noise[name]).mean(0)  # [U, out]
            grads[f"{name}.weight"] = (delta.T @ inputs[name]).div_(labelled)
            if module.bias is not None:
                grads[f"{name}.bias"] = delta.sum(0).div_(labelled)
        return Estimate(float(losses[0].sum() / labelled), grads)
