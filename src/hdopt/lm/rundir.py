"""Run folders: where a new one goes, and JSON-lines files (predictions, metrics) written atomically."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from pathlib import Path

from hdopt.io import atomic_write_text


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> Path:
    """Atomically write one JSON object per line (values JSON cannot hold are written as ``str``)."""
    return atomic_write_text(path, "".join(json.dumps(row, default=str) + "\n" for row in rows))


class JsonlWriter:
    """Append JSON lines as they come, each batch flushed to disk (a crash keeps what was written).

    Use as a context manager; a finished run rewrites the file atomically (:func:`write_jsonl`).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._handle = open(self.path, "w", encoding="utf-8")  # noqa: SIM115  (closed in close())

    def write(self, rows: Iterable[dict]) -> None:
        self._handle.write("".join(json.dumps(row, default=str) + "\n" for row in rows))
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()

    def __enter__(self) -> JsonlWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_run_dir(*parts: str, root: str | os.PathLike = "runs") -> Path:
    """``runs/<part>-<part>-...-<UTC timestamp>``, made unique with a suffix if it exists."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    base = Path(root) / "-".join([*(p.replace("/", "_") for p in parts), stamp])
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
