"""What every lab experiment returns and writes: checks (predicted vs measured), a verdict, results.json."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hdopt.io import atomic_write_json


def numeric_environment() -> dict[str, Any]:
    """What decides the last bits of a CPU run besides the seed: torch's version, its intra-op thread count
    and the vector instruction set its kernels dispatch to (AVX512, AVX2, ...). The lab's runs are bitwise
    repeatable when all three match; when one differs, rounding differs in the last bit and the long, noisy
    trainings drift apart like runs with another seed (measured in docs/dynamics.md)."""
    return {"torch": torch.__version__, "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}  # fmt: skip


@dataclass
class Check:
    """One prediction compared with its measurement.

    A check whose measurement (or numeric prediction) is NaN or infinite never passes, whatever ``passed``
    was given as: a rule written as ``not (x > tol)`` must not accept a NaN.

    Attributes:
        name: what is compared.
        predicted: the theory's value (or a description such as "< 0.05").
        measured: the measurement.
        passed: whether the measurement agrees within the stated tolerance.
        tolerance: the acceptance rule, in words.
    """

    name: str
    predicted: float | str
    measured: float
    passed: bool
    tolerance: str

    def __post_init__(self) -> None:
        numbers = [self.measured] + ([] if isinstance(self.predicted, str) else [self.predicted])
        self.passed = bool(self.passed) and all(finite(x) for x in numbers)

    def line(self) -> str:
        pred = _fmt(self.predicted) if not isinstance(self.predicted, str) else self.predicted
        mark = "ok" if self.passed else "FAIL"
        return f"{self.name}: predicted {pred}, measured {_fmt(self.measured)} ({mark})"


@dataclass
class LabResult:
    """The outcome of one experiment run.

    Attributes:
        name: experiment name.
        config: the config dataclass used.
        checks: predicted-vs-measured comparisons.
        curves: series for plots and results.json (lists of floats).
        runtime_s: wall-clock seconds.
        cpu_s: CPU seconds of this process (less sensitive than wall time to other jobs on the machine).
        plot: path of the PNG plot, once written.
        environment: :func:`numeric_environment` when the result was made.
    """

    name: str
    config: Any
    checks: list[Check]
    curves: dict[str, Any] = field(default_factory=dict)
    runtime_s: float = 0.0
    plot: str | None = None
    cpu_s: float = 0.0
    environment: dict[str, Any] = field(default_factory=numeric_environment)

    @property
    def passed(self) -> bool:
        """True when there is at least one check and every check passed (no checks: nothing was shown)."""
        return bool(self.checks) and all(c.passed for c in self.checks)

    def verdict(self) -> str:
        """One line: PASS/FAIL, then every check as predicted vs measured."""
        head = f"{self.name}: {'PASS' if self.passed else 'FAIL'} | "
        return head + "; ".join(c.line() for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "experiment": self.name,
            "passed": self.passed,
            "verdict": self.verdict(),
            "runtime_s": round(self.runtime_s, 2),
            "cpu_s": round(self.cpu_s, 2),
            "environment": self.environment,
            "config": dataclasses.asdict(self.config),
            "checks": [dataclasses.asdict(c) for c in self.checks],
            "curves": self.curves,
            "plot": self.plot,
        }

    def write(self, out_dir: str | Path) -> Path:
        """Write ``results.json`` (and config.json) atomically into ``out_dir``; returns the results path."""
        out_dir = Path(out_dir)
        atomic_write_json(out_dir / "config.json", dataclasses.asdict(self.config))
        return atomic_write_json(out_dir / "results.json", self.to_json())


def finite(x: object) -> bool:
    """Whether ``x`` is a finite real number (False for NaN, inf, None and non-numbers)."""
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def within(measured: float, predicted: float, rel: float) -> bool:
    """``|measured - predicted| <= rel * |predicted|`` (False for NaN)."""
    return math.isfinite(measured) and abs(measured - predicted) <= rel * abs(predicted)


class Timer:
    """``with Timer() as t: ...; t.seconds, t.cpu_seconds`` (wall clock and this process's CPU time)."""

    def __enter__(self) -> Timer:
        self.start, self.cpu_start = time.perf_counter(), time.process_time()
        self.seconds = self.cpu_seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def _fmt(x: float) -> str:
    if x == 0 or not math.isfinite(x):
        return str(x)
    return f"{x:.3g}" if 1e-3 <= abs(x) < 1e4 else f"{x:.2e}"
