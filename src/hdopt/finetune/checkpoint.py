"""Checkpoints as single safetensors files, written atomically.

A resume checkpoint holds the trainable weights (``weights/<name>``) and the training state
(``state/<path>``: optimizer and scheduler state, RNG state, loop counters). Tensors go into the
safetensors payload; the structure around them (dicts, lists, numbers) into the JSON metadata, so a
checkpoint loads without pickle.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save_file

from hdopt.io import atomic_path

WEIGHTS, STATE = "weights/", "state/"


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


def save_checkpoint(path: str | os.PathLike, params: list[tuple[str, torch.Tensor]], state: Any = None,
                    meta: dict | None = None) -> None:  # fmt: skip
    """Write weights (+ training state and JSON ``meta``) to one safetensors file, atomically."""
    tensors = {WEIGHTS + name: t for name, t in weights_of(params).items()}
    skeleton = flatten(state, tensors) if state is not None else None
    metadata = {"state": json.dumps(skeleton), "meta": json.dumps(meta or {})}
    with atomic_path(path) as tmp:  # streamed to the file (no second in-memory copy of the weights)
        save_file(tensors, tmp, metadata=metadata)


def _header(data: bytes) -> dict:
    return json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")]).get("__metadata__", {})


def checkpoint_meta(path: str | os.PathLike) -> dict:
    """The JSON ``meta`` of a checkpoint, reading only the file's header."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = f.read(size)
    return json.loads(json.loads(header).get("__metadata__", {}).get("meta", "{}"))


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any, dict]:
    """``(weights by name, training state or None, meta)`` from a file written by :func:`save_checkpoint`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    data = path.read_bytes()
    tensors = st_load(data)
    metadata = _header(data)
    weights = {k[len(WEIGHTS) :]: v for k, v in tensors.items() if k.startswith(WEIGHTS)}
    state = unflatten(json.loads(metadata.get("state", "null")), tensors)
    return weights, state, json.loads(metadata.get("meta", "{}"))


@torch.no_grad()
def load_weights(params: list[tuple[str, torch.Tensor]], weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` into the named parameters (every name must match)."""
    names = {name for name, _ in params}
    missing, extra = names - set(weights), set(weights) - names
    if missing or extra:
        raise ValueError(
            f"checkpoint does not match the model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(extra)[:5]}"
        )
    for name, p in params:
        p.copy_(weights[name].to(device=p.device, dtype=p.dtype))
