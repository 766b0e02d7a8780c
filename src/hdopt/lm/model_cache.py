"""A fast-loading copy of a transformers fast tokenizer, kept beside a converted model.

``AutoTokenizer.from_pretrained`` on Gemma-3's 33 MB, 262k-entry ``tokenizer.json`` takes ~4 s on a
2-core CPU: Python's ``json`` parses the file twice, ``GemmaTokenizer`` copies the vocabulary and 515k
merges through Python objects and rebuilds the ``tokenizers`` backend from them.
:func:`save_fast_tokenizer` stores what that load produced, in one file (``hdopt-tokenizer.bin``):

- for a BPE backend, its vocabulary as one UTF-8 string (tokens in id order, joined by a control character
  that occurs in no token) and its merges likewise (left, right, left, right... in rank order); any other
  backend as its ``tokenizers`` JSON;
- the backend minus vocabulary, merges and added tokens (normalizer, pre-tokenizer, post-processor,
  decoder, padding, truncation) as ``tokenizers`` JSON, and the added tokens;
- the Python object's attributes (special tokens, ``init_kwargs``, padding side, chat template...), JSON
  with tags for tuples, non-string dict keys and ``AddedToken``s;
- the transformers and tokenizers versions that wrote it, and the sizes and modification times of the
  tokenizer files it was made from.

:func:`load_fast_tokenizer` rebuilds the backend with ``tokenizers.models.BPE(vocab, merges)`` and restores
the object's attributes without running its ``__init__`` (which would rebuild the backend again). The
file is only kept when the rebuilt tokenizer equals the original one (same class and attributes, same
backend serialisation; else the JSON layout is tried), and it is refused (:class:`FastTokenizerError`) when
it was written by other library versions, when the tokenizer files have changed since, or when it is
damaged, so that a caller falls back to ``from_pretrained`` and writes a new one.
"""

from __future__ import annotations

import gc
import importlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hdopt.io import atomic_path

FAST_TOKENIZER_FILE = "hdopt-tokenizer.bin"
# files AutoTokenizer may read: the fast file is stale once one of them changes (size or modification time)
SOURCE_PATTERNS = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template*", "vocab*",
                   "merges.txt", "config.json")  # fmt: skip
MAGIC = b"HDOPT-TOKENIZER\n"
FORMAT = 1
_HEADER = struct.Struct("<16sIQ")  # magic, format, length of the JSON metadata
_BIG_ATTRS = {"vocab": "__vocab__", "merges": "__merges__"}  # attributes sharing the backend's big tables


class FastTokenizerError(RuntimeError):
    """The fast tokenizer file is missing, stale (other library versions, edited sources) or damaged."""


def _sources(folder: Path) -> dict[str, list[int]]:
    """``{file name: [size, modification time in ns]}`` of the tokenizer files in ``folder``."""
    found = {p for pattern in SOURCE_PATTERNS for p in folder.glob(pattern) if p.is_file()}
    return {p.name: [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(found)}


def _versions() -> dict[str, str]:
    import tokenizers
    import transformers

    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__}


# --- the Python object's attributes as tagged JSON ---


def _encode(value: Any, big: dict[str, Any]) -> Any:
    from tokenizers import AddedToken

    for name, table in big.items():
        if table and type(value) is type(table) and value == table:
            return {_BIG_ATTRS[name]: True}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, AddedToken):
        return {"__added_token__": value.__getstate__()}
    if isinstance(value, list):
        return [_encode(v, big) for v in value]
    if isinstance(value, tuple):
        return {"__tuple__": [_encode(v, big) for v in value]}
    if isinstance(value, dict):
        return {"__dict__": [[_encode(k, big), _encode(v, big)] for k, v in value.items()]}
    raise TypeError(f"cannot store a {type(value).__name__} attribute in the fast tokenizer file")


def _decode(value: Any, big: dict[str, Any]) -> Any:
    from tokenizers import AddedToken

    if isinstance(value, list):
        return [_decode(v, big) for v in value]
    if not isinstance(value, dict):
        return value
    (tag, body), *rest = value.items()
    if rest:
        raise FastTokenizerError(f"unknown attribute encoding {sorted(value)}")
    if tag == "__added_token__":
        return AddedToken(**body)
    if tag == "__tuple__":
        return tuple(_decode(v, big) for v in body)
    if tag == "__dict__":
        return {_decode(k, big): _decode(v, big) for k, v in body}
    for name, marker in _BIG_ATTRS.items():
        if tag == marker:
            return big[name]
    raise FastTokenizerError(f"unknown attribute tag {tag!r}")


# --- the backend ---


def _split_bpe(full: dict) -> tuple[dict, list[str], list[tuple[str, str]]] | None:
    """``(skeleton, tokens, merges)`` of a serialised BPE backend with ids 0..n-1, else None."""
    model = full.get("model", {})
    if model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        return None
    vocab: dict[str, int] = model["vocab"]
    tokens = sorted(vocab, key=vocab.__getitem__)
    if not tokens or [vocab[t] for t in tokens] != list(range(len(tokens))):
        return None
    merges = []
    for merge in model.get("merges", []):
        pair = merge.split(" ") if isinstance(merge, str) else merge
        if len(pair) != 2 or pair[0] not in vocab or pair[1] not in vocab:
            return None
        merges.append((pair[0], pair[1]))
    skeleton = {**full, "added_tokens": [], "model": {**model, "vocab": {}, "merges": []}}
    return skeleton, tokens, merges


def _separator(tokens: list[str]) -> str | None:
    text = "".join(tokens)
    return next((chr(c) for c in range(1, 32) if chr(c) not in text), None)


def _build_bpe(meta: dict, tokens: list[str], merges: list[tuple[str, str]]):
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import BPE

    backend = Tokenizer.from_str(meta["skeleton"])
    model = json.loads(meta["skeleton"])["model"]
    params = {k: v for k, v in model.items() if k not in {"type", "vocab", "merges"} and v is not None}
    vocab = dict(zip(tokens, range(len(tokens)), strict=True))
    backend.model = BPE(vocab=vocab, merges=merges, **params)
    added = [AddedToken(**{k: v for k, v in t.items() if k != "id"}) for t in meta["added_tokens"]]
    backend.add_tokens(added)
    return backend, vocab


def _read(path: Path) -> tuple[dict, memoryview]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FastTokenizerError(f"{path.name} is missing") from None
    if len(data) < _HEADER.size:
        raise FastTokenizerError(f"{path.name} is truncated")
    magic, fmt, meta_len = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise FastTokenizerError(f"{path.name} is not an hdopt tokenizer file")
    if fmt != FORMAT:
        raise FastTokenizerError(f"{path.name} has format {fmt}, this hdopt reads format {FORMAT}")
    if len(data) < _HEADER.size + meta_len:
        raise FastTokenizerError(f"{path.name} is truncated (in its metadata)")
    try:
        meta = json.loads(bytes(data[_HEADER.size : _HEADER.size + meta_len]))
    except ValueError as error:
        raise FastTokenizerError(f"{path.name} has unreadable metadata ({error})") from None
    body = memoryview(data)[_HEADER.size + meta_len :]
    if len(body) != meta.get("body_bytes"):
        raise FastTokenizerError(f"{path.name} is truncated ({len(body)} of {meta.get('body_bytes')} bytes)")
    return meta, body


def _rebuild(meta: dict, body: memoryview) -> tuple[type, dict, Any]:
    """``(class, attributes, backend)`` from a file's metadata and body."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerBase

    big: dict[str, Any] = {"vocab": None, "merges": None}
    if meta["kind"] == "bpe":
        tokens_bytes = meta["tokens_bytes"]
        tokens = bytes(body[:tokens_bytes]).decode("utf-8").split(meta["separator"])
        # the merges' own copies of the strings, in merge order: BPE() reads them faster than shared ones
        text = bytes(body[tokens_bytes:]).decode("utf-8")
        sides = iter(text.split(meta["separator"]) if meta["merges"] else ())
        merges = list(zip(sides, sides, strict=True))
        if len(tokens) != meta["tokens"] or len(merges) != meta["merges"]:
            raise FastTokenizerError(f"{FAST_TOKENIZER_FILE} holds the wrong number of tokens or merges")
        backend, big["vocab"] = _build_bpe(meta, tokens, merges)
        big["merges"] = merges
    else:
        backend = Tokenizer.from_str(bytes(body).decode("utf-8"))
    backend.encode_special_tokens = meta["encode_special_tokens"]
    module, _, name = meta["class"].rpartition(".")
    cls = getattr(importlib.import_module(module), name) if module.startswith("transformers.") else None
    if not (isinstance(cls, type) and issubclass(cls, PreTrainedTokenizerBase)):
        raise FastTokenizerError(f"{FAST_TOKENIZER_FILE} names {meta['class']}, not a transformers tokenizer")
    return cls, _decode(meta["state"], big), backend


def load_fast_tokenizer(folder: str | os.PathLike):
    """The tokenizer stored in ``folder`` by :func:`save_fast_tokenizer`.

    Raises :class:`FastTokenizerError` when the file is missing, stale or damaged.
    """
    folder = Path(folder)
    meta, body = _read(folder / FAST_TOKENIZER_FILE)
    if meta.get("versions") != _versions():
        raise FastTokenizerError(
            f"{FAST_TOKENIZER_FILE} was written with {meta.get('versions')}, this process has {_versions()}"
        )
    if meta.get("sources") != _sources(folder):
        raise FastTokenizerError(f"the tokenizer files changed after {FAST_TOKENIZER_FILE} was written")
    collecting = gc.isenabled()
    gc.disable()  # a million new tuples and strings, none of them garbage: the collector would only slow it
    try:
        cls, state, backend = _rebuild(meta, body)
    except FastTokenizerError:
        raise
    except Exception as error:  # a damaged file can fail anywhere in the rebuild
        reason = f"{type(error).__name__}: {error}"
        raise FastTokenizerError(f"{FAST_TOKENIZER_FILE} cannot be rebuilt ({reason})") from None
    finally:
        if collecting:
            gc.enable()
    tokenizer = cls.__new__(cls)  # __init__ would rebuild the backend from scratch: restore the state instead
    tokenizer.__dict__.update(state)
    tokenizer._tokenizer = backend
    if tokenizer.__dict__.get("name_or_path") == meta["folder"]:  # the cache folder may have moved
        tokenizer.name_or_path = str(folder)
        if tokenizer.init_kwargs.get("name_or_path") == meta["folder"]:
            tokenizer.init_kwargs["name_or_path"] = str(folder)
    return tokenizer


def tokenizer_differences(a, b) -> list[str]:
    """What differs between two transformers fast tokenizers (class, attributes, backend); empty if equal."""
    found = [] if type(a) is type(b) else [f"class {type(a).__name__} != {type(b).__name__}"]
    missing = object()
    for key in sorted((a.__dict__.keys() | b.__dict__.keys()) - {"_tokenizer"}):
        if a.__dict__.get(key, missing) != b.__dict__.get(key, missing):
            found.append(f"attribute {key}")
    backend_a, backend_b = a.backend_tokenizer, b.backend_tokenizer
    if backend_a.to_str() != backend_b.to_str():
        found.append("backend serialisation")
    if backend_a.encode_special_tokens != backend_b.encode_special_tokens:
        found.append("backend encode_special_tokens")
    if backend_a.get_added_tokens_decoder() != backend_b.get_added_tokens_decoder():
        found.append("backend added tokens")
    return found


def _layouts(backend) -> Iterator[tuple[dict, bytes, dict]]:
    """``(metadata, body, big tables)`` to try in turn: BPE tables when possible, then the backend's JSON."""
    full = json.loads(backend.to_str())
    split = _split_bpe(full)
    separator = _separator(split[1]) if split else None
    if split and separator:
        skeleton, tokens, merges = split
        text = separator.join(tokens).encode("utf-8")
        body = text + separator.join(side for pair in merges for side in pair).encode("utf-8")
        meta = {"kind": "bpe", "skeleton": json.dumps(skeleton), "added_tokens": full["added_tokens"]}
        meta.update(separator=separator, tokens=len(tokens), merges=len(merges), tokens_bytes=len(text))
        yield meta, body, {"vocab": {t: i for i, t in enumerate(tokens)}, "merges": merges}
    yield {"kind": "json"}, backend.to_str().encode("utf-8"), {"vocab": None, "merges": None}


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _write(target: Path, meta: dict, body: bytes) -> None:
    header = json.dumps(meta).encode("ascii")
    with atomic_path(target) as tmp, open(tmp, "wb") as out:
        out.write(_HEADER.pack(MAGIC, FORMAT, len(header)))
        out.write(header)
        out.write(body)


def save_fast_tokenizer(tokenizer, folder: str | os.PathLike) -> Path:
    """Write ``folder/hdopt-tokenizer.bin`` for ``tokenizer`` (atomically) and check that it reloads equal.

    Raises ``TypeError`` for a tokenizer that is not a transformers fast tokenizer or has an attribute this
    format cannot hold, and ``ValueError`` (leaving no file) when no layout reloads an equal tokenizer.
    """
    from tokenizers import Tokenizer

    folder = Path(folder)
    backend = getattr(tokenizer, "_tokenizer", None)
    if not isinstance(backend, Tokenizer):
        raise TypeError(f"{type(tokenizer).__name__} has no tokenizers backend to store")
    state = {k: v for k, v in tokenizer.__dict__.items() if k != "_tokenizer"}
    base = {"versions": _versions(), "folder": str(folder), "class": _qualified(type(tokenizer))}
    base["sources"] = _sources(folder)  # (before writing: the fast file's own name is not a source)
    base["encode_special_tokens"] = backend.encode_special_tokens
    target, problems = folder / FAST_TOKENIZER_FILE, []
    for layout, body, big in _layouts(backend):
        _write(target, {**base, **layout, "state": _encode(state, big), "body_bytes": len(body)}, body)
        try:
            differences = tokenizer_differences(load_fast_tokenizer(folder), tokenizer)
        except FastTokenizerError as error:
            differences = [str(error)]
        if not differences:
            return target
        target.unlink()
        problems.append(f"{layout['kind']}: {', '.join(differences)}")
    raise ValueError(f"the stored tokenizer does not reload equal ({'; '.join(problems)})")
