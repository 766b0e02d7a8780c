"""Timing probe for the report: the cost of one forward-only step measured against one forward pass."""

from __future__ import annotations

import statistics
import time

import torch

from hdopt.zo import ZOSGD


def zo_step_cost(model, batch: int, length: int, rounds: int, noises=("rademacher", "gaussian"),
                 seed: int = 0) -> dict[str, float]:  # fmt: skip
    """Median over ``rounds`` of (wall time of one two-point ZO-SGD step) / (one forward pass), per noise.

    Each round times a forward and one step per noise back to back, so slow phases of a shared machine hit
    numerator and denominator alike. The step includes the update sweep (lr > 0). ``model`` is modified.
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (batch, length), generator=gen).to(model.device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    optimizers = {n: ZOSGD(model.named_parameters(), lr=1e-9, eps=1e-3, noise=n, seed=seed) for n in noises}
    model.eval()

    def forward() -> None:
        with torch.no_grad():
            closure()

    def timed(fn) -> float:
        start = time.perf_counter()
        fn()
        if ids.is_cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    forward()  # warm-up: allocator, kernels, and each optimizer's first-step discovery
    for opt in optimizers.values():
        opt.step(closure)
    ratios: dict[str, list[float]] = {n: [] for n in noises}
    forwards = []
    for _ in range(rounds):
        fwd = timed(forward)
        forwards.append(fwd)
        for n, opt in optimizers.items():
            ratios[n].append(timed(lambda opt=opt: opt.step(closure)) / fwd)
    return {
        "forward_seconds": statistics.median(forwards),
        **{n: statistics.median(r) for n, r in ratios.items()},
    }
