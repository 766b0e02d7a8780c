"""Evaluating a loss at perturbed weights ``theta + sum_i c_i z_i`` without changing the weights.

The reference MeZO writes ``+eps*z``, ``-2eps*z`` and ``+eps*z`` into the weights; in floating point the
round trip does not give the weights back (in bf16/fp16 about half of the elements drift). Here the weights
are never modified to evaluate a perturbed loss:

* ``forward`` mode: while the closure runs, global module hooks give every module that owns a trainable
  parameter a *perturbed copy* of it for the duration of that module's forward (``module._parameters`` is
  swapped, then swapped back). Only one module's copies exist at a time, so the extra memory is one module's
  parameters, not a copy of the model. Two layers avoid even that: a plain ``nn.Embedding`` adds the noise
  of the rows the batch gathers to its output, and a plain ``nn.Linear`` whose weight exceeds one noise
  chunk and its own output (an LM head at a few positions) is computed block of output rows by block of
  output rows from perturbed row blocks.
* ``inplace`` mode, for tensors no module owns (a bare ``requires_grad`` tensor in a closure): the tensor is
  backed up, perturbed in place and copied back, which is exact too but costs a copy of those tensors.

A perturbation is a list of ``(direction_key, coefficient)`` terms; the noise of parameter ``p`` under a
direction is ``z = noise(derive_key(direction_key, p_id), offset)`` (see :mod:`hdopt.zo.noise`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hdopt.zo.directions import Directions, as_directions
from hdopt.zo.noise import NoiseGenerator, chunks, derive_key
from hdopt.zo.rounding import HALF_DTYPES

Terms = Sequence[tuple[int, float]]  # (direction key, coefficient)


@dataclass(eq=False)
class ParamSlot:
    """A trainable tensor and the stable identity its noise is keyed by."""

    tensor: torch.Tensor
    ident: int

    def key(self, direction_key: int) -> int:
        return derive_key(direction_key, self.ident)


def perturbed_copy(
    slot: ParamSlot,
    terms: Terms,
    directions: Directions,
    scale: float = 1.0,
    shrink: float = 1.0,
    start: int = 0,
    length: int | None = None,
) -> torch.Tensor:
    """``shrink*theta + sum_i scale*c_i*z_i`` on elements ``[start, start+length)`` (default: all, reshaped).

    Half-precision tensors are accumulated in float32 and rounded once. For float32/float64 tensors the
    operations are the ones the SGD update performs, so a candidate evaluated here is bitwise the tensor the
    update would write.
    """
    src = slot.tensor.detach()
    whole = length is None
    length = src.numel() - start if whole else length
    flat_src = src.reshape(-1)[start : start + length]
    out = torch.empty(length, dtype=src.dtype, device=src.device)
    keys = [(slot.key(direction), coef * scale) for direction, coef in terms]
    for offset, size in chunks(length, directions.chunk):
        piece = out[offset : offset + size]
        acc = torch.empty(size, device=src.device) if src.dtype in HALF_DTYPES else piece
        source = flat_src[offset : offset + size]
        if shrink != 1.0:
            torch.mul(source, shrink, out=acc)
            source = acc
        for key, coef in keys:  # the first term reads the source, later ones accumulate
            for at, z in directions.pieces(slot, key, start + offset, size):  # used while still in the cache
                part = slice(at, at + z.numel())
                torch.add(source[part], z, alpha=coef, out=acc[part])
            source = acc
        if source is not acc:
            acc.copy_(source)
        if acc is not piece:
            piece.copy_(acc)
    return out.view(src.shape) if whole else out


def _is_plain_linear(module: nn.Module) -> bool:
    return type(module).forward is nn.Linear.forward


def _gathers_rows(module: nn.Module, name: str) -> bool:
    """True for the weight of a plain nn.Embedding, whose output is exactly ``weight[ids]``."""
    return (
        name == "weight"
        and type(module).forward is nn.Embedding.forward
        and getattr(module, "max_norm", None) is None
    )


class Perturbation:
    """Context manager: inside it, forward passes see ``theta + sum_i c_i z_i`` for the given slots.

    Args:
        slots: the trainable tensors, keyed by ``id(tensor)``.
        terms: ``(direction_key, coefficient)`` pairs; empty means the unperturbed weights.
        directions: where directions come from (:class:`~hdopt.zo.directions.Directions`); a bare
            :class:`~hdopt.zo.noise.NoiseGenerator` means i.i.d. noise.
        inplace_ids: ids of slots perturbed in place (backed up, restored exactly) instead of at forward time.
        factors: optional per-slot ``(scale, shrink)``: slot ``p`` sees ``shrink*theta + sum_i scale*c_i*z_i``
            (used to evaluate candidate updates with per-group learning rates and weight decay).

    After exit, :attr:`seen` holds the ids of slots that a module forward perturbed.
    """

    def __init__(
        self,
        slots: dict[int, ParamSlot],
        terms: Terms,
        directions: Directions | NoiseGenerator,
        inplace_ids: frozenset[int] = frozenset(),
        factors: dict[int, tuple[float, float]] | None = None,
    ):
        self.slots = slots
        self.factors = factors or {}
        self.terms = [(int(k), float(c)) for k, c in terms if c != 0.0]
        self.active = bool(self.terms) or any(shrink != 1.0 for _, shrink in self.factors.values())
        self.directions = as_directions(directions)
        self.inplace_ids = inplace_ids
        self.seen: set[int] = set()
        # id(module) -> (module, stack of frames); a frame lists the (name, original) swapped by one call
        self._swapped: dict[int, tuple[nn.Module, list[list[tuple[str, torch.Tensor]]]]] = {}
        # id(module) -> stack of (weight slot, bias to use) for large linear layers computed in row blocks
        self._blocked: dict[int, list[tuple[ParamSlot, torch.Tensor | None]]] = {}
        self._backups: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._handles: list = []

    # -- module hooks (forward mode) --------------------------------------------------------------
    def _pre_hook(self, module: nn.Module, args) -> None:
        if self._defer_large_linear(module, args):
            return
        frame = []
        for name, param in list(module._parameters.items()):
            slot = self.slots.get(id(param)) if param is not None else None
            if slot is None or id(param) in self.inplace_ids:
                continue
            self.seen.add(id(param))
            if _gathers_rows(module, name):
                continue  # handled on the output in _post_hook
            module._parameters[name] = self._copy(slot)
            frame.append((name, param))
        self._swapped.setdefault(id(module), (module, []))[1].append(frame)

    def _defer_large_linear(self, module: nn.Module, args) -> bool:
        """For a plain Linear whose trainable weight is larger than both a noise chunk and the layer's output
        (an LM head applied at a few positions): make its own forward trivial (a 0-row weight) and compute
        the perturbed output in row blocks in the post-hook. When the output is at least as large as the
        weight (full logits), a whole perturbed copy adds less than the output itself and one GEMM is
        faster, so the generic path is used."""
        weight = module._parameters.get("weight")
        slot = self.slots.get(id(weight)) if weight is not None else None
        if (
            slot is None
            or id(weight) in self.inplace_ids
            or not _is_plain_linear(module)
            or weight.numel() <= self.directions.chunk
            or not args
            or args[0].numel() // max(1, args[0].shape[-1]) * weight.shape[0] >= weight.numel()
        ):
            return False
        bias = module._parameters.get("bias")
        bias_slot = self.slots.get(id(bias)) if bias is not None else None
        if bias_slot is not None and id(bias) not in self.inplace_ids:
            bias_value = self._copy(bias_slot)
            self.seen.add(id(bias))
        else:
            bias_value = None if bias is None else bias.detach()
        self.seen.add(id(weight))
        frame = [("weight", weight), ("bias", bias)]
        module._parameters["weight"] = weight.detach().new_empty((0, weight.shape[1]))
        module._parameters["bias"] = None
        self._swapped.setdefault(id(module), (module, []))[1].append(frame)
        self._blocked.setdefault(id(module), []).append((slot, bias_value))
        return True

    def _blocked_linear(self, slot: ParamSlot, bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
        """``x @ W'^T + b'`` with the perturbed weight ``W'`` built one block of output rows at a time."""
        weight = slot.tensor
        out_features, in_features = weight.shape
        scale, shrink = self.factors.get(id(weight), (1.0, 1.0))
        out = x.new_empty((*x.shape[:-1], out_features))
        flat_x, flat_out = x.reshape(-1, in_features), out.view(-1, out_features)
        rows = max(1, self.directions.chunk // in_features)
        for first in range(0, out_features, rows):
            last = min(out_features, first + rows)
            block = perturbed_copy(
                slot,
                self.terms,
                self.directions,
                scale,
                shrink,
                first * in_features,
                (last - first) * in_features,
            ).view(last - first, in_features)
            # the GEMM writes its column block of the output in place (BLAS leading dimension), no copy
            target = flat_out[:, first:last]
            if bias is None:
                torch.mm(flat_x, block.t(), out=target)
            else:
                torch.addmm(bias[first:last], flat_x, block.t(), out=target)
        return out

    def _post_hook(self, module: nn.Module, args, output):
        entry = self._swapped.get(id(module))
        if entry and entry[1]:
            for name, param in entry[1].pop():
                module._parameters[name] = param
        blocked = self._blocked.get(id(module))
        if blocked:
            return self._blocked_linear(*blocked.pop(), args[0])
        weight = module._parameters.get("weight")
        if (
            weight is not None
            and id(weight) in self.slots
            and id(weight) not in self.inplace_ids
            and _gathers_rows(module, "weight")
        ):
            return self._add_row_noise(self.slots[id(weight)], args[0], output)
        return None

    def _copy(self, slot: ParamSlot) -> torch.Tensor:
        scale, shrink = self.factors.get(id(slot.tensor), (1.0, 1.0))
        return perturbed_copy(slot, self.terms, self.directions, scale, shrink)

    def _add_row_noise(self, slot: ParamSlot, ids: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
        scale, shrink = self.factors.get(id(slot.tensor), (1.0, 1.0))
        width = output.shape[-1]
        acc = output.float() if output.dtype in HALF_DTYPES else output.clone()
        if shrink != 1.0:
            acc.mul_(shrink)
        offsets = ids.reshape(-1).to(torch.int64) * width
        for direction, coef in self.terms:
            rows = self.directions.rows(slot, slot.key(direction), offsets, width).view_as(acc)
            acc.add_(rows, alpha=coef * scale)
        return acc.to(output.dtype)

    # -- context protocol -------------------------------------------------------------------------
    def __enter__(self) -> Perturbation:
        if not self.active:
            return self
        for ident in self.inplace_ids:
            self._perturb_inplace(self.slots[ident])
        if len(self.inplace_ids) < len(self.slots):
            self._handles = [
                nn.modules.module.register_module_forward_pre_hook(self._pre_hook),
                nn.modules.module.register_module_forward_hook(self._post_hook),
            ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._restore_swapped()
        for tensor, backup in self._backups:
            tensor.copy_(backup)
        self._backups = []

    def _perturb_inplace(self, slot: ParamSlot) -> None:
        tensor = slot.tensor.detach()
        self._backups.append((tensor, tensor.clone()))
        tensor.copy_(self._copy(slot))
        self.seen.add(id(slot.tensor))

    def _restore_swapped(self) -> None:
        """Undo swaps left by a forward that raised before its post-hook ran."""
        for module, frames in self._swapped.values():
            for frame in reversed(frames):
                for name, param in frame:
                    module._parameters[name] = param
        self._swapped.clear()
