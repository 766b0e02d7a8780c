"""Curvature from Hessian-vector products: Lanczos sharpness, power iteration, Hutchinson trace.

Everything is built on a *matvec* ``v -> H v`` over a flat vector, so the linear algebra can be tested on
explicit matrices and reused on any model:

* :class:`HessianOperator` turns a model, a loss function and one or more batches into a matvec
  (double backward: H v = d/dw <grad L(w), v>); with several batches it averages them weighted by size,
  i.e. the Hessian of the dataset loss.
* :func:`lanczos` — top eigenvalues of a symmetric operator from a Krylov space (full reorthogonalization).
* :func:`power_iteration` — the textbook baseline for the top eigenvalue.
* :func:`hutchinson_trace` — tr(H) ~ mean of z^T H z over Rademacher z (Hutchinson 1989).
* :func:`sharpness` and :func:`hessian_trace` — one-call versions on a model.
* :class:`CurvatureMonitor` — the callback form: sharpness (and optionally the trace) every ``every`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

Matvec = Callable[[torch.Tensor], torch.Tensor]
Batch = tuple[torch.Tensor, torch.Tensor]


class HessianOperator:
    """The Hessian of ``mean over batches of loss_fn(model(x), y)`` w.r.t. the trainable parameters, as a
    matvec.

    Args:
        model: the network (its mode is left as is; BatchNorm in train mode uses batch statistics).
        loss_fn: ``loss_fn(output, target) -> scalar`` (a mean over the batch).
        batches: one ``(x, y)`` batch or a sequence of them; losses are averaged weighted by batch size.
        params: parameters to differentiate (default: all with ``requires_grad``).

    Attributes:
        dim: number of scalar parameters; ``calls``: matvecs performed so far.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 batches: Batch | Sequence[Batch], params: Iterable[torch.Tensor] | None = None):
        self.model, self.loss_fn = model, loss_fn
        self.batches = [batches] if isinstance(batches, tuple) and isinstance(batches[0], torch.Tensor) \
            else list(batches)
        self.params = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
        self.dim = sum(p.numel() for p in self.params)
        self.dtype = self.params[0].dtype
        self.calls = 0
        self._total = sum(len(y) for _, y in self.batches)

    def loss_and_grad(self) -> tuple[float, torch.Tensor]:
        """Dataset loss and its flat gradient (no graph kept)."""
        loss_total, grad_total = 0.0, torch.zeros(self.dim, dtype=self.dtype)
        for x, y in self.batches:
            weight = len(y) / self._total
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params)
            loss_total += weight * loss.item()
            grad_total += weight * _flat(grads)
        return loss_total, grad_total

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        """H v for a flat vector ``v`` of length :attr:`dim`."""
        self.calls += 1
        out = torch.zeros(self.dim, dtype=self.dtype)
        pieces = _unflat(v.to(self.dtype), self.params)
        for x, y in self.batches:
            loss = self.loss_fn(self.model(x), y)
            grads = torch.autograd.grad(loss, self.params, create_graph=True)
            dot = sum((g * p).sum() for g, p in zip(grads, pieces, strict=True))
            hv = torch.autograd.grad(dot, self.params)
            out += (len(y) / self._total) * _flat(hv)
        return out


@dataclass
class EigResult:
    """Top eigenvalues (descending) and the number of matvecs spent; ``history`` holds the estimate per
    step."""

    eigenvalues: list[float]
    matvecs: int
    history: list[float]


def lanczos(matvec: Matvec, dim: int, k: int = 1, iters: int = 20, generator: torch.Generator | None = None,
            dtype: torch.dtype = torch.float64) -> EigResult:
    """Top-``k`` eigenvalues of a symmetric operator by the Lanczos method with full reorthogonalization.

    Builds an orthonormal Krylov basis q_1..q_m (m = ``iters``) with
    ``beta_j q_{j+1} = A q_j - alpha_j q_j - beta_{j-1} q_{j-1}`` (then re-orthogonalized against all q's),
    and returns the largest Ritz values, the eigenvalues of the tridiagonal ``T = tridiag(beta, alpha,
    beta)``. Extreme eigenvalues converge geometrically at a rate governed by sqrt(gap), much faster than
    power iteration's (lambda_2 / lambda_1)^m.

    Args:
        matvec: ``v -> A v`` on flat vectors.
        dim: length of the vectors.
        k: number of top eigenvalues to return.
        iters: Krylov dimension (= matvecs), capped at ``dim``.
        generator: seeds the starting vector.
        dtype: dtype of the basis (float64 keeps orthogonality).

    Returns:
        :class:`EigResult` with the ``k`` largest Ritz values; ``history[j]`` is the top Ritz value after
        j+1 steps.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    iters = min(iters, dim)
    q = torch.randn(dim, generator=gen, dtype=dtype)
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    history: list[float] = []
    for j in range(iters):
        w = matvec(basis[j]).to(dtype)
        if not torch.isfinite(w).all():
            raise FloatingPointError("the operator returned non-finite values (did training diverge?)")
        alphas.append(float(basis[j] @ w))
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)  # full reorthogonalization (twice is enough, Kahan-Parlett)
        w = w - Q.T @ (Q @ w)
        history.append(float(_tridiagonal_eigs(alphas, betas)[-1]))
        beta = float(w.norm())
        if j == iters - 1 or beta < 1e-10 * max(1.0, abs(alphas[-1])):
            break
        betas.append(beta)
        basis.append(w / beta)
    eigs = _tridiagonal_eigs(alphas, betas)
    top = sorted(eigs.tolist(), reverse=True)[:k]
    return EigResult(top, len(alphas), history)


def _tridiagonal_eigs(alphas: list[float], betas: list[float]) -> torch.Tensor:
    m = len(alphas)
    T = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if m > 1:
        off = torch.tensor(betas[:m - 1], dtype=torch.float64)
        T += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T)


def power_iteration(matvec: Matvec, dim: int, iters: int = 100, tol: float = 0.0,
                    generator: torch.Generator | None = None,
                    dtype: torch.dtype = torch.float64) -> EigResult:
    """Largest-magnitude eigenvalue by power iteration: ``v <- A v / ||A v||``, estimate ``v^T A v``.

    Args:
        matvec: ``v -> A v``.
        dim: vector length.
        iters: maximum matvecs.
        tol: stop when the relative change of the estimate falls below ``tol`` (0: run all ``iters``).
        generator: seeds the starting vector.
        dtype: working dtype.

    Returns:
        :class:`EigResult` with one eigenvalue (the Rayleigh quotient) and its per-step history.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    v = torch.randn(dim, generator=gen, dtype=dtype)
    v = v / v.norm()
    history: list[float] = []
    for _ in range(iters):
        w = matvec(v).to(dtype)
        history.append(float(v @ w))
        v = w / w.norm()
        if tol and len(history) > 1 and abs(history[-1] - history[-2]) <= tol * abs(history[-1]):
            break
    return EigResult([history[-1]], len(history), history)


def hutchinson_trace(matvec: Matvec, dim: int, samples: int = 100, generator: torch.Generator | None = None,
                     dtype: torch.dtype = torch.float64) -> tuple[float, float]:
    """Hutchinson's estimator ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with Rademacher ``z_i``.

    Args:
        matvec: ``v -> A v``.
        dim: vector length.
        samples: number m of probe vectors (= matvecs).
        generator: seeds the probes.
        dtype: working dtype.

    Returns:
        ``(estimate, standard_error)``; the error is the sample std of z^T A z over sqrt(m).
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    values = []
    for _ in range(samples):
        z = torch.randint(0, 2, (dim,), generator=gen).to(dtype) * 2 - 1
        values.append(float(z @ matvec(z).to(dtype)))
    vals = torch.tensor(values, dtype=torch.float64)
    err = float(vals.std() / math.sqrt(samples)) if samples > 1 else float("nan")
    return float(vals.mean()), err


def sharpness(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
              batches: Batch | Sequence[Batch], k: int = 1, iters: int = 20, seed: int = 0) -> list[float]:
    """Top-``k`` Hessian eigenvalues of the loss (full batch, or averaged over ``batches``) by
    :func:`lanczos`.

    Args:
        model, loss_fn, batches: as in :class:`HessianOperator`.
        k: number of eigenvalues.
        iters: Lanczos steps (matvecs per batch pass).
        seed: seeds the starting vector.

    Returns:
        The ``k`` largest eigenvalues, descending.
    """
    op = HessianOperator(model, loss_fn, batches)
    return lanczos(op, op.dim, k, iters, torch.Generator().manual_seed(seed)).eigenvalues


def hessian_trace(model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                  batches: Batch | Sequence[Batch], samples: int = 100, seed: int = 0) -> tuple[float, float]:
    """Hutchinson estimate of the trace of the loss Hessian; returns ``(trace, standard_error)``."""
    op = HessianOperator(model, loss_fn, batches)
    return hutchinson_trace(op, op.dim, samples, torch.Generator().manual_seed(seed))


def _flat(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unflat(v: torch.Tensor, like: list[torch.Tensor]) -> list[torch.Tensor]:
    out, i = [], 0
    for p in like:
        out.append(v[i:i + p.numel()].view_as(p))
        i += p.numel()
    return out


class CurvatureMonitor:
    """Callback measuring the loss Hessian during training: call ``monitor(step)`` after each step.

    Every ``every`` steps it records the top-``k`` eigenvalues (Lanczos, ``iters`` HVPs) and, when
    ``trace_samples > 0``, the Hutchinson trace; the model's mode is left as is.

    Args:
        model, loss_fn, batches: as in :class:`HessianOperator` (a fixed probe set: full batch or a list).
        every: measure when ``step % every == 0``.
        k: eigenvalues to keep.
        iters: Lanczos steps.
        trace_samples: Hutchinson probes (0: no trace).
        seed: seeds the start/probe vectors (offset by the step, so each measurement is reproducible).

    Attributes:
        history: list of ``{"step", "sharpness": [k values], "trace", "trace_err"}`` records.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 batches: Batch | Sequence[Batch], every: int = 100, k: int = 1, iters: int = 20,
                 trace_samples: int = 0, seed: int = 0):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.model, self.loss_fn, self.batches = model, loss_fn, batches
        self.every, self.k, self.iters, self.trace_samples, self.seed = every, k, iters, trace_samples, seed
        self.history: list[dict] = []

    def __call__(self, step: int) -> dict | None:
        """Measure if ``step`` is due; returns the new record or None."""
        if step % self.every:
            return None
        op = HessianOperator(self.model, self.loss_fn, self.batches)
        gen = torch.Generator().manual_seed(self.seed + step)
        record: dict = {"step": step, "sharpness": lanczos(op, op.dim, self.k, self.iters, gen).eigenvalues}
        if self.trace_samples:
            record["trace"], record["trace_err"] = hutchinson_trace(op, op.dim, self.trace_samples, gen)
        self.history.append(record)
        return record
