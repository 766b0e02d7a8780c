"""HiZOO: zeroth-order SGD preconditioned by a diagonal Hessian estimated from the same loss evaluations.

Zhao, Dang, Ye, Dai, Qian, Tsang, "Second-Order Fine-Tuning without Pain for LLMs: A Hessian Informed
Zeroth-Order Optimizer", ICLR 2025 (arXiv:2402.15173); official code github.com/Yanjun-Zhao/HiZOO.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from hdopt.zo.base import Closure, Pending, ZOOptimizer, state_dtype
from hdopt.zo.directions import Directions
from hdopt.zo.noise import NoiseGenerator
from hdopt.zo.perturb import ParamSlot
from hdopt.zo.trajectory import UpdateRecord

__all__ = ["HiZOO", "PreconditionedDirections"]


class PreconditionedDirections(Directions):
    """Directions scaled by a diagonal: ``z / sqrt(D)`` elementwise, ``D`` the slot's Hessian estimate.

    ``diagonal(slot)`` returns the flat ``D`` of the slot's tensor (float32; float64 for float64 parameters);
    the values are in ``D``'s dtype. Every path (pieces, chunks, embedding rows) divides the same noise by the
    same ``D`` elementwise, so a direction is the same tensor wherever it is read.
    """

    def __init__(self, generator: NoiseGenerator, diagonal: Callable[[ParamSlot], torch.Tensor]):
        super().__init__(generator)
        self.diagonal = diagonal

    def pieces(
        self, slot: ParamSlot, key: int, start: int, length: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        d = self.diagonal(slot)
        for at, z in self.generator.pieces(key, start, length):
            yield at, z.to(d.dtype).div_(d[start + at : start + at + z.numel()].sqrt())

    def generate(self, slot: ParamSlot, key: int, start: int, length: int) -> torch.Tensor:
        d = self.diagonal(slot)[start : start + length]
        return self.generator.generate(key, start, length).to(d.dtype).div_(d.sqrt())

    def rows(self, slot: ParamSlot, key: int, offsets: torch.Tensor, width: int) -> torch.Tensor:
        d = self.diagonal(slot)
        index = offsets.to(torch.int64).reshape(-1, 1) + torch.arange(width, device=offsets.device)
        return self.generator.rows(key, offsets, width).to(d.dtype).div_(d[index].sqrt())


class HiZOO(ZOOptimizer):
    """HiZOO: MeZO with perturbation and step preconditioned by a diagonal Hessian estimate ``D``.

    With ``D`` (``Sigma^{-1}`` in the paper: the diagonal Hessian estimate, initialized to ones), Gaussian
    ``z`` and perturbation scale ``eps``, one step (q = 1, the paper's) is::

        l0 = L(theta),  l+ = L(theta + eps D^{-1/2} z),  l- = L(theta - eps D^{-1/2} z)    # 3 forwards
        h  = (l+ + l- - 2 l0) / (2 eps^2)                                                # the record's extra
        D  <- (1 - alpha) D + alpha |h| D z^2            = D (1 - alpha + alpha |h| z^2)
        theta <- theta (1 - lr wd) - lr (l+ - l-)/(2 eps) z / sqrt(D)                    # the updated D

    (``alpha``: ``hessian_smooth``). With q > 1 directions the Hessian term and the step are averaged over the
    directions (``alpha/q sum_i |h_i| z_i^2``, ``(1/q) sum_i g_i z_i / sqrt(D)``): 2q + 1 forwards a step.

    What was implemented, and from where: the rule of the official code (``trainer.py``,
    ``zo_Hessian_step_update``: ``Hessian_matrix`` is ``D``, ``Hessian_smooth`` is ``alpha``; the
    perturbation divides ``z`` by ``sqrt(D)``, the step uses ``D`` after its update); ``D`` is the diagonal
    Hessian estimate (the paper's ``Sigma^{-1}``). The body of the paper could not be read in this session;
    a published summary says it proves its diagonal Hessian estimate unbiased, which the Gaussian-smoothing
    form ``h (z^2 - 1) D`` is (its mean is ``diag(H)`` on a quadratic). The code drops the ``-1`` and takes
    ``|h|``, which keeps ``D`` positive (the perturbation needs ``D^{-1/2}``) at the price of a bias: on a
    quadratic of Hessian ``H``, ``E[|h| D z^2] = diag(H) + (D/2) tr(D^{-1/2} H D^{-1/2})`` for
    positive-definite ``H``, so for a diagonal ``H`` in d dimensions the mean update's fixed point is
    ``(1 + d/2) diag(H)``: the relative curvatures are right and the common factor only rescales ``lr``. The
    code's rule is followed (it produced the paper's results and cannot make ``D`` negative); the tests check
    that one step's estimate has the mean above.
    Rademacher directions are refused: with ``z^2 = 1`` the estimate carries no per-coordinate information.

    The reference's fourth forward (the loss after the update, for logging) is not made: the reported loss is
    ``l0``. Weight decay follows hdopt's convention (1-D tensors skipped unless ``decay_1d``); the reference
    decays every tensor. A group whose ``lr`` is 0 at a step is left untouched, ``D`` included (the base
    contract); the reference updates ``D`` even then.

    State: ``D`` is one buffer the size of the trainable parameters (``state[p]["hessian"]``, float32;
    float64 for float64 parameters); every other temporary is chunk-sized. For adapters, prefixes or a top
    block, ``D`` is small and peak memory stays near inference; for full fine-tuning ``D`` costs as much as
    the (float32) weights themselves, and peak memory exceeds the 1.1x of inference of the other rules
    (docs/zo.md gives the measurement).

    The record of a step holds the q projected gradients ``g_i = (l+_i - l-_i)/(2 eps_1)``, the q curvatures
    ``h_i`` (signed) and each group's ``alpha``: ``D``'s update is a function of them, so :func:`replay`
    rebuilds ``D`` and the weights bitwise. Data parallel: the raw losses ``l0, l+_i, l-_i`` are reduced
    (kind ``"losses"``) and ``g_i``, ``h_i`` computed from them, so every worker updates the same ``D``.
    Per-group ``eps``: group ``g`` is perturbed by ``eps_g D^{-1/2} z``, stepped by ``eps_1/eps_g`` times
    ``g_i`` and its Hessian term uses ``|h_i| (eps_1/eps_g)^2`` (exact for one group).

    Paper defaults (:attr:`paper_defaults`): lr 1e-6, eps 1e-3, ``hessian_smooth`` 1e-8, q = 1, Gaussian
    directions, batch 16, constant schedule: the official README's example command (OPT-13B); the code's
    script defaults to ``alpha = 0`` (``constant0``), which is MeZO.

    Args:
        hessian_smooth: ``alpha`` in ``[0, 1]``, the weight of each step's Hessian estimate (per group).
    """

    paper_defaults = {
        "lr": 1e-6, "eps": 1e-3, "q": 1, "noise": "gaussian", "estimator": "central", "hessian_smooth": 1e-8,
    }  # fmt: skip

    def __init__(
        self,
        params,
        lr: float = 1e-6,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        hessian_smooth: float = 1e-8,
        estimator: str = "central",
        noise: str = "gaussian",
        **kwargs,
    ):
        if estimator != "central":
            raise ValueError(
                f"HiZOO evaluates L(theta), L(theta + eps D^-1/2 z) and L(theta - eps D^-1/2 z) (the central "
                f"difference and the second difference), got estimator={estimator!r}: use estimator='central'"
            )
        if noise != "gaussian":
            raise ValueError(
                f"HiZOO's diagonal Hessian estimate weights each coordinate by z^2, which is 1 for every "
                f"Rademacher direction, got noise={noise!r}: use noise='gaussian'"
            )
        super().__init__(params, lr, eps, weight_decay, estimator=estimator, noise=noise,
                         hessian_smooth=hessian_smooth, **kwargs)  # fmt: skip
        self._hessian_terms: dict[int, tuple[float, list[float]]] = {}  # per group, set by before_update

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        alpha = self.param_groups[-1]["hessian_smooth"]
        if not (isinstance(alpha, (int, float)) and not isinstance(alpha, bool) and 0.0 <= alpha <= 1.0):
            raise ValueError(f"hessian_smooth (alpha) must be a number in [0, 1], got {alpha!r}")
        # D now, not amid a forward's activations: a fragmented heap kept ~40% of D more resident on SmolLM2
        for p in self.param_groups[-1]["params"]:
            self.hessian(p)

    @property
    def record_extras(self) -> int:  # type: ignore[override]
        """The q curvatures ``h_i`` and each group's ``alpha``."""
        return self.q + len(self.param_groups)

    def forwards_per_step(self, micro_batches: int = 1) -> int:
        return (2 * self.q + 1) * micro_batches

    # -- directions: z / sqrt(D) -------------------------------------------------------------------------
    def hessian(self, p: torch.Tensor) -> torch.Tensor:
        """The flat diagonal Hessian estimate ``D`` of ``p`` (ones when its group is added)."""
        state = self.state[p]
        if "hessian" not in state:
            state["hessian"] = torch.ones(p.numel(), dtype=state_dtype(p), device=p.device)
        return state["hessian"]

    def make_directions(self, generator: NoiseGenerator) -> Directions:
        return PreconditionedDirections(generator, lambda slot: self.hessian(slot.tensor))

    def init_state(self, p, state: dict, group: dict) -> None:
        self.hessian(p)

    # -- estimate: l0, then l+ and l- per direction -----------------------------------------------------
    @torch.no_grad()
    def estimate(self, closure: Closure) -> float:
        """Add one micro-batch's losses ``l0, l+_1, l-_1, ...`` for the current step; returns ``l0``."""
        if closure is None:
            raise TypeError("estimate() needs a closure that returns the loss")
        keys = self.direction_keys(self.step_key())
        base = self.evaluate(closure, [], "the unperturbed weights")
        losses, plus_factors, minus_factors = [base], self.eps_factors(1.0), self.eps_factors(-1.0)
        for i, key in enumerate(keys):
            losses.append(self.evaluate(closure, [(key, 1.0)], f"+eps direction {i}", plus_factors))
            losses.append(self.evaluate(closure, [(key, 1.0)], f"-eps direction {i}", minus_factors))
        eps = self.param_groups[0]["eps"]
        grads = [(plus - minus) / (2 * eps) for plus, minus in zip(losses[1::2], losses[2::2], strict=True)]
        self._accumulate(grads, losses, base)
        return base

    def projected_gradients(self, pending: Pending) -> list[float]:
        """``g_i = (l+_i - l-_i)/(2 eps)`` from the reduced losses; the curvatures ``h_i`` go to
        ``pending.extras`` (the record's extras)."""
        base, *rest = self.reduced_losses(pending)
        eps = self.param_groups[0]["eps"]
        plus, minus = rest[0::2], rest[1::2]
        pending.extras = [(p + m - 2 * base) / (2 * eps * eps) for p, m in zip(plus, minus, strict=True)]
        return [(p - m) / (2 * eps) for p, m in zip(plus, minus, strict=True)]

    def record_extras_of(self, pending: Pending) -> list[float]:
        return [*pending.extras, *(float(g["hessian_smooth"]) for g in self.param_groups)]

    # -- update: D, then theta with the updated D -------------------------------------------------------
    def before_update(self, record: UpdateRecord) -> None:
        """Each group's Hessian weights ``alpha_g/q |h_i| (eps_1/eps_g)^2`` this step (from the record)."""
        curvatures, alphas = record.extras[: self.q], record.extras[self.q :]
        eps = record.eps or (self.param_groups[0]["eps"],) * len(self.param_groups)
        self._hessian_terms = {
            id(group): (alpha, [alpha / self.q * abs(h) * (eps[0] / e) ** 2 for h in curvatures])
            for group, alpha, e in zip(self.param_groups, alphas, eps, strict=True)
        }

    def update_param(self, p, slot, terms, group, lr, directions, record) -> None:
        keys = [slot.key(d) for d in self.direction_keys(record.step_key)]
        coefs = record.group_coefficients(self.q)[self._group_index(group)]
        alpha, weights = self._hessian_terms[id(group)]
        every = [(key, coef, weight) for key, coef, weight in zip(keys, coefs, weights, strict=True)]
        super().update_param(p, slot, (alpha, every), group, lr, directions, record)

    def _group_index(self, group: dict) -> int:
        return next(i for i, g in enumerate(self.param_groups) if g is group)

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        alpha, every = terms
        d = self.hessian(slot.tensor)[start : start + length]
        step = torch.zeros(length, dtype=w32.dtype, device=w32.device)  # sum_i c_i z_i
        gain = torch.full((length,), 1.0 - alpha, dtype=d.dtype, device=d.device)  # 1 - a + sum_i w_i z_i^2
        for key, coef, weight in every:
            for at, z in directions.generator.pieces(key, start, length):  # the raw noise z
                part = slice(at, at + z.numel())
                step[part].add_(z, alpha=coef)
                gain[part].addcmul_(z, z, value=weight)
        d.mul_(gain)
        if wd:
            w32.mul_(1.0 - lr * wd)
        w32.add_(step.div_(d.sqrt()), alpha=-lr)
