"""Peak resident memory of this process, measurable per phase (Linux).

``ru_maxrss`` only grows, so a phase that follows model loading would report the loading peak. On Linux,
writing ``5`` to ``/proc/self/clear_refs`` resets the peak (``VmHWM``) to the current resident size, so
``reset_peak(); work(); peak_mib()`` measures ``work`` alone.
"""

from __future__ import annotations

import resource
from pathlib import Path

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
