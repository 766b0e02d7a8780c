"""The trajectory of a zeroth-order run: a few bytes per step, from which the weights are rebuilt bitwise.

A ZO update is determined by the step's seed, its projected gradients (one float per direction) and the
learning rates; with the initial weights they reproduce the whole run (MeZO, section 2). The file format is
a JSON header line followed by fixed-size little-endian binary records::

    step: u64 | step_key: u64 | scale: f64 | grads: q x f64 | lrs: n_groups x f64

10k steps with q = 1 and one group take 320 kB.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hdopt.io import atomic_write_bytes

MAGIC = "hdopt-zo-trajectory/1"


@dataclass(frozen=True)
class UpdateRecord:
    """One applied update: ``theta <- rule(theta, ghat)`` with ``ghat = scale/q * sum_i grads[i] z_i``."""

    step: int
    step_key: int
    grads: tuple[float, ...]
    lrs: tuple[float, ...]
    scale: float = 1.0


def _record_format(q: int, n_groups: int) -> struct.Struct:
    return struct.Struct(f"<QQd{q}d{n_groups}d")


class Trajectory:
    """In-memory list of :class:`UpdateRecord` with atomic save / load."""

    def __init__(self, records: Iterable[UpdateRecord] = ()):
        self.records: list[UpdateRecord] = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[UpdateRecord]:
        return iter(self.records)

    def append(self, record: UpdateRecord) -> None:
        self.records.append(record)

    def truncate(self, steps: int) -> None:
        """Keep the first ``steps`` records (e.g. to match a checkpoint when resuming)."""
        del self.records[steps:]

    def save(self, path: str | os.PathLike, header: dict) -> None:
        """Write header + records to ``path`` atomically (a crash leaves the previous file intact)."""
        path = Path(path)
        q = header["config"]["q"]
        n_groups = len(header["groups"])
        fmt = _record_format(q, n_groups)
        blob = bytearray(json.dumps({"format": MAGIC, **header}).encode() + b"\n")
        for r in self.records:
            if len(r.grads) != q or len(r.lrs) != n_groups:
                raise ValueError(f"record of step {r.step} does not match q={q}, groups={n_groups}")
            blob += fmt.pack(r.step, r.step_key, r.scale, *r.grads, *r.lrs)
        atomic_write_bytes(path, bytes(blob))

    @staticmethod
    def load(path: str | os.PathLike) -> tuple[dict, Trajectory]:
        """Read a file written by :meth:`save`: returns (header, trajectory)."""
        data = Path(path).read_bytes()
        newline = data.find(b"\n")
        try:
            header = json.loads(data[:newline])
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not an hdopt trajectory file (bad header: {err})") from None
        if header.get("format") != MAGIC:
            raise ValueError(f"{path} is not an hdopt trajectory file (format {header.get('format')!r})")
        q, n_groups = header["config"]["q"], len(header["groups"])
        fmt = _record_format(q, n_groups)
        body = data[newline + 1 :]
        if len(body) % fmt.size:
            raise ValueError(f"{path} is truncated: {len(body)} bytes is not a whole number of records")
        records = []
        for fields in fmt.iter_unpack(body):
            step, key, scale = fields[:3]
            grads, lrs = fields[3 : 3 + q], fields[3 + q :]
            records.append(UpdateRecord(step, key, tuple(grads), tuple(lrs), scale))
        return header, Trajectory(records)


def replay(params, trajectory: str | os.PathLike | tuple[dict, Trajectory], upto: int | None = None):
    """Rebuild the weights of a ZO run from its starting weights and its trajectory, in place.

    Args:
        params: the starting parameters, as given to the optimizer: ``model.named_parameters()`` when the run
            used names (matched by name), otherwise the tensors in the same order.
        trajectory: a path written by ``ZOOptimizer.save_trajectory`` or a ``(header, Trajectory)`` pair.
        upto: replay only the first ``upto`` steps.

    Returns:
        The optimizer after the replayed steps (its state holds any momentum / Adam buffers).
    """
    from hdopt.zo.optim import OPTIMIZERS

    header, log = Trajectory.load(trajectory) if isinstance(trajectory, (str, os.PathLike)) else trajectory
    cls = OPTIMIZERS.get(header["optimizer"])
    if cls is None:
        raise ValueError(
            f"unknown optimizer {header['optimizer']!r} in trajectory; known: {sorted(OPTIMIZERS)}"
        )
    groups = _rebuild_groups(list(params), header["groups"])
    opt = cls(groups, **header["config"])
    for record in list(log)[:upto]:
        opt.apply_update(record)
    return opt


def _rebuild_groups(params: list, groups: list[dict]) -> list[dict]:
    named = bool(params) and isinstance(params[0], tuple)
    lookup = dict(params) if named else None
    rebuilt, position = [], 0
    for group in groups:
        settings = dict(group["settings"], lr=0.0)
        if "betas" in settings:
            settings["betas"] = tuple(settings["betas"])
        if group["names"]:
            if lookup is None:
                raise ValueError("the run used named parameters: pass model.named_parameters() to replay")
            missing = [n for n in group["names"] if n not in lookup]
            if missing:
                raise ValueError(f"parameters missing for replay: {missing[:5]}")
            rebuilt.append({**settings, "params": [(n, lookup[n]) for n in group["names"]]})
        else:
            tensors = [p[1] if named else p for p in params[position : position + group["size"]]]
            if len(tensors) != group["size"]:
                raise ValueError(f"replay needs {group['size']} tensors for a group, got {len(tensors)}")
            rebuilt.append({**settings, "params": tensors})
            position += group["size"]
    for group in rebuilt:
        for p in group["params"]:
            tensor = p[1] if isinstance(p, tuple) else p
            if not isinstance(tensor, torch.Tensor):
                raise TypeError("replay expects tensors or (name, tensor) pairs")
    return rebuilt
