"""Checkpoints as single safetensors files, written atomically, carrying a checksum of their content.

A resume checkpoint holds the trainable weights (``weights/<name>``) and the training state
(``state/<path>``: optimizer and scheduler state, RNG state, loop counters). Tensors go into the
safetensors payload; the structure around them (dicts, lists, numbers) into the JSON metadata, so a
checkpoint loads without pickle.

Every file also records ``sha256``: a digest of every tensor (name, dtype, shape, bytes, in name order)
and of the metadata. :func:`load_checkpoint` recomputes it and raises :class:`RunFolderError` naming the
file when one byte differs; a truncated or foreign file is reported the same way, never as a library
traceback. Files written before checksums existed (no ``sha256``, no ``format``) load unverified.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hdopt.finetune.errors import RunFolderError
from hdopt.io import atomic_path

WEIGHTS, STATE = "weights/", "state/"
FORMAT = "hdopt-checkpoint/2"  # files with a checksum


def flatten(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """Replace every tensor in ``obj`` by a reference into ``tensors``; returns a JSON-able skeleton."""
    if isinstance(obj, torch.Tensor):
        key = f"{STATE}{path}"
        tensors[key] = obj.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        return {"__dict__": [[k, flatten(v, tensors, f"{path}/{k}")] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} at {path or '/'}")


def unflatten(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
        return {k: unflatten(v, tensors) for k, v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def weights_of(params: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {name: p.detach().cpu().contiguous() for name, p in params}


def update_digest(digest, name: str, tensor: torch.Tensor) -> None:
    """Add ``tensor`` (its name, dtype, shape and bytes) to a hashlib digest, without copying it on a CPU."""
    t = tensor.detach()
    digest.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
    if t.numel():
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def tensors_digest(named: list[tuple[str, torch.Tensor]] | dict[str, torch.Tensor]) -> str:
    """sha256 of named tensors, in name order (bitwise identity of weights, e.g. the start of a run)."""
    items = sorted(named.items() if isinstance(named, dict) else named, key=lambda kv: kv[0])
    digest = hashlib.sha256()
    for name, t in items:
        update_digest(digest, name, t)
    return digest.hexdigest()


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of every parameter and buffer of ``model`` (a run's starting model, adapters attached)."""
    return tensors_digest(list(model.named_parameters()) + list(model.named_buffers()))


def _file_digest(tensors, metadata: dict[str, str]) -> str:
    """sha256 of a file's metadata and tensors (``tensors``: a mapping, or a ``safe_open`` handle whose
    tensors are read one at a time)."""
    digest = hashlib.sha256()
    for key in sorted(metadata):
        digest.update(f"{key}\0{metadata[key]}\0".encode())
    for name in sorted(tensors.keys()):
        update_digest(digest, name, tensors[name] if isinstance(tensors, dict) else tensors.get_tensor(name))
    return digest.hexdigest()


def save_checkpoint(path: str | os.PathLike, params: list[tuple[str, torch.Tensor]], state: Any = None,
                    meta: dict | None = None) -> None:  # fmt: skip
    """Write weights (+ training state and JSON ``meta``) to one safetensors file, atomically."""
    tensors = {WEIGHTS + name: t for name, t in weights_of(params).items()}
    skeleton = flatten(state, tensors) if state is not None else None
    metadata = {"state": json.dumps(skeleton), "meta": json.dumps(meta or {}), "format": FORMAT}
    metadata["sha256"] = _file_digest(tensors, metadata)
    with atomic_path(path) as tmp:  # streamed to the file (no second in-memory copy of the weights)
        save_file(tensors, tmp, metadata=metadata)


def _damaged(path: Path, why: str) -> RunFolderError:
    return RunFolderError(f"{path} is damaged ({why}); it cannot be used")


def _header(path: Path) -> dict:
    """The safetensors header's metadata (reads the first bytes only)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            if not 0 < size <= os.path.getsize(path) - 8:
                raise ValueError(f"a header of {size} bytes")
            header = json.loads(f.read(size))
        metadata = header.get("__metadata__") or {}
        if not isinstance(metadata, dict):
            raise ValueError("no metadata")
        return metadata
    except (ValueError, UnicodeDecodeError, AttributeError) as err:
        raise _damaged(path, f"not a safetensors file: {err}") from None


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON ``meta`` of a checkpoint, reading only the file's header (not verified)."""
    path = Path(path)
    header = _header(path)
    try:
        return json.loads(header.get("meta", "{}"))
    except ValueError as err:
        raise _damaged(path, f"bad metadata: {err}") from None


def _read(path: Path, weights: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors (without ``weights/``: the state only) and the metadata of ``path``, checked against its
    checksum; without the weights, they are read one at a time for the check (one tensor in memory)."""
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    metadata = _header(path)
    expected = metadata.get("sha256")
    body = {k: v for k, v in metadata.items() if k != "sha256"}
    checked = expected is not None or metadata.get("format") is not None
    try:
        with safe_open(str(path), framework="pt") as f:
            keep = [k for k in f.keys() if weights or not k.startswith(WEIGHTS)]  # noqa: SIM118
            tensors = {k: f.get_tensor(k) for k in keep}
            ok = not checked or expected == _file_digest(tensors if weights else f, body)
    except Exception as err:  # noqa: BLE001 - safetensors raises SafetensorError, OverflowError, ...
        raise _damaged(path, f"unreadable: {type(err).__name__}: {err}") from None
    if not ok:
        raise _damaged(path, "its content does not match its checksum")
    return tensors, metadata


def load_checkpoint(path: str | os.PathLike, weights: bool = True) -> tuple[dict[str, torch.Tensor], Any,
                                                                           dict]:  # fmt: skip
    """``(weights by name, training state or None, meta)`` from a file written by :func:`save_checkpoint`;
    a damaged file raises :class:`RunFolderError` naming it. ``weights=False`` leaves the weights on disk
    (``{}``; :func:`load_weights_from` copies them into a model one tensor at a time)."""
    path = Path(path)
    tensors, metadata = _read(path, weights)
    try:
        state = unflatten(json.loads(metadata.get("state", "null")), tensors)
        meta = json.loads(metadata.get("meta", "{}"))
    except (ValueError, KeyError, TypeError) as err:
        raise _damaged(path, f"bad metadata: {err}") from None
    weights = {k[len(WEIGHTS) :]: v for k, v in tensors.items() if k.startswith(WEIGHTS)}
    return weights, state, meta


def verify(path: str | os.PathLike) -> None:
    """Raise :class:`RunFolderError` when ``path`` does not match its checksum (reads every tensor)."""
    _read(Path(path))


@torch.no_grad()
def load_weights_from(path: str | os.PathLike, params: list[tuple[str, torch.Tensor]]) -> None:
    """Copy a checked checkpoint's weights into the named parameters, one tensor at a time (no second copy
    of the model in memory)."""
    path = Path(path)
    _read(path, weights=False)  # the checksum, one tensor at a time
    with safe_open(str(path), framework="pt") as f:
        stored = {k[len(WEIGHTS) :] for k in f.keys() if k.startswith(WEIGHTS)}  # noqa: SIM118
        _check_names(params, stored)
        for name, p in params:
            p.copy_(f.get_tensor(WEIGHTS + name).to(device=p.device, dtype=p.dtype))


def _check_names(params: list[tuple[str, torch.Tensor]], stored: set[str]) -> None:
    names = {name for name, _ in params}
    missing, extra = names - stored, stored - names
    if missing or extra:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )


@torch.no_grad()
def load_weights(params: list[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the named parameters (every name must match)."""
    _check_names(params, set(weights))
    for name, p in params:
        p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
