"""Atomic JSON result files that an interrupted benchmark can resume from."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hdopt.io import atomic_write_json


def write_json(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` atomically in the layout of the TinT results files (indent 1, sorted keys)."""
    return atomic_write_json(path, obj, indent=1, sort_keys=True)


def read_json(path: str | os.PathLike, default=None):
    path = Path(path)
    if not path.exists():
        return default
    with open(path) as f:
        return json.load(f)
