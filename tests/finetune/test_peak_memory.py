"""The memory benchmark's probe (benchmarks/finetune.py memory): every mode runs and trains what it says."""

from __future__ import annotations

import pytest

from hdopt.finetune.peak_memory import MODES, probe
from tests.finetune.conftest import make_model


def test_every_mode_runs_and_counts_its_trainable_parameters(model_dir):
    total = sum(p.numel() for p in make_model("llama").parameters())
    rows = {mode: probe(str(model_dir), mode, batch=2, length=8) for mode in MODES}
    for mode, row in rows.items():
        assert row["mode"] == mode and row["device"] == "cpu" and row["peak_mib"] > 0
    assert rows["inference"]["trainable"] == rows["mezo"]["trainable"] == rows["ft"]["trainable"] == total
    assert 0 < rows["mezo-lora"]["trainable"] < total  # the adapters only
    config = make_model("llama").config
    per_layer = 2 * 5 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert rows["ft-prefix"]["trainable"] == config.num_hidden_layers * per_layer  # keys and values, 5 tokens


def test_an_unknown_mode_is_refused(model_dir):
    with pytest.raises(ValueError, match="choose one of inference, mezo"):
        probe(str(model_dir), "lora", batch=2, length=8)
