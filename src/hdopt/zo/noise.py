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
  the first round's word
  gives the radius, the second round's word the angle. Elements come in blocks of 64: element ``64b + i``
  (``i < 32``) is ``r cos(theta)`` of pair ``32b + i`` and element ``64b + 32 + i`` is its ``r sin(theta)``,
  so a chunk is written with contiguous, vectorizable stores.

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
    x.mul_(_M1)
    torch.bitwise_right_shift(x, 15, out=scratch)
    x.bitwise_xor_(scratch.bitwise_and_(0x1FFFF)).mul_(_M2)
    torch.bitwise_right_shift(x, 16, out=scratch)
    return x.bitwise_xor_(scratch.bitwise_and_(0xFFFF))


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

    def _buffer(self, name: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
        buf = self._buffers.get(name)
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(self.chunk + 2 * _BLOCK, dtype=dtype, device=self.device)
            self._buffers[name] = buf
        return buf[:numel]

    def _hash(self, key: int, start: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both hash rounds for counters ``start .. start+count-1`` (views of internal buffers)."""
        first = self._buffer("round1", count, torch.int32)
        second = self._buffer("round2", count, torch.int32)
        scratch = self._buffer("scratch", count, torch.int32)
        pos = 0
        while pos < count:  # cut at segment boundaries so every counter fits an int32
            segment, local = divmod(start + pos, _SEGMENT)
            n = min(count - pos, _SEGMENT - local)
            k1, k2 = _segment_keys(key, segment)
            a, b = first[pos : pos + n], second[pos : pos + n]
            torch.arange(local, local + n, dtype=torch.int32, device=self.device, out=a)
            _mix32_(a.bitwise_xor_(k1), scratch[:n])
            _mix32_(torch.bitwise_xor(a, k2, out=b), scratch[:n])
            pos += n
        return first, second

    def words(self, key: int, start: int, count: int) -> torch.Tensor:
        """Uniformly random int32 words for counters ``start ..`` (a view valid until the next call)."""
        if count > self.chunk:
            raise ValueError(f"asked for {count} words at once; this generator's chunk is {self.chunk}")
        return self._hash(key, start, count)[1]

    def generate(self, key: int, start: int, length: int) -> torch.Tensor:
        """float32 noise for offsets ``[start, start+length)``; a view valid until the next call."""
        if length > self.chunk:
            raise ValueError(f"asked for {length} elements at once; this generator's chunk is {self.chunk}")
        if start < 0 or length < 0:
            raise ValueError(f"noise offsets must be non-negative, got start={start}, length={length}")
        first, last = start // _BLOCK, (start + length + _BLOCK - 1) // _BLOCK
        blocks = last - first
        if self.distribution == RADEMACHER:  # one word per 32 elements, i.e. two per block
            _, words = self._hash(key, 2 * first, 2 * blocks)
            signs = self._buffer("z", _BLOCK * blocks, torch.float32).view(-1, 8)
            table = _sign_table(torch.float32, self.device)
            torch.index_select(table, 0, words.view(torch.uint8).to(torch.int32), out=signs)
        else:  # one pair per two elements
            radius_bits, angle_bits = self._hash(key, 32 * first, 32 * blocks)
            radius = self._buffer("radius", 32 * blocks, torch.float32)
            theta = self._buffer("theta", 32 * blocks, torch.float32)
            _box_muller_(radius_bits, angle_bits, radius, theta)
            z = self._buffer("z", _BLOCK * blocks, torch.float32).view(blocks, 2, 32)
            torch.cos(theta.view(blocks, 32), out=z[:, 0, :])
            torch.sin(theta.view(blocks, 32), out=z[:, 1, :])
            z.mul_(radius.view(blocks, 1, 32))
            signs = z
        skip = start - _BLOCK * first
        return signs.view(-1)[skip : skip + length]

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
        radius, theta = torch.empty(counters.shape), torch.empty(counters.shape)
        _box_muller_(radius_bits, angle_bits, radius, theta)
        return torch.where(within < 32, torch.cos(theta), torch.sin(theta)).mul_(radius)


def _box_muller_(radius_bits, angle_bits, radius, theta) -> None:
    """Box-Muller polar coordinates from two int32 words, written into ``radius`` and ``theta``.

    ``radius = sqrt(-2 ln u)``, ``u = (b + 0.5) / 2^24`` from the low 24 bits ``b`` of the first word, i.e.
    ``sqrt(2 ln2 (24 - log2(b + 0.5)))``; ``theta = pi * w / 2^31`` in ``[-pi, pi)`` from the signed second
    word.
    """
    radius.copy_(radius_bits.bitwise_and_(0xFFFFFF)).add_(0.5)
    torch.log2(radius, out=radius)
    radius.mul_(-2.0 * _LN2).add_(48.0 * _LN2)
    torch.sqrt(radius, out=radius)
    theta.copy_(angle_bits).mul_(torch.pi / 2**31)


def _hash_at(key: int, counters: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both hash rounds for arbitrary int64 ``counters`` (the values :meth:`NoiseGenerator._hash` gives)."""
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
