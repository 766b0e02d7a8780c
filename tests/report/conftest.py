"""Fixtures for the report tests: a tiny random Llama saved as a model folder, and one smoke report."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hdopt.report import Context, build_report
from tests.lm.conftest import byte_tokenizer

LABEL_WORDS = (" great", " terrible")  # single tokens, as TinT's label-token loss needs


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A 4-block, width-32 random Llama with a byte tokenizer (plus the label words as whole tokens)."""
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = byte_tokenizer(add_bos=True)
    tokenizer.add_tokens([AddedToken(w, normalized=False) for w in LABEL_WORDS])
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def smoke_report(tmp_path_factory, tiny_model_dir, shared_data):
    """``hdopt report --scale smoke`` on the tiny model (every section), built once for the module."""
    folder = tmp_path_factory.mktemp("report")
    ctx = Context("smoke", folder, str(tiny_model_dir), shared_data, seed=0, threads=1)
    index, sections = build_report(ctx, progress=False)
    return ctx, index, sections
