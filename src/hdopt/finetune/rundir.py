"""A fine-tuning run's folder and what is written into it (every file atomically, the lock aside).

    run.lock           held (flock) by the process that runs in the folder; names it to any other
    config.json        the resolved RunConfig (+ the method record)
    metrics.jsonl      one line per log / eval step
    results.json       final metrics; written last (its presence marks a finished run)
    checkpoint.safetensors   resume checkpoint: trainable weights + optimizer/scheduler/RNG/loop state
    best.safetensors   the trainable weights with the best dev metric (full weights or adapters)
    trajectory.bin     ZO runs: seeds + projected gradients (``hdopt replay`` rebuilds the weights)
    initial.safetensors  prefix runs: the initial prefix, which replay starts from
    lp_head.safetensors  --lp-init runs: the linear probe's label-word rows of the LM head

The weight files and the trajectory carry a checksum of their content (:mod:`hdopt.finetune.checkpoint`,
:func:`save_trajectory`); reading them verifies it and names a damaged file.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import resource
import socket
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hdopt.finetune.config import RunConfig
from hdopt.finetune.errors import RunFolderError
from hdopt.io import remove_stale_temp_files
from hdopt.lm.rundir import default_run_dir, write_jsonl
from hdopt.zo import Trajectory, ZOOptimizer
from hdopt.zo.trajectory import MAGIC as TRAJECTORY_FORMAT

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
CHECKPOINT, BEST, TRAJECTORY = "checkpoint.safetensors", "best.safetensors", "trajectory.bin"
INITIAL = "initial.safetensors"  # prefix runs: the starting prefix (its init depends on float op order)
LP_HEAD = "lp_head.safetensors"  # --lp-init runs: the probe's rows of the LM head (part of the start)
LOCK = "run.lock"


def new_run_dir(output_dir: str | None, task: str, method: str, model: str) -> Path:
    return Path(output_dir) if output_dir else default_run_dir("finetune", task, method, model)


def read_json(path: Path) -> dict:
    """A run file's JSON object; a missing file or one that is not a JSON object is named in the error."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a finetune run folder?")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise RunFolderError(f"{path} is damaged (not valid JSON: {err}); it cannot be used") from None
    if not isinstance(doc, dict):
        raise RunFolderError(f"{path} is damaged (not a JSON object); it cannot be used")
    return doc


class RunLock:
    """An exclusive lock on a run folder: ``run.lock``, held with ``flock`` while a run writes there.

    The kernel releases the lock when its process ends in any way (``kill -9`` included), so a lock left by
    a dead process is free and the next run takes it over (:attr:`stale` then describes the dead holder).
    The file records the holder (pid, host, start, command) for the message another process gets.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.stale: dict | None = None
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd)
            os.close(fd)
            who = (f"process {holder.get('pid')} on {holder.get('host')} (`{holder.get('command')}`, since "
                   f"{holder.get('since')})") if holder else "another process"  # fmt: skip
            raise RunFolderError(f"{self.folder} is in use by {who}: wait for it to finish or stop it, or "
                                 "choose another --output-dir") from None  # fmt: skip
        previous = self._read(fd)
        if previous and not previous.get("released") and previous.get("pid") != os.getpid():
            self.stale = previous  # its holder died without releasing it (kill -9, power loss)
        self._fd = fd
        self._write({"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                     "since": datetime.datetime.now().isoformat(timespec="seconds"), "released": False})
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is None:
            return
        self._write({**self._read(self._fd), "released": True})
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    @staticmethod
    def _read(fd: int) -> dict:
        os.lseek(fd, 0, os.SEEK_SET)
        try:
            doc = json.loads(os.read(fd, 65536) or b"{}")
        except ValueError:
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write(self, doc: dict) -> None:
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(doc).encode(), 0)


@contextlib.contextmanager
def claim(folder: Path, fresh: bool) -> Iterator[RunLock]:
    """Hold the folder's lock for a run; a ``fresh`` run refuses a folder that holds one. Clears the
    temporary files a hard-killed writer left behind."""
    with RunLock(folder) as lock:
        if fresh and ((folder / CHECKPOINT).exists() or (folder / RESULTS).exists()):
            raise FileExistsError(f"{folder} already holds a run: resume it with --resume {folder}, or "
                                  "choose another --output-dir")  # fmt: skip
        if lock.stale:
            print(f"note: {folder} was locked by process {lock.stale.get('pid')}, which ended without "
                  "releasing it (killed?); taking it over", file=sys.stderr)  # fmt: skip
        remove_stale_temp_files(folder)
        yield lock


def _trajectory_digest(header: dict, body: bytes) -> str:
    """sha256 of a trajectory file's header (without its checksum) and its records."""
    head = json.dumps({k: v for k, v in header.items() if k != "sha256"}, sort_keys=True)
    return hashlib.sha256(head.encode() + b"\n" + body).hexdigest()


def save_trajectory(optimizer: ZOOptimizer, path: Path) -> None:
    """Write the optimizer's trajectory file with a checksum of its header and records in the header."""
    header = optimizer.trajectory_header()
    q, groups, extras = header["config"]["q"], len(header["groups"]), header.get("record_extras", 0)
    written = {**header, "format": TRAJECTORY_FORMAT}  # the header line Trajectory.save writes
    header["sha256"] = _trajectory_digest(written, optimizer.trajectory.pack(q, groups, extras))
    optimizer.trajectory.save(path, header)


def load_trajectory(path: Path) -> tuple[dict, Trajectory]:
    """``(header, trajectory)`` of a trajectory file, checked against its checksum (files written before
    checksums load unverified); a damaged file raises :class:`RunFolderError` naming it."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run has not saved its trajectory yet")
    try:
        header, trajectory = Trajectory.load(path)
    except (ValueError, KeyError, TypeError) as err:
        raise RunFolderError(f"{path} is damaged ({err}); it cannot be used") from None
    expected = header.get("sha256")
    if expected is not None:
        body = path.read_bytes().split(b"\n", 1)[1]
        if _trajectory_digest(header, body) != expected:
            raise RunFolderError(f"{path} is damaged (its content does not match its checksum); it cannot "
                                 "be used")  # fmt: skip
    return header, trajectory


def read_config(folder: Path) -> tuple[RunConfig, dict]:
    """``(the resolved config, the method record)`` a run saved in ``config.json``."""
    doc = read_json(folder / CONFIG)
    record = doc.pop("method_record", None) or {}
    return RunConfig.from_dict(doc, str(folder / CONFIG)), record


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process: CUDA max allocated on a GPU, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def read_metrics(folder: Path) -> list[dict]:
    path = folder / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@dataclass
class MetricsLog:
    """metrics.jsonl kept in memory and rewritten atomically on every record (runs log rarely).

    ``write=False`` keeps the rows in memory only (the ranks other than 0 of a torchrun run).
    """

    folder: Path
    rows: list[dict] = field(default_factory=list)
    tensorboard: object = None
    write: bool = True

    def record(self, row: dict) -> None:
        self.rows.append(row)
        if not self.write:
            return
        write_jsonl(self.folder / METRICS, self.rows)
        if self.tensorboard is not None:
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, row["step"])

    def truncate(self, step: int) -> None:
        """Drop rows logged after ``step`` (resuming from a checkpoint taken at ``step``)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        if self.write:
            write_jsonl(self.folder / METRICS, self.rows)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def open_tensorboard(folder: Path, wanted: bool):
    """A SummaryWriter in ``folder/tensorboard`` when asked for and installed, else None (and a warning)."""
    if not wanted:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        warnings.warn("tensorboard is not installed; logging to metrics.jsonl only", stacklevel=2)
        return None
    return SummaryWriter(str(folder / "tensorboard"))


__all__ = [
    "MetricsLog",
    "new_run_dir",
    "open_tensorboard",
    "read_json",
    "read_metrics",
    "write_jsonl",
]
