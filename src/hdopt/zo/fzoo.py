"""FZOO: the fast zeroth-order optimizer, a normalized-SGD step from N one-sided perturbations.

Dang, Guo, Zhao, Ye, Zheng, Dai, Tsang, "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large Language
Models towards Adam-Scale Speed", ICLR 2026 (arXiv:2506.09034); official code github.com/DKmiyan/FZOO.
"""

from __future__ import annotations

import math

from hdopt.zo.base import Pending
from hdopt.zo.optim import ZOSGD

__all__ = ["FZOO", "normalized_coefficients"]


def normalized_coefficients(base: float, perturbed: list[float]) -> list[float]:
    """FZOO's per-direction coefficients ``(l_i - l_0) / sigma``, ``sigma`` the population standard deviation
    of the perturbed losses ``l_1 .. l_N``; all zero when ``sigma`` is 0 (then the normalized step is
    undefined)."""
    n = len(perturbed)
    mean = math.fsum(perturbed) / n
    sigma = math.sqrt(math.fsum((v - mean) ** 2 for v in perturbed) / n)
    if sigma == 0.0:
        return [0.0] * n
    return [(v - base) / sigma for v in perturbed]


class FZOO(ZOSGD):
    """FZOO: ``theta <- theta (1 - lr wd) - lr/(N sigma) * sum_i (l_i - l_0) u_i``.

    One step evaluates the unperturbed loss ``l_0 = L(theta)`` and ``N`` one-sided perturbed losses
    ``l_i = L(theta + eps u_i)`` along i.i.d. Rademacher directions ``u_i`` (N + 1 forward passes; ``q`` is
    ``N``), then takes the step above, where ``sigma`` is the standard deviation of ``l_1 .. l_N``. Since
    ``l_i - l_0 ~ eps u_i . g`` and ``sigma ~ eps ||g||``, the step is a zeroth-order normalized-SGD step
    ``-lr * (1/N) sum_i (u_i . g / ||g||) u_i``: ``lr`` is the step length per coordinate whatever the scale
    of the loss or of ``eps`` (the paper's normalized-SGD equivalence).

    What was implemented, and from where: the rule of the official code (``trainer.py``, ``zo_step`` /
    ``zo_update``): ``projected_grad_i = (l_i - l_0) / (N * std(l_1..l_N, unbiased=False))`` and
    ``theta -= lr * sum_i projected_grad_i * u_i``, which is the paper's batched one-sided estimate
    ``g_t = 1/(eps N) sum_i (l_i - l_0) u_i`` divided by ``sigma_t`` and multiplied by ``eps`` (equivalently:
    the paper's ``eta`` is this ``lr / eps``). The body of the paper could not be read in this session; a
    published summary of it writes ``theta_{t+1} = theta_t - eta_t g_t / sigma_t`` with ``sigma_t`` the
    sample (N - 1) standard deviation. The code is followed: its ``lr`` scale is the one the paper's runs and
    hyperparameters used (lr 5e-5 with eps 1e-4 would be a step of 0.5 per coordinate under ``eta/sigma``),
    and its population standard deviation. No momentum or adaptive state: peak memory is that of inference.
    With ``sigma = 0`` (all N perturbed losses equal; N = 1 always) the step is undefined: no update is made
    (weight decay still applies), and ``q >= 2`` is required.

    The paper's batched forward (the N perturbed models as one batch, ``ParallelLinear`` in the code) is not
    used: the N perturbed losses are evaluated one after the other at forward-time perturbed weights (the same
    numbers); a step costs N + 1 forward passes (:meth:`forwards_per_step`).

    Data parallel: the step needs the spread of the perturbed losses over the whole batch, so the N + 1 raw
    losses (averaged over micro-batches) go through the ``reduce`` hook (kind ``"losses"``) and the
    coefficients are computed from the reduced values: every worker takes the step one process would take on
    the whole batch (equal shards). Per-group ``eps`` follows the base's convention (group ``g`` is perturbed
    by ``eps_g u_g`` and stepped by ``eps_1/eps_g`` times its coefficient; with one eps, the rule above).

    Paper defaults (:attr:`paper_defaults`): N = 8, Rademacher directions, lr 5e-5, eps 1e-4, batch 16,
    constant schedule: the authors' example command for OPT-13B in the official README (their ``fzoo.sh``
    defaults to lr 1e-5, eps 1e-3); the hyperparameter table of the paper could not be read here.

    Example::

        opt = FZOO(model.named_parameters(), lr=5e-5, eps=1e-4, q=8)
        loss = opt.step(lambda: model(**batch).loss)   # l_0, the unperturbed loss
    """

    paper_defaults = {"lr": 5e-5, "eps": 1e-4, "q": 8, "noise": "rademacher", "estimator": "one-sided"}

    def __init__(
        self,
        params,
        lr: float = 5e-5,
        eps: float = 1e-4,
        weight_decay: float = 0.0,
        *,
        q: int = 8,
        estimator: str = "one-sided",
        noise: str = "rademacher",
        **kwargs,
    ):
        if estimator != "one-sided":
            raise ValueError(
                f"FZOO's rule is one-sided (N perturbed losses against one unperturbed loss), got "
                f"estimator={estimator!r}: use estimator='one-sided'"
            )
        if not isinstance(q, int) or isinstance(q, bool) or q < 2:
            raise ValueError(
                f"FZOO normalizes the step by the standard deviation of q perturbed losses, which needs "
                f"q >= 2 (the paper uses 8), got q={q!r}"
            )
        super().__init__(params, lr, eps, weight_decay, q=q, estimator=estimator, noise=noise, **kwargs)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        if self.param_groups[-1]["momentum"]:
            raise ValueError("FZOO is normalized SGD without momentum (the paper's rule): momentum must be 0")

    def projected_gradients(self, pending: Pending) -> list[float]:
        """``(l_i - l_0) / sigma`` from the step's losses, reduced across workers before the spread is
        taken."""
        base, *perturbed = self.reduced_losses(pending)
        return normalized_coefficients(base, perturbed)
