"""A fine-tuning run's folder and what is written into it (every file atomically).

    config.json        the resolved RunConfig (+ the method record)
    metrics.jsonl      one line per log / eval step
    results.json       final metrics; written last (its presence marks a finished run)
    checkpoint.safetensors   resume checkpoint: trainable weights + optimizer/scheduler/RNG/loop state
    best.safetensors   the trainable weights with the best dev metric (full weights or adapters)
    trajectory.bin     ZO runs: seeds + projected gradients (``hdopt replay`` rebuilds the weights)
    initial.safetensors  prefix runs: the initial prefix, which replay starts from
    lp_head.safetensors  --lp-init runs: the linear probe's label-word rows of the LM head
"""

from __future__ import annotations

import json
import resource
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from hdopt.finetune.config import RunConfig
from hdopt.lm.rundir import default_run_dir, write_jsonl

CONFIG, METRICS, RESULTS = "config.json", "metrics.jsonl", "results.json"
CHECKPOINT, BEST, TRAJECTORY = "checkpoint.safetensors", "best.safetensors", "trajectory.bin"
INITIAL = "initial.safetensors"  # prefix runs: the starting prefix (its init depends on float op order)
LP_HEAD = "lp_head.safetensors"  # --lp-init runs: the probe's rows of the LM head (part of the start)


def new_run_dir(output_dir: str | None, task: str, method: str, model: str) -> Path:
    return Path(output_dir) if output_dir else default_run_dir("finetune", task, method, model)


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} a finetune run folder?")
    return json.loads(path.read_text(encoding="utf-8"))


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
