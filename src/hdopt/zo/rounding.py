"""Stochastic rounding of float32 values to bfloat16 / float16.

Round-to-nearest drops an update smaller than half an ulp entirely: a bf16 weight of 0.02 has an ulp of
1.2e-4, so MeZO updates of lr*g ~ 1e-7 never move it. Stochastic rounding picks the upper neighbour with
probability equal to the fractional distance, so ``E[round(x)] = x``: small updates move the weights in
expectation.
The random bits come from the counter-based noise hash, so rounding is reproducible (replay is bitwise).
"""

from __future__ import annotations

import torch

HALF_DTYPES = (torch.bfloat16, torch.float16)


def stochastic_round(values: torch.Tensor, dtype: torch.dtype, random_words: torch.Tensor) -> torch.Tensor:
    """Round float32 ``values`` to ``dtype`` stochastically (unbiased), using int32 ``random_words``.

    Args:
        values: float32 tensor.
        dtype: ``torch.bfloat16`` or ``torch.float16`` (``torch.float32`` returns ``values`` unchanged).
        random_words: int32 tensor of uniformly random words, one per element (same shape).
    """
    if dtype == torch.float32:
        return values
    if dtype == torch.bfloat16:
        # bf16 is the top half of a float32: add a uniform 16-bit integer to the low half, then truncate.
        # Bits are sign-magnitude, so this rounds the magnitude up with probability = the dropped fraction.
        bits = values.contiguous().view(torch.int32)
        noise = random_words.bitwise_and(0xFFFF)
        rounded = (bits + noise).bitwise_and_(-65536)  # -65536 == 0xFFFF0000 as int32
        return rounded.view(torch.float32).to(torch.bfloat16)  # exact: the low half is zero
    if dtype == torch.float16:
        nearest = values.to(torch.float16)
        nearest32 = nearest.float()
        toward = torch.where(values > nearest32, torch.inf, -torch.inf).to(torch.float16)
        other = torch.nextafter(nearest, toward)
        gap = other.float() - nearest32
        p_other = torch.where(gap != 0, (values - nearest32) / gap, torch.zeros_like(values))
        uniform = random_words.bitwise_and(0xFFFFFF).float().mul_(1.0 / (1 << 24))
        return torch.where(uniform < p_other, other, nearest)
    raise ValueError(f"stochastic rounding targets bfloat16 or float16, not {dtype}")
