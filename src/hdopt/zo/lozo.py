"""LOZO and LOZO-M: zeroth-order SGD along low-rank directions ``U V^T`` (Chen et al., ICLR 2025).

Paper: Y. Chen, Y. Zhang, L. Cao, K. Yuan, Z. Wen, "Enhancing Zeroth-order Fine-tuning for Language Models
with Low-rank Structures", ICLR 2025 (arXiv:2410.07698); official code: github.com/optsuite/LOZO.

A weight matrix ``W`` (m x n; a tensor of more dimensions is read as ``shape[0] x the rest``) at step ``t``,
in window ``k = t // nu``, for the directions ``i = 1..q``::

    U_{t,i} ~ N(0, I)  (m x r, fresh every step),     V_k ~ N(0, I)  (n x r, fresh every nu steps)
    g_i = (L(W + eps U_{t,i} V_k^T) - L(W - eps U_{t,i} V_k^T)) / (2 eps)      (the SPSA scalars of base.py)
    LOZO:    W <- W (1 - lr wd) - lr (1/q) sum_i g_i U_{t,i} V_k^T                    (rank <= r)
    LOZO-M:  N_t = beta N~_{t-1} + (1 - beta) (1/q) sum_i g_i U_{t,i}                 (m x r)
             W <- W (1 - lr wd) - lr N_t V_k^T
             N~_{t-1} = N_{t-1} V_{k-1}^T V_k / n on the first step of a window, else N_{t-1}; N_0 = the first
             (1/q) sum_i g_i U_{0,i}

1-D tensors (biases, norm gains) are perturbed and updated along i.i.d. noise ``z`` as in MeZO; under LOZO-M
they keep a full-size average ``m_t = beta m_{t-1} + (1 - beta) ghat_t`` (``m_0 = ghat_0``). Embeddings are
matrices and get low-rank directions, as in the official code. With q > 1 the directions share ``V_k``, so the
update keeps rank <= r.

Where the official code and this class differ (the paper's rule is followed):

* the code draws U for the update from a global generator reset to the step's seed; on the first step of a
  window its perturbation sweeps also draw V first, so there the update's U is not the U the losses were
  measured along. Here ``U_{t,i}`` and ``V_k`` are counter-based noise: the perturbed forward, the embedding
  row path and the update read the same factors.
* weight decay follows the project's convention (tensors of >= 2 dimensions; 1-D ones with ``decay_1d``)
  instead of matching parameter names.
* LOZO-M with ``nu = 1``: the code (medium_models) stores the old ``V`` only on the step before a new
  window, a branch that ``nu = 1`` never reaches, so it restarts its momentum from each step's estimate
  (no momentum at all). Here ``N`` is carried over at every window change, ``nu = 1`` included.

Kept from the code: the step is ``g U V^T`` with no further factor (the learning rates the paper reports
were tuned with it; an estimator written with a ``1/r`` factor is this one at ``lr / r``), the momentum
starts from the first estimate, and the previous window's momentum is carried over by ``V_{k-1}^T V_k / n``.

Noise layout: ``U_{t,i}`` of tensor ``p`` is the stream ``derive_key(direction_key_i, p)`` read row-major
(``U[a, j]`` at offset ``a r + j``), ``V_k`` the stream ``derive_key(seed, V_TAG, k, p)`` (``V[b, j]`` at
``b r + j``). ``U V^T`` is computed on demand for any element range, chunk by chunk (never more than a chunk
plus one row), with one rounding per product and per sum, so its values do not depend on how the range is cut.

Extra memory: LOZO none but the cached ``V`` of the current and previous window (``sum n r`` floats: 1.2 MB
for SmolLM2-135M at r = 2); LOZO-M adds ``N`` (``sum m r`` float32 over matrices) and the 1-D averages.
Data-parallel: all state is a function of (seed, step, the reduced scalars), so the standard reduce applies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from hdopt.zo.base import state_dtype
from hdopt.zo.directions import Directions
from hdopt.zo.noise import NoiseGenerator, chunks, derive_key
from hdopt.zo.optim import ZOSGD
from hdopt.zo.perturb import ParamSlot

V_TAG = 0x4C4F5A4F  # separates the V streams from the direction streams
_V_WINDOWS_KEPT = 2  # LOZO-M reads the previous window's V when a window starts


def _check_positive_int(name: str, value) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


class LowRankDirections(Directions):
    """Directions ``U V^T`` for tensors of >= 2 dimensions, i.i.d. noise for 1-D ones (see the module doc).

    The optimizer sets :attr:`step` and :attr:`specs` (``id(tensor) -> (rank, interval)``) before each
    evaluation and update (:meth:`configure`); within a step they do not change.
    """

    def __init__(self, generator: NoiseGenerator, seed: int):
        super().__init__(generator)
        self.seed = seed
        self.step = 0
        self.specs: dict[int, tuple[int, int]] = {}
        self._right: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (ident, rank) -> {window: V}

    def configure(self, step: int, seed: int, specs: dict[int, tuple[int, int]]) -> None:
        if seed != self.seed:
            self._right.clear()
        self.step, self.seed, self.specs = step, seed, specs

    # -- the factors ---------------------------------------------------------------------------------
    def layout(self, slot: ParamSlot) -> tuple[int, int, int] | None:
        """``(m, n, r)`` of a tensor perturbed along ``U V^T``; None for 1-D tensors (i.i.d. noise)."""
        tensor = slot.tensor
        if tensor.ndim < 2:
            return None
        m = tensor.shape[0]
        return m, tensor.numel() // m, self.specs[id(tensor)][0]

    def window(self, slot: ParamSlot) -> int:
        """The index ``k`` of the current V: ``step // interval``."""
        return self.step // self.specs[id(slot.tensor)][1]

    def right(self, slot: ParamSlot, window: int | None = None) -> torch.Tensor:
        """``V_k`` (n x r, float32) of the tensor, for window ``k`` (default: the current one)."""
        window = self.window(slot) if window is None else window
        _, n, rank = self.layout(slot)
        cache = self._right.setdefault((slot.ident, rank), {})
        v = cache.get(window)
        if v is None:
            key = derive_key(self.seed, V_TAG, window, slot.ident)
            v = torch.empty(n * rank, device=self.generator.device)
            for start, length in chunks(n * rank, self.chunk):
                v[start : start + length] = self.generator.generate(key, start, length)
            v = cache[window] = v.view(n, rank)
            while len(cache) > _V_WINDOWS_KEPT:
                del cache[min(cache)]
        return v

    def left(self, key: int, start: int, length: int) -> torch.Tensor:
        """Elements ``[start, start+length)`` of ``U`` (row-major) for the parameter key ``key``."""
        return self.generator.generate(key, start, length)

    # -- products ------------------------------------------------------------------------------------
    def _product(self, left: torch.Tensor, right: torch.Tensor, out: torch.Tensor | None = None
                 ) -> torch.Tensor:  # fmt: skip
        """``left @ right^T`` as ``sum_j left[:, j] * right[:, j]`` (one rounding per product and per sum, in
        order, so every element is the same whichever block it is computed in)."""
        rows, cols = left.shape[0], right.shape[0]
        dtype = torch.promote_types(left.dtype, right.dtype)
        if out is None:
            out = self.scratch("product", rows * cols, dtype).view(rows, cols)
        torch.mul(left[:, :1], right[:, 0], out=out)
        if left.shape[1] > 1:
            term = self.scratch("term", rows * cols, dtype).view(rows, cols)
            for j in range(1, left.shape[1]):
                torch.mul(left[:, j : j + 1], right[:, j], out=term)
                out.add_(term)
        return out

    def product_pieces(
        self, slot: ParamSlot, left_rows: Callable[[int, int], torch.Tensor], start: int, length: int,
        window: int | None = None,
    ) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
        """``L V^T`` on flat elements ``[start, start+length)`` as ``(offset - start, values)`` pieces, where
        ``left_rows(row, count)`` gives rows ``row .. row+count-1`` of the m x r factor ``L``."""
        _, n, rank = self.layout(slot)
        v = self.right(slot, window)
        width = max(n, rank)
        pos, end = start, start + length
        while pos < end:
            row, col = divmod(pos, n)
            if col == 0 and width <= self.chunk and end - pos >= n:  # whole rows
                count = min((end - pos) // n, self.chunk // width)
                values = self._product(left_rows(row, count), v)
                size = count * n
            else:  # part of one row
                size = min(n - col, end - pos, self.chunk)
                values = self._product(left_rows(row, 1), v[col : col + size])
            yield pos - start, values.view(-1)
            pos += size

    def _noise_rows(self, key: int, rank: int) -> Callable[[int, int], torch.Tensor]:
        return lambda row, count: self.left(key, row * rank, count * rank).view(count, rank)

    # -- the Directions interface --------------------------------------------------------------------
    def pieces(self, slot: ParamSlot, key: int, start: int, length: int
               ) -> Iterator[tuple[int, torch.Tensor]]:  # fmt: skip
        layout = self.layout(slot)
        if layout is None:
            return super().pieces(slot, key, start, length)
        return self.product_pieces(slot, self._noise_rows(key, layout[2]), start, length)

    def generate(self, slot: ParamSlot, key: int, start: int, length: int) -> torch.Tensor:
        if self.layout(slot) is None:
            return super().generate(slot, key, start, length)
        out = self.scratch("whole", length)
        for at, values in self.pieces(slot, key, start, length):
            out[at : at + values.numel()] = values
        return out

    def rows(self, slot: ParamSlot, key: int, offsets: torch.Tensor, width: int) -> torch.Tensor:
        layout = self.layout(slot)
        if layout is None:
            return super().rows(slot, key, offsets, width)
        _, n, rank = layout
        v = self.right(slot)
        offsets = offsets.to(torch.int64).reshape(-1)
        if width == n and bool((offsets % n == 0).all()):  # whole matrix rows (embedding lookups)
            u = self.generator.rows(key, offsets // n * rank, rank)
            return self._product(u, v, torch.empty(len(offsets), n, device=v.device))
        flat = (offsets.view(-1, 1) + torch.arange(width, device=offsets.device)).view(-1)
        u = self.generator.rows(key, flat // n * rank, rank)  # [elements, r]
        v_at = v[flat % n]
        out = u[:, 0] * v_at[:, 0]
        for j in range(1, rank):
            out.add_(u[:, j] * v_at[:, j])
        return out.view(len(offsets), width)


class LOZO(ZOSGD):
    """LOZO / LOZO-M: ZO-SGD along ``U V^T`` per weight matrix (see :mod:`hdopt.zo.lozo` for the rule).

    Args:
        rank: ``r``, the rank of the directions (per group).
        interval: ``nu``, steps between fresh ``V`` (per group).
        momentum: ``beta``; 0 is LOZO, > 0 is LOZO-M (momentum kept in the m x r factor).
        other arguments: as :class:`~hdopt.zo.base.ZOOptimizer`.

    Example::

        opt = LOZO(model.named_parameters(), lr=1e-7, eps=1e-3, rank=2, interval=50)
        loss = opt.step(lambda: model(**batch).loss)
    """

    # the official code's README (OPT-13B, SST-2): LR=1e-7 EPS=1e-3 RANK=2 STEP_INTERVAL=50; LOZO-M: beta1 0.9
    # in medium_models/lozo.sh (its dataclass default is 0.7)
    paper_defaults = {"lr": 1e-7, "eps": 1e-3, "rank": 2, "interval": 50}

    def __init__(
        self,
        params,
        lr: float = 1e-7,
        eps: float = 1e-3,
        weight_decay: float = 0.0,
        *,
        rank: int = 2,
        interval: int = 50,
        momentum: float = 0.0,
        **kwargs,
    ):
        _check_positive_int("rank", rank)
        _check_positive_int("interval", interval)
        super().__init__(params, lr, eps, weight_decay, momentum=momentum, rank=rank, interval=interval,
                         **kwargs)  # fmt: skip

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _check_positive_int("rank", group["rank"])
        _check_positive_int("interval", group["interval"])
        # LOZO-M's buffers now, not amid a forward's activations (a fragmented heap kept them resident)
        for p in group["params"]:
            self.init_state(p, self.state[p], group)

    def make_directions(self, generator: NoiseGenerator) -> LowRankDirections:
        return LowRankDirections(generator, self.seed)

    def directions(self) -> LowRankDirections:
        source = super().directions()
        specs = {id(p): (g["rank"], g["interval"]) for g in self.param_groups for p in g["params"]}
        source.configure(self.step_count, self.seed, specs)
        # this window's V now, before the step's forwards: allocated amid their activations, the long-lived
        # factors fragmented the heap (LOZO's step peaked at up to 1.25x inference on SmolLM2-135M)
        for slot in self._slots().values():
            if source.layout(slot) is not None:
                source.right(slot)
        return source

    # -- LOZO-M ----------------------------------------------------------------------------------------
    def init_state(self, p, state, group) -> None:
        if not group["momentum"] or "momentum_updates" in state:
            return
        state["momentum_updates"] = 0
        if p.ndim >= 2:
            shape = (p.shape[0], group["rank"])
            state["factor_momentum"] = torch.zeros(shape, dtype=state_dtype(p), device=p.device)
            state["factor_window"] = 0
        else:
            state["momentum_buffer"] = torch.zeros(p.shape, dtype=state_dtype(p), device=p.device)

    def update_param(self, p, slot, terms, group, lr, directions, record) -> None:
        if group["momentum"]:
            state = self.state[p]
            self.init_state(p, state, group)
            self._update_momentum(slot, terms, group["momentum"], directions, state)
        super().update_param(p, slot, terms, group, lr, directions, record)

    def _update_momentum(self, slot, terms, beta: float, directions: LowRankDirections, state: dict) -> None:
        """``N <- beta N~ + (1 - beta) sum_i c_i U_i`` (the first update: ``N = sum_i c_i U_i``); 1-D tensors:
        the same average of ``sum_i c_i z_i``."""
        first = state["momentum_updates"] == 0
        if "factor_momentum" in state:
            target = state["factor_momentum"]
            window = directions.window(slot)
            if not first and state["factor_window"] != window:  # carry N over to the new V
                v_old, v_new = directions.right(slot, state["factor_window"]), directions.right(slot, window)
                carry = (v_old.t() @ v_new).div_(v_new.shape[0]).to(target.dtype)
                target.copy_(target @ carry)
            state["factor_window"] = window
            stream = directions.left
        else:
            target = state["momentum_buffer"]
            stream = lambda key, start, length: directions.generate(slot, key, start, length)  # noqa: E731
        flat = target.view(-1)
        if not first:
            flat.mul_(beta)
        scale = 1.0 if first else 1.0 - beta
        for key, coef in terms:
            for start, length in chunks(flat.numel(), directions.chunk):
                flat[start : start + length].add_(stream(key, start, length), alpha=scale * coef)
        state["momentum_updates"] += 1

    def update_chunk(self, w32, slot, terms, start, length, directions, state, group, lr, wd) -> None:
        if not group["momentum"]:  # LOZO: MeZO's update along the low-rank directions
            super().update_chunk(w32, slot, terms, start, length, directions, state, group, lr, wd)
            return
        if wd:
            w32.mul_(1.0 - lr * wd)
        if "factor_momentum" not in state:
            w32.add_(state["momentum_buffer"].view(-1)[start : start + length], alpha=-lr)
            return
        factor = state["factor_momentum"]
        rows = lambda row, count: factor[row : row + count]  # noqa: E731
        for at, values in directions.product_pieces(slot, rows, start, length):
            w32[at : at + values.numel()].add_(values, alpha=-lr)
