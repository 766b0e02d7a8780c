"""Atomic file writes with one policy, for every file hdopt writes (run folders, checkpoints, results, plots).

The policy, in order:
1. the data goes to a temporary file ``.{name}.{random}.tmp`` in the destination's folder (same file system,
   so the rename below is atomic); it gets the mode of any new file, ``0o666`` minus the umask (``0644``
   under the usual umask ``022``), whatever it holds and whichever writer filled it: checkpoints, JSON,
   figures alike (the mode is set again after the writer, as some writers replace the file: safetensors
   leaves ``0600``);
2. the temporary file is fsync'ed;
3. ``os.replace`` renames it over the destination: a reader sees the old file or the new one, never half;
4. the folder is fsync'ed, so the rename itself survives a power cut.

If anything fails before the rename (an exception, Ctrl-C), the temporary file is removed and the destination
is untouched. Only a hard kill (``kill -9``, power loss) can leave a temporary file behind:
:func:`remove_stale_temp_files` clears those when a run folder is opened again.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

_TEMP_NAME = re.compile(r"^\..+\.[^.]+\.tmp$")  # .{name}.{random}.tmp


def _create_temp(path: Path) -> Path:
    """Create an empty ``.{name}.{random}.tmp`` beside ``path`` (mode 0666 & ~umask, applied by the OS)."""
    while True:
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # a 48-bit collision: draw another name
            continue


def _fsync(path: Path) -> None:
    """Flush ``path`` (a file, or a folder on POSIX) to the disk."""
    if path.is_dir() and os.name != "posix":
        return  # folders cannot be opened for fsync on Windows
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path``, for writers that want a file name (``torch.save``, ``savefig``).

    Write the whole file to the yielded path inside the ``with`` block; on a clean exit it is fsync'ed and
    renamed over ``path`` (parent folders are created). On an exception it is removed and ``path`` keeps its
    old content.

    Example::

        with atomic_path(run / "checkpoint.safetensors") as tmp:
            safetensors.torch.save_file(tensors, tmp)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temp(path)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # what the OS gives a new file under the current umask
    try:
        yield tmp
        os.chmod(tmp, mode)
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically; returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> Path:  # fmt: skip
    """Write ``obj`` as JSON (followed by a newline) to ``path`` atomically; returns the path.

    Args:
        path: destination file; parent folders are created.
        obj: anything ``json.dumps`` accepts (with ``default`` for other types, e.g. ``default=str``).
        indent, sort_keys, default: as for ``json.dumps``.
    """
    text = json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default)
    return atomic_write_text(path, text + "\n")


def save_figure(fig: Any, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure atomically (format from the suffix, PNG by default) and close it.

    Args:
        fig: a ``matplotlib.figure.Figure``.
        path: destination, e.g. ``plot.png`` or ``plot.pdf``.
        dpi: resolution of raster formats.

    Returns:
        The destination path.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png", bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def remove_stale_temp_files(folder: str | os.PathLike) -> list[Path]:
    """Delete the ``.{name}.{random}.tmp`` files a hard-killed writer left in ``folder`` (not recursive).

    Call it only while this process owns the folder (opening or resuming a run), never while another
    process may be writing into it.

    Returns:
        The removed paths.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if _TEMP_NAME.match(p.name) and p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
