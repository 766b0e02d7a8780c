"""Run folders: config.json, results.json and predictions.jsonl, each written atomically."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def _atomic_write(path: Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename over ``path`` (readers never see half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text``."""
    _atomic_write(Path(path), text)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON."""
    _atomic_write(Path(path), json.dumps(obj, indent=2, default=str) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomically write one JSON object per line."""
    _atomic_write(Path(path), "".join(json.dumps(row, default=str) + "\n" for row in rows))


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
