"""Counter-based noise streams for zeroth-order optimization.

A noise value is a pure function of a 64-bit *key* and an element *offset*: ``z = noise(key, offset)``.
Keys are derived from (seed, step, direction, parameter identity) by :func:`derive_key`, so the noise a
parameter receives does not depend on the order parameters are visited in, on how a tensor is cut into
chunks, or on which device generates it (integer hashing is exact everywhere; the Gaussian transform is
float32 math, bitwise reproducible on one device type).

The element hash is two keyed rounds of a 32-bit multiply-xorshift mixer (the constants of ``lowbias32``),
run as in-place int32 tensor ops (int32 multiplies are native SIMD instructions; int64 ones are not).

* Rademacher (+-1): one 32-bit word (counter ``c``) gives the signs of elements ``32c .. 32c+31``
  (expanded by a table lookup).
* Gaussian: Box-Muller (a 24-bit uniform for the radius, a 32-bit angle). Pair ``j`` hashes counter ``j``:
  the first round's word gives the radius, the second round's word the angle. Elements come in blocks of 64:
  element ``64b + i`` (``i < 32``) is ``r cos(theta)`` of pair ``32b + i`` and element ``64b + 32 + i`` is
  its ``r sin(theta)``. cos and sin are computed over all pairs of a piece at once (contiguous buffers;
  called on the 32-element rows of the layout they cost 2-3x more) and the products with ``r`` are stored
  into the block layout; a piece (``PIECE`` elements) keeps the temporaries in the cache.

:class:`NoiseGenerator` keeps its temporaries between calls (fresh large allocations cost page faults that
would double the generation time); no temporary exceeds ``chunk`` elements.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch

GAUSSIAN = "gaussian"
RADEMACHER = "rademacher"
DISTRIBUTIONS = (GAUSSIAN, RADEMACHER)

DEFAULT_CHUNK = 1 << 20  # elements: the largest noise temporary
PIECE = 1 << 19  # elements: Gaussian noise is computed and consumed in pieces (temporaries stay in the cache)

_MASK64 = (1 << 64) - 1
_M1 = 0x7FEB352D
_M2 = 0x846CA68B - (1 << 32)  # as a signed int32 constant
_SEGMENT = 1 << 31  # counters are hashed as int32 within a segment; the segment index goes into the key
_LN2 = 0.6931471805599453
_BLOCK = 64  # elements per layout block (see the module docstring)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def derive_key(*parts: int) -> int:
    """Mix integers (seed, step, direction, parameter id, ...) into one 64-bit key."""
    key = 0x6A09E667F3BCC908
    for part in parts:
        key = _splitmix64(key ^ (int(part) & _MASK64))
    return key


def name_id(name: str) -> int:
    """A stable 64-bit identity for a parameter name (independent of Python's hash randomization)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _to_i32(x: int) -> int:
    x &= 0xFFFFFFFF
    return x - (1 << 32) if x >= (1 << 31) else x


def _segment_keys(key: int, segment: int) -> tuple[int, int]:
    seg_key = derive_key(key, segment) if segment else key
    return _to_i32(seg_key), _to_i32(seg_key >> 32)


def _mix32_(x: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """In-place 32-bit mixing round: multiply, xorshift, multiply, xorshift (the lowbias32 constants).

    Logical right shifts are emulated by masking (torch has no unsigned 32-bit shifts). The input is already
    ``counter ^ key``, a bijection of the counter, so the leading xorshift of lowbias32 is left out.
    """
    c = _constants(x.device)
    x.mul_(c["m1"])
    torch.bitwise_right_shift(x, c["15"], out=scratch)
    x.bitwise_xor_(scratch.bitwise_and_(c["mask17"])).mul_(c["m2"])
    torch.bitwise_right_shift(x, c["16"], out=scratch)
    return x.bitwise_xor_(scratch.bitwise_and_(c["mask16"]))


_CONSTANTS: dict[torch.device, dict[str, torch.Tensor]] = {}


def _constants(device: torch.device) -> dict[str, torch.Tensor]:
    """0-dim tensors of the hash and Box-Muller constants: a Python scalar operand costs a tensor wrap per op
    (~1 us, a good share of an op on a small parameter); the results are the same."""
    consts = _CONSTANTS.get(device)
    if consts is None:
        ints = {"m1": _M1, "m2": _M2, "15": 15, "16": 16, "mask16": 0xFFFF, "mask17": 0x1FFFF}
        ints["mask24"] = 0xFFFFFF
        floats = dict(half=0.5, scale=-2.0 * _LN2, shift=48.0 * _LN2, angle=torch.pi / 2**31)
        consts = {k: torch.tensor(v, dtype=torch.int32, device=device) for k, v in ints.items()}
        consts.update({k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in floats.items()})
        _CONSTANTS[device] = consts
    return consts


_SIGN_TABLES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _sign_table(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[256, 8] table: row b holds +-1 for the 8 bits of byte b (bit k -> column k)."""
    table = _SIGN_TABLES.get((dtype, device))
    if table is None:
        bits = (torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1
        table = (bits * 2 - 1).to(dtype=dtype, device=device)
        _SIGN_TABLES[(dtype, device)] = table
    return table


class NoiseGenerator:
    """Generates noise chunks of one distribution on one device, reusing its temporaries.

    Args:
        distribution: ``"gaussian"`` (N(0, 1)) or ``"rademacher"`` (+-1 with probability 1/2).
        chunk: the largest number of elements one call may produce (bounds every temporary).
        device: where the noise is generated.
    """

    def __init__(self, distribution: str = GAUSSIAN, chunk: int = DEFAULT_CHUNK, device="cpu"):
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"unknown noise distribution {distribution!r}; choose one of {DISTRIBUTIONS}")
        if chunk < 64:
            raise ValueError(f"chunk must be at least 64 elements, got {chunk}")
        self.distribution = distribution
        self.chunk = int(chunk)
        self.device = torch.device(device)
        self._buffers: dict[str, torch.Tensor] = {}
        self._piece = min(self.chunk, PIECE)
        self._pairs_capacity = self._piece // 2 + _BLOCK  # Gaussian pairs in one piece, block-aligned

    def _buffer(self, name: str, numel: int, dtype: torch.dtype, capacity: int | None = None) -> torch.Tensor:
        """The first ``numel`` elements of a reused buffer (``capacity`` elements or more; default chunk)."""
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            size = max(numel, self.chunk + 2 * _BLOCK if capacity is None else capacity)
            buf = torch.empty(size, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel]

    def _hash(self, key: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both hash rounds for counters ``start .. start+count-1`` (views of internal buffers)."""
        # a Gaussian piece hashes one counter per pair, Rademacher one per 32 elements (words() may grow them)
        capacity = self._pairs_capacity if self.distribution == GAUSSIAN else self.chunk // 32 + 4
        first = self._buffer("round1", count, torch.int32, capacity)
        second = self._buffer("round2", count, torch.int32, capacity)
        scratch = self._buffer("scratch", count, torch.int32, capacity)
        iota = self._iota(count)
        pos = 0
        while pos < count:  # cut at segment boundaries so every counter fits an int32
            segment, local = divmod(start + pos, _SEGMENT)
            n = min(count - pos, _SEGMENT - local)
            k1, k2 = _segment_keys(key, segment)
            a, b = first[pos : pos + n], second[pos : pos + n]
            torch.add(iota[:n], local, out=a)  # the counters; adding to a kept 0..n-1 beats torch.arange
            _mix32_(a.bitwise_xor_(k1), scratch[:n])
            _mix32_(torch.bitwise_xor(a, k2, out=b), scratch[:n])
            pos += n
        return first, second

    def _iota(self, count: int) -> torch.Tensor:
        """int32 ``0 .. count-1`` (kept; grown on demand)."""
        iota = self._buffers.get("iota")
        if iota is None or iota.numel() < count:
            size = max(count, self._pairs_capacity if self.distribution == GAUSSIAN else self.chunk // 32 + 4)
            iota = self._buffers["iota"] = torch.arange(size, dtype=torch.int32, device=self.device)
        return iota[:count]

    def words(self, key: int, start: int, count: int) -> torch.Tensor:
        """Uniformly random int32 words for counters ``start ..`` (a view valid until the next call)."""
        if count > self.chunk:
            raise ValueError(f"asked for {count} words at once; this generator's chunk is {self.chunk}")
        return self._hash(key, start, count)[1]

    def _check(self, start: int, length: int) -> None:
        if length > self.chunk:
            raise ValueError(f"asked for {length} elements at once; this generator's chunk is {self.chunk}")
        if start < 0 or length < 0:
            raise ValueError(f"noise offsets must be non-negative, got start={start}, length={length}")

    def pieces(self, key: int, start: int, length: int) -> Iterator[tuple[int, torch.Tensor]]:
        """The noise of offsets ``[start, start+length)`` as consecutive ``(offset - start, values)`` pieces.

        The values are :meth:`generate`'s; each view is valid until the next piece. A consumer that adds the
        noise into a tensor piece by piece keeps it in the cache (a whole chunk of noise written first and
        read back later is not, once a forward pass has run between two calls).
        """
        self._check(start, length)
        if self.distribution == RADEMACHER or length <= self._piece:
            yield 0, self.generate(key, start, length)
            return
        end, step = start + length, max(1, self._piece // _BLOCK)
        pos = start
        while pos < end:
            first = pos // _BLOCK
            last = min((end + _BLOCK - 1) // _BLOCK, first + step)
            z = self._buffer("piece", _BLOCK * (last - first), torch.float32, self._piece + _BLOCK)
            self._gaussian_blocks(key, first, z.view(last - first, 2, 32))
            stop = min(end, _BLOCK * last)
            yield pos - start, z[pos - _BLOCK * first : stop - _BLOCK * first]
            pos = stop

    def generate(self, key: int, start: int, length: int) -> torch.Tensor:
        """float32 noise for offsets ``[start, start+length)``; a view valid until the next call."""
        self._check(start, length)
        first, last = start // _BLOCK, (start + length + _BLOCK - 1) // _BLOCK
        blocks = last - first
        if self.distribution == RADEMACHER:  # one word per 32 elements, i.e. two per block
            _, words = self._hash(key, 2 * first, 2 * blocks)
            signs = self._buffer("z", _BLOCK * blocks, torch.float32).view(-1, 8)
            table = _sign_table(torch.float32, self.device)
            torch.index_select(table, 0, words.view(torch.uint8).to(torch.int32), out=signs)
        else:  # one pair per two elements, computed in pieces whose temporaries stay in the cache
            z = self._buffer("z", _BLOCK * blocks, torch.float32).view(blocks, 2, 32)
            step = max(1, self._piece // _BLOCK)
            for b in range(0, blocks, step):
                self._gaussian_blocks(key, first + b, z[b : b + step])
            signs = z
        skip = start - _BLOCK * first
        return signs.view(-1)[skip : skip + length]

    def _gaussian_blocks(self, key: int, first: int, z: torch.Tensor) -> None:
        """Fill ``z`` ([blocks, 2, 32]) with the Gaussian noise of layout blocks ``first ..``."""
        blocks = z.shape[0]
        pairs = 32 * blocks
        radius_bits, angle_bits = self._hash(key, 32 * first, pairs)
        # the float stages reuse the hash buffers in place (fewer distinct lines to bring into the cache):
        # radius over the first round's words, the angle (then its sine) over the second's, cos over scratch
        radius, sin = radius_bits.view(torch.float32), angle_bits.view(torch.float32)
        cos = self._buffer("scratch", pairs, torch.int32, self._pairs_capacity).view(torch.float32)
        _box_muller_(radius_bits, angle_bits, radius, sin)
        # cos and sin on contiguous buffers: a vectorized math call per 32-element row of the block layout
        # costs 2-3x more per element than one call over the piece (the values are the same)
        torch.cos(sin, out=cos)
        sin.sin_()
        torch.mul(cos.view(blocks, 32), radius.view(blocks, 32), out=z[:, 0, :])
        torch.mul(sin.view(blocks, 32), radius.view(blocks, 32), out=z[:, 1, :])

    def rows(self, key: int, offsets: torch.Tensor, width: int) -> torch.Tensor:
        """Noise for rows of a 2-D tensor: ``[len(offsets), width]``, row i starting at element offsets[i].

        Equals slicing the full stream; used for embedding rows, where a batch gathers only a few rows.
        """
        counters = offsets.to(torch.int64).reshape(-1, 1) + torch.arange(width, device=offsets.device)
        block, within = torch.div(counters, _BLOCK, rounding_mode="floor"), counters % _BLOCK
        if self.distribution == RADEMACHER:
            _, words = _hash_at(key, 2 * block + within // 32)
            bits = torch.bitwise_right_shift(words, (within % 32).to(torch.int32)).bitwise_and_(1)
            return (bits * 2 - 1).to(torch.float32)
        radius_bits, angle_bits = _hash_at(key, 32 * block + within % 32)
        radius = torch.empty(counters.shape, device=counters.device)
        theta = torch.empty_like(radius)
        _box_muller_(radius_bits, angle_bits, radius, theta)
        return torch.where(within < 32, torch.cos(theta), torch.sin(theta)).mul_(radius)


def _box_muller_(radius_bits, angle_bits, radius, theta) -> None:
    """Box-Muller polar coordinates from two int32 words, written into ``radius`` and ``theta`` (which may be
    float32 views of the words' own memory: every stage is elementwise).

    ``radius = sqrt(-2 ln u)``, ``u = (b + 0.5) / 2^24`` from the low 24 bits ``b`` of the first word, i.e.
    ``sqrt(2 ln2 (24 - log2(b + 0.5)))``; ``theta = pi * w / 2^31`` in ``[-pi, pi)`` from the signed second
    word.
    """
    c = _constants(radius.device)
    torch.add(radius_bits.bitwise_and_(c["mask24"]), c["half"], out=radius)  # int to float, exact
    torch.log2(radius, out=radius)
    radius.mul_(c["scale"]).add_(c["shift"])
    torch.sqrt(radius, out=radius)
    torch.mul(angle_bits, c["angle"], out=theta)


def _hash_at(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both hash rounds for arbitrary int64 ``counters`` (the values :meth:`NoiseGenerator._hash` gives)."""
    low, high = (int(c) // _SEGMENT for c in torch.aminmax(counters)) if counters.numel() else (0, -1)
    if low == high:  # the usual case: one segment, no masks (torch.unique would sort all counters)
        k1, k2 = _segment_keys(key, low)
        first = (counters - low * _SEGMENT).to(torch.int32)
        scratch = torch.empty_like(first)
        _mix32_(first.bitwise_xor_(k1), scratch)
        return first, _mix32_(torch.bitwise_xor(first, k2), scratch)
    first = torch.empty(counters.shape, dtype=torch.int32, device=counters.device)
    second = torch.empty_like(first)
    segments = torch.div(counters, _SEGMENT, rounding_mode="floor")
    for segment in torch.unique(segments).tolist():
        mask = segments == segment
        k1, k2 = _segment_keys(key, segment)
        a = (counters[mask] - segment * _SEGMENT).to(torch.int32)
        scratch = torch.empty_like(a)
        _mix32_(a.bitwise_xor_(k1), scratch)
        first[mask] = a
        second[mask] = _mix32_(a.bitwise_xor_(k2), scratch)
    return first, second


def noise(key: int, start: int, length: int, distribution: str = GAUSSIAN, device="cpu") -> torch.Tensor:
    """float32 noise for offsets ``[start, start+length)`` of stream ``key`` (a fresh tensor; convenience)."""
    generator = NoiseGenerator(distribution, chunk=max(length, 64), device=device)
    return generator.generate(key, start, length).clone()


def chunks(numel: int, chunk: int = DEFAULT_CHUNK) -> Iterator[tuple[int, int]]:
    """(start, length) pairs covering ``range(numel)`` with at most ``chunk`` elements each."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1 element, got {chunk}")
    for start in range(0, numel, chunk):
        yield start, min(chunk, numel - start)
