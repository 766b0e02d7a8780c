"""Two data-parallel workers in one process: threads whose ``reduce`` hooks average each other's values."""

from __future__ import annotations

import threading
from collections.abc import Callable


class TwoWorkerMean:
    """A fake all-reduce for two workers (threads): ``hook(rank)`` returns the mean of both workers' values,
    as :class:`hdopt.distributed.ScalarAllReduce` does across processes. Records every call's kind."""

    def __init__(self, timeout: float = 120.0):
        self.barrier = threading.Barrier(2, timeout=timeout)
        self.posted: list[tuple[str, list[float]] | None] = [None, None]
        self.kinds: list[str] = []

    def hook(self, rank: int) -> Callable[[list[float], str], list[float]]:
        def reduce(values: list[float], kind: str) -> list[float]:
            self.posted[rank] = (kind, list(values))
            self.barrier.wait()
            (kind_a, a), (kind_b, b) = self.posted
            assert kind_a == kind_b, (kind_a, kind_b)
            if rank == 0:
                self.kinds.append(kind)
            mean = [(x + y) / 2 for x, y in zip(a, b, strict=True)]
            self.barrier.wait()  # both have read before either posts again
            return mean

        return reduce

    def run(self, workers: list[Callable[[], None]]) -> None:
        """Run each worker's loop in its own thread; re-raise the first failure (the other is released)."""
        errors: list[BaseException] = []

        def target(fn):
            try:
                fn()
            except BaseException as err:  # noqa: BLE001 - re-raised in the caller
                errors.append(err)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(fn,)) for fn in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
