"""Where a perturbation direction comes from: the extension point of the ZO update rules.

A ZO step perturbs parameter ``p`` along ``z_p = direction(p, key)`` for each of its q directions. MeZO's
direction is i.i.d. noise from the counter-based generator (:class:`Directions`); later rules change it:
a diagonal preconditioner scales it (HiZOO), a mask zeroes most of it (Sparse-MeZO), a product of two thin
matrices replaces it (LOZO). A rule supplies its own :class:`Directions` subclass; everything that reads a
direction (the perturbed forward, the embedding row path, the update) reads it through this interface, so a
direction is the same tensor wherever it is used, and the weights it never touches stay bitwise unchanged.

Contract of a subclass: the values for offsets ``[start, start+length)`` of the flattened parameter must
not depend on how the range is cut (pieces, chunks, rows), and must be a pure function of ``(slot, key)``
and state that does not change within a step.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch

from hdopt.zo.noise import NoiseGenerator

if TYPE_CHECKING:
    from hdopt.zo.perturb import ParamSlot


class Directions:
    """I.i.d. directions (MeZO): ``z = noise(key, offset)`` from ``generator`` (Gaussian or Rademacher).

    ``key`` is already the parameter's key (``slot.key(direction_key)``). Views returned by :meth:`pieces`
    and :meth:`generate` are valid until the next call.
    """

    def __init__(self, generator: NoiseGenerator):
        self.generator = generator
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @property
    def chunk(self) -> int:
        """The largest number of elements one call may produce."""
        return self.generator.chunk

    def scratch(self, name: str, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A temporary of ``numel`` elements kept between calls (valid until ``name`` is asked for again): a
        subclass that shapes directions reuses its temporaries, as fresh large allocations page-fault. It is
        allocated once at a chunk's size or more: buffers freed and regrown leave the allocator's heap
        fragmented (peak memory then grows by far more than the buffers)."""
        buf = self._scratch.get((name, dtype))
        if buf is None or buf.numel() < numel:
            size = max(numel, self.chunk)
            buf = self._scratch[(name, dtype)] = torch.empty(size, dtype=dtype, device=self.generator.device)
        return buf[:numel]

    def pieces(
        self, slot: ParamSlot, key: int, start: int, length: int
    ) -> Iterator[tuple[int, torch.Tensor]]:
        """The direction on ``[start, start+length)`` as consecutive ``(offset - start, values)`` pieces."""
        return self.generator.pieces(key, start, length)

    def generate(self, slot: ParamSlot, key: int, start: int, length: int) -> torch.Tensor:
        """The direction on ``[start, start+length)`` in one float32 tensor (``length <= chunk``)."""
        return self.generator.generate(key, start, length)

    def rows(self, slot: ParamSlot, key: int, offsets: torch.Tensor, width: int) -> torch.Tensor:
        """Rows of ``width`` elements starting at each of ``offsets`` (embedding lookups): ``[n, width]``."""
        return self.generator.rows(key, offsets, width)


def as_directions(source: NoiseGenerator | Directions) -> Directions:
    """A :class:`Directions` for ``source`` (a bare generator means i.i.d. noise)."""
    return source if isinstance(source, Directions) else Directions(source)
