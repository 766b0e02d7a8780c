"""hdopt.io: atomic writes with one fsync and permission policy; clearing what a hard kill leaves behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hdopt import io
from hdopt.io import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temp_files,
    save_figure,
)
from hdopt.plotting import pyplot

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    before = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(before)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_bytes_text_and_json_round_trip(tmp_path):
    assert atomic_write_bytes(tmp_path / "a" / "b.bin", b"\x00\x01") == tmp_path / "a" / "b.bin"  # makes a/
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"\x00\x01"
    atomic_write_text(tmp_path / "t.md", "héllo\n")
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "héllo\n"
    atomic_write_json(tmp_path / "r.json", {"b": 1, "a": [1.5]})
    assert (tmp_path / "r.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1.5\n  ]\n}\n'
    atomic_write_json(tmp_path / "s.json", {"b": 1, "a": Path("x")}, indent=None, sort_keys=True, default=str)
    assert (tmp_path / "s.json").read_text() == '{"a": "x", "b": 1}\n'
    with pytest.raises(TypeError, match="not JSON serializable"):
        atomic_write_json(tmp_path / "r.json", {"a": Path("x")})  # no default: refused, old file kept
    assert json.loads((tmp_path / "r.json").read_text()) == {"b": 1, "a": [1.5]}
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_get_the_mode_of_a_normal_new_file(tmp_path, umask, mask, expected):
    umask(mask)
    atomic_write_bytes(tmp_path / "data.bin", b"x")
    with atomic_path(tmp_path / "ckpt.pt") as tmp:  # a writer that takes a file name (torch.save, ...)
        tmp.write_bytes(b"y")
    with atomic_path(tmp_path / "replaced.bin") as tmp:  # a writer that replaces the file (safetensors does)
        tmp.unlink()
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600))
    (tmp_path / "plain.txt").write_text("z")  # what open() gives: the reference
    assert _mode(tmp_path / "plain.txt") == expected
    names = ("data.bin", "ckpt.pt", "replaced.bin")
    assert {name: _mode(tmp_path / name) for name in names} == dict.fromkeys(names, expected)


def test_the_file_and_then_its_folder_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(io.os, "fsync", fsync)
    monkeypatch.setattr(io.os, "replace", replace)
    atomic_write_text(tmp_path / "x.txt", "x")
    assert events == [("fsync", "file"), ("replace", "x.txt"), ("fsync", "folder")]


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()], ids=["OSError", "Ctrl-C"])
def test_a_failure_mid_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path, error):
    target = tmp_path / "results.json"
    atomic_write_text(target, "old\n")
    with pytest.raises(type(error)), atomic_path(target) as tmp:
        tmp.write_text("half of the new")
        raise error
    assert target.read_text() == "old\n"
    assert _leftovers(tmp_path) == []


def test_a_failing_rename_leaves_no_temp_file(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise PermissionError("read-only destination")

    monkeypatch.setattr(io.os, "replace", refuse)
    with pytest.raises(PermissionError):
        atomic_write_bytes(tmp_path / "x.bin", b"x")
    assert list(tmp_path.iterdir()) == []


def test_save_figure_writes_a_png_and_closes_the_figure(tmp_path):
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    path = save_figure(fig, tmp_path / "plots" / "curve.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not plt.fignum_exists(fig.number)
    fig, _ = plt.subplots()
    save_figure(fig, tmp_path / "curve.pdf")
    assert (tmp_path / "curve.pdf").read_bytes()[:5] == b"%PDF-"


def test_a_failing_savefig_keeps_the_old_figure_and_closes_the_new_one(tmp_path, monkeypatch):
    plt = pyplot()
    target = tmp_path / "curve.png"
    atomic_write_bytes(target, b"old png")
    fig, _ = plt.subplots()

    def broken(fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG half")
        raise RuntimeError("renderer crashed")

    monkeypatch.setattr(fig, "savefig", broken)
    with pytest.raises(RuntimeError, match="renderer crashed"):
        save_figure(fig, target)
    assert target.read_bytes() == b"old png" and _leftovers(tmp_path) == []
    assert not plt.fignum_exists(fig.number)


def test_a_hard_kill_leaves_a_temp_file_that_remove_stale_temp_files_clears(tmp_path):
    """kill -9 runs no clean-up: the temporary file stays until the folder is opened again."""
    target = tmp_path / "checkpoint.safetensors"
    atomic_write_bytes(target, b"old")
    (tmp_path / "notes.tmp").write_text("not ours: no leading dot")
    (tmp_path / ".hidden").write_text("not ours: no .tmp suffix")
    writer = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(SRC)!r})
        from hdopt.io import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half")
            os.kill(os.getpid(), 9)
    """)
    assert subprocess.run([sys.executable, "-c", writer]).returncode == -9
    (leftover,) = [name for name in _leftovers(tmp_path) if name != "notes.tmp"]
    assert leftover.startswith(".checkpoint.safetensors.")
    assert target.read_bytes() == b"old"
    assert remove_stale_temp_files(tmp_path) == [tmp_path / leftover]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hidden", "checkpoint.safetensors", "notes.tmp"]
    assert remove_stale_temp_files(tmp_path / "missing") == []
