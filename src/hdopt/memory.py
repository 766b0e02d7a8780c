"""Peak memory, measurable per phase: resident memory of the process (Linux), and torch's tensors (any OS).

``ru_maxrss`` only grows, so a phase that follows model loading would report the loading peak. On Linux,
writing ``5`` to ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current resident size, so
``reset_peak(); work(); peak_mib()`` measures ``work`` alone. :func:`tensor_peak_bytes` counts only the bytes
of torch tensors allocated during a call, as the allocator itself reports them.
"""

from __future__ import annotations

import resource
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
_STATUS = Path("/proc/self/status")


def _status_mib(field: str) -> float | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def rss_mib() -> float | None:
    """Current resident memory (MiB), or None where /proc is not available."""
    return _status_mib("VmRSS")


def reset_peak() -> bool:
    """Reset the peak-RSS counter to the current RSS; False where the OS does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_mib("VmHWM") is not None


def peak_mib() -> float:
    """Peak resident memory (MiB) since the last :func:`reset_peak` (else since the process started)."""
    peak = _status_mib("VmHWM")
    if peak is not None:
        return peak
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def tensor_peak_bytes(fn: Callable[[], T]) -> tuple[T, int]:
    """Run ``fn()``; return its result and the peak bytes held by tensors allocated while it ran.

    The figure is the CPU allocator's own running total (``total_allocated``), which c10 reports with every
    allocation and free to ``torch.profiler`` when ``profile_memory=True``: every tensor storage counts, the
    temporaries inside an op included; memory allocated before the call does not. It measures torch's
    tensors, not the process (see :func:`peak_mib` for resident memory), and works where torch keeps no
    allocator statistics (the CPU). Profiling slows ``fn`` down; use it in tests and probes, not timings.
    """
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields))
    if not events:
        return result, 0
    events.sort(key=lambda e: e[0])
    # the running total carries what earlier profiled calls left alive: measure from where this call began
    first = events[0][1]
    start = first.total_allocated - first.alloc_size
    return result, max(0, max(fields.total_allocated for _, fields in events) - start)
