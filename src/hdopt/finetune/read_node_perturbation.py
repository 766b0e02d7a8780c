"""Node perturbation of read-position adapters: their gradient from forward passes of the read path.

The adapters (:mod:`hdopt.lm.read_adapters`) add ``U_l a_l`` with ``a_l = D_l x_l`` at each row's last token
in every block l; the loss depends on ``D`` only through the ``L x r`` numbers ``a`` an example. A step
perturbs them along N random directions ``v`` (Gaussian or Rademacher, independent per example, block and
coordinate) and reads each example's loss change, in one run of the read path (:mod:`hdopt.lm.read_path`)
over ``1 + 2N`` copies of the last tokens (central; ``1 + N`` one-sided):

    c_{n,e} = (L_e(a + eps v_n) - L_e(a - eps v_n)) / (2 eps)
    dL_e/da_{e,l} ~ (1/N) sum_n c_{n,e} v_{n,e,l}
    g_{D_l} = (1/E) sum_e (dL_e/da_{e,l}) x_{e,l}^T

``x`` from the unperturbed copy. The estimate is unbiased up to O(eps^2) and its variance is that of an
``L x r``-dimensional problem an example (SmolLM2, r = 8: 240), against the 3.3M weights a weight
perturbation of one block would move.

Because an example's loss depends on ``D`` only through those ``L x r`` numbers, the gradient is also
within reach exactly: the estimator ``coordinates`` perturbs each of them on its own (one copy a
coordinate, the same for every row) and takes forward differences,

    dL_e/da_{e,l,k} ~ (L_e(a + eps e_{l,k}) - L_e(a)) / eps

with no sampling noise (a bias of O(eps) only), in ``1 + L x r`` copies. A copy that perturbs block l is
the unperturbed copy below l, so it runs from block l on (:func:`hdopt.lm.read_path.read_path_states`'s
``first_layers``): the copies cost ``1 + r (L + 1) / 2`` copies of the whole path (SmolLM2, r = 8: 125).
"""

from __future__ import annotations

import torch
from torch import nn

from hdopt.finetune.node_perturbation import CENTRAL, ONE_SIDED, Estimate, check_settings
from hdopt.lm.read_path import Context, read_path_losses
from hdopt.lm.scoring import OptionBatch
from hdopt.zo.noise import GAUSSIAN

COORDINATES = "coordinates"


class ReadNodePerturbation:
    """Estimates ``d loss / d down`` of a model's read-position adapters (see the module docstring).

    Args:
        model: the causal LM with its adapters attached (``model.read_adapters``).
        name: the adapters' ``down`` parameter's name, as ``model.named_parameters()`` gives it.
        directions: N (``None`` with ``coordinates``, which perturbs every one of the ``L x r`` coordinates);
        eps: the perturbation's scale in the bottleneck's units; noise: ``gaussian`` or ``rademacher`` (not
        used by ``coordinates``); estimator: ``central``, ``one-sided`` or ``coordinates``.
    """

    def __init__(self, model: nn.Module, name: str, directions: int | None, eps: float,
                 noise: str = GAUSSIAN, estimator: str = CENTRAL) -> None:  # fmt: skip
        self.model, self.name = model, name
        self.adapters = model.read_adapters
        layers, rank, _ = self.adapters.down.shape
        if estimator == COORDINATES:
            if directions is not None:
                raise ValueError(f"the coordinates estimator perturbs each of the L x r = {layers * rank} "
                                 f"bottleneck coordinates; it takes no number of directions (got "
                                 f"{directions})")  # fmt: skip
            check_settings(1, eps, GAUSSIAN, ONE_SIDED)  # eps alone: no directions are drawn
            directions = layers * rank
        else:
            check_settings(directions, eps, noise, estimator)
        self.directions, self.eps, self.noise, self.estimator = directions, eps, noise, estimator

    @property
    def copies(self) -> int:
        """Copies of the last tokens one estimate runs: the unperturbed one and the perturbed."""
        return 1 + self.directions * (2 if self.estimator == CENTRAL else 1)

    @property
    def path_copies(self) -> float:
        """What the copies cost, in copies of the whole read path (all L blocks): :attr:`copies`, except
        ``coordinates``, whose copy for block l runs only blocks l..L-1."""
        if self.estimator != COORDINATES:
            return float(self.copies)
        layers = self.adapters.down.shape[0]
        return sum(layers - first for first in self._first_layers()) / layers  # 1 + r (L + 1) / 2

    def _first_layers(self) -> list[int]:
        """``coordinates``: each copy's first perturbed block (the unperturbed copy's 0, then r copies a
        block)."""
        layers, rank, _ = self.adapters.down.shape
        return [0] + [layer for layer in range(layers) for _ in range(rank)]

    def directions_for(self, key: int, rows: int) -> torch.Tensor:
        """The directions [N, S, L, r] of ``key`` (the same for the same key, whatever the device)."""
        generator = torch.Generator().manual_seed(key & (2**63 - 1))
        layers, rank, _ = self.adapters.down.shape
        shape = (self.directions, rows, layers, rank)
        if self.noise == GAUSSIAN:
            v = torch.randn(shape, generator=generator, dtype=torch.float32)
        else:
            v = (torch.randint(0, 2, shape, generator=generator, dtype=torch.int8) * 2 - 1).float()
        return v.to(self.adapters.down.device, self.adapters.down.dtype)

    @torch.no_grad()
    def estimate(self, context: Context, batch: OptionBatch, key: int) -> Estimate:
        """The estimate on one micro-batch (``context``: its cached states) with the directions of ``key``
        (``coordinates``: the same whatever the key)."""
        if self.estimator == COORDINATES:
            return self._coordinates(context, batch)
        v = self.directions_for(key, context.last_ids.shape[0])
        signs = (1.0, -1.0) if self.estimator == CENTRAL else (1.0,)
        offsets = torch.cat([v.new_zeros(1, *v.shape[1:])] + [s * self.eps * v for s in signs])
        inputs: list[torch.Tensor] = []
        losses = read_path_losses(self.model, context, batch, self.copies, offsets, inputs)  # [copies, E]
        n = self.directions
        if self.estimator == CENTRAL:
            slopes = (losses[1 : 1 + n] - losses[1 + n :]) / (2 * self.eps)  # [N, E]
        else:
            slopes = (losses[1:] - losses[:1]) / self.eps
        # a row is an example (one-token options share their example's row): row s has loss slopes[:, s]
        delta = torch.einsum("ns,nslr->slr", slopes.to(v.dtype), v) / n  # [S, L, r]: dL_s/da_s
        return self._estimate(losses, delta, inputs, batch)

    def _coordinates(self, context: Context, batch: OptionBatch) -> Estimate:
        """Forward differences along every bottleneck coordinate (``coordinates``: the module docstring)."""
        rows = context.last_ids.shape[0]
        layers, rank, _ = self.adapters.down.shape
        down = self.adapters.down
        moves = self.eps * torch.eye(layers * rank, dtype=down.dtype, device=down.device)  # copy 1 + l r + k
        offsets = torch.cat([moves.new_zeros(1, layers * rank), moves])  # moves a_{l,k} of every row by eps
        offsets = offsets.view(-1, 1, layers, rank).expand(-1, rows, -1, -1)  # [1 + L r, S, L, r]
        first = self._first_layers()
        inputs: list[torch.Tensor] = []
        losses = read_path_losses(self.model, context, batch, self.copies, offsets, inputs, first)  # [C, E]
        slopes = (losses[1:] - losses[:1]) / self.eps  # [L r, E]: row s is example s
        delta = slopes.to(offsets.dtype).T.reshape(rows, layers, rank)  # [S, L, r]: dL_s/da_s
        return self._estimate(losses, delta, inputs, batch)

    def _estimate(self, losses: torch.Tensor, delta: torch.Tensor, inputs: list[torch.Tensor],
                  batch: OptionBatch) -> Estimate:  # fmt: skip
        """The estimate from the copies' losses [C, E] (the first unperturbed), each example's bottleneck
        gradient ``delta`` [S, L, r] and the blocks' adapter inputs: g_{D_l} = (1/E) sum_e delta_e x_e^T."""
        labelled = (batch.labels != -100).sum().clamp_min(1)
        x = torch.stack(inputs, 1)  # [S, L, H]
        grad = torch.einsum("slr,slh->lrh", delta, x.to(delta.dtype)).div_(labelled)
        return Estimate(float(losses[0].sum() / labelled), {self.name: grad})
