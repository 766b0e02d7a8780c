"""The trajectory of a zeroth-order run: a few bytes per step, from which the weights are rebuilt bitwise.

A ZO update is determined by the step's seed, its projected gradients (one float per direction), the
learning rates and perturbation scales; with the initial weights they reproduce the whole run (MeZO,
section 2). The file format is a JSON header line followed by fixed-size little-endian binary records::

    step: u64 | step_key: u64 | scale: f64 | grads: q x f64 | lrs: n_groups x f64 | eps: n_groups x f64
    | extras: k x f64

``k`` (rule-specific scalars, e.g. a curvature estimate) is given by the header's ``record_extras``. 10k
steps with q = 1 and one group take 480 kB. Files of the first format (no ``eps``/``extras``: every group
used the header's ``eps``) are still read.
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

MAGIC = "hdopt-zo-trajectory/2"
MAGIC_V1 = "hdopt-zo-trajectory/1"


@dataclass(frozen=True)
class UpdateRecord:
    """One applied update: ``theta_g <- rule(theta_g, ghat_g)`` for every param group ``g``.

    ``ghat_g = scale/q * sum_i grads[i] * (eps[0]/eps[g]) * z_i``: ``grads`` are the projected gradients
    in units of the first group's perturbation scale (with one eps for all groups, the usual SPSA
    ``(L(theta + eps z) - L(theta - eps z)) / (2 eps)``). ``extras`` holds a rule's own per-step scalars.
    """

    step: int
    step_key: int
    grads: tuple[float, ...]
    lrs: tuple[float, ...]
    scale: float = 1.0
    eps: tuple[float, ...] = ()
    extras: tuple[float, ...] = ()

    def group_coefficients(self, q: int) -> list[list[float]]:
        """``coefs[g][i]``: the factor of direction ``i`` in group ``g``'s ``ghat`` (``scale/q * grad_i``,
        times the eps ratio; bitwise ``scale * grad_i / q`` when the groups share eps)."""
        eps = self.eps or (1.0,) * len(self.lrs)
        return [[self.scale * g * (eps[0] / e) / q for g in self.grads] for e in eps]


def _record_format(q: int, n_groups: int, extras: int = 0, version: int = 2) -> struct.Struct:
    if version == 1:
        return struct.Struct(f"<QQd{q}d{n_groups}d")
    return struct.Struct(f"<QQd{q}d{n_groups}d{n_groups}d{extras}d")


class Trajectory:
    """In-memory list of :class:`UpdateRecord` with atomic save / load and a compact binary form."""

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

    def pack(self, q: int, n_groups: int, extras: int = 0) -> bytes:
        """The records as the file's binary body."""
        fmt = _record_format(q, n_groups, extras)
        blob = bytearray()
        for r in self.records:
            shape = (len(r.grads), len(r.lrs), len(r.eps), len(r.extras))
            if shape != (q, n_groups, n_groups, extras):
                raise ValueError(
                    f"record of step {r.step} does not match q={q}, groups={n_groups}, extras={extras}"
                )
            blob += fmt.pack(r.step, r.step_key, r.scale, *r.grads, *r.lrs, *r.eps, *r.extras)
        return bytes(blob)

    @staticmethod
    def unpack(body: bytes, q: int, n_groups: int, extras: int = 0, *, where: str = "trajectory",
               version: int = 2, eps: tuple[float, ...] = ()) -> Trajectory:  # fmt: skip
        """Inverse of :meth:`pack` (``version=1`` reads the first format, filling ``eps``)."""
        fmt = _record_format(q, n_groups, extras, version)
        if len(body) % fmt.size:
            raise ValueError(f"{where} is truncated: {len(body)} bytes is not a whole number of records")
        records = []
        for fields in fmt.iter_unpack(body):
            step, key, scale = fields[:3]
            grads, lrs = fields[3 : 3 + q], fields[3 + q : 3 + q + n_groups]
            rest = fields[3 + q + n_groups :]
            rec_eps = tuple(rest[:n_groups]) if version == 2 else tuple(eps)
            records.append(UpdateRecord(step, key, tuple(grads), tuple(lrs), scale, rec_eps,
                                        tuple(rest[n_groups:]) if version == 2 else ()))  # fmt: skip
        return Trajectory(records)

    def save(self, path: str | os.PathLike, header: dict) -> None:
        """Write header + records to ``path`` atomically (a crash leaves the previous file intact)."""
        q, n_groups = header["config"]["q"], len(header["groups"])
        body = self.pack(q, n_groups, header.get("record_extras", 0))
        head = json.dumps({"format": MAGIC, **{k: v for k, v in header.items() if k != "format"}})
        atomic_write_bytes(Path(path), head.encode() + b"\n" + body)

    @staticmethod
    def load(path: str | os.PathLike) -> tuple[dict, Trajectory]:
        """Read a file written by :meth:`save`: returns (header, trajectory)."""
        data = Path(path).read_bytes()
        newline = data.find(b"\n")
        try:
            header = json.loads(data[:newline])
        except (ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{path} is not an hdopt trajectory file (bad header: {err})") from None
        if not isinstance(header, dict) or header.get("format") not in (MAGIC, MAGIC_V1):
            found = header.get("format") if isinstance(header, dict) else None
            raise ValueError(f"{path} is not an hdopt trajectory file (format {found!r})")
        q, n_groups = header["config"]["q"], len(header["groups"])
        version = 2 if header["format"] == MAGIC else 1
        eps = tuple(g["settings"].get("eps", header["config"].get("eps")) for g in header["groups"])
        trajectory = Trajectory.unpack(data[newline + 1 :], q, n_groups, header.get("record_extras", 0),
                                       where=str(path), version=version, eps=eps)  # fmt: skip
        return header, trajectory


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
    from hdopt.zo.registry import optimizer_class

    header, log = Trajectory.load(trajectory) if isinstance(trajectory, (str, os.PathLike)) else trajectory
    cls = optimizer_class(header["optimizer"])
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
        for key, value in settings.items():  # JSON turns tuples (betas) into lists
            if isinstance(value, list):
                settings[key] = tuple(value)
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
