"""The memory benchmark's probe (benchmarks/finetune.py memory): every mode runs and trains what it says."""

from __future__ import annotations

import pytest

from hdopt.finetune.peak_memory import MODES, measure, probe
from tests.finetune.conftest import make_model
from tests.lm.conftest import VOCAB


def test_every_mode_runs_and_counts_its_trainable_parameters(model_dir):
    total = sum(p.numel() for p in make_model("llama").parameters())
    batch, length = 1280, 32
    # every mode's forward writes float32 logits of batch x length x vocab: 40 MiB, above glibc's largest
    # mmap threshold (32 MiB), so they are fresh pages and the step's peak must exceed the loaded model by
    # them, less the fraction of a MiB the process may return meanwhile (measured once: 40.3 MiB above, for
    # 40.5 MiB of logits); a peak that missed the step's allocations would be short by all of them
    logits_mib = 0.95 * batch * length * VOCAB * 4 / 2**20
    # each mode in a fresh process, as the benchmark measures it: in pytest's own process the logits may
    # land in pages the process already holds (its heap after hundreds of tests), and the peak misses them
    rows = {mode: measure(str(model_dir), mode, batch=batch, length=length, threads=1) for mode in MODES}
    for mode, row in rows.items():
        assert row["mode"] == mode and row["device"] == "cpu"
        if row["peak_excludes_loading"]:
            assert row["peak_mib"] - row["loaded_mib"] >= logits_mib, row
    assert rows["inference"]["trainable"] == rows["mezo"]["trainable"] == rows["ft"]["trainable"] == total
    assert 0 < rows["mezo-lora"]["trainable"] < total  # the adapters only
    config = make_model("llama").config
    per_layer = 2 * 5 * config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    assert rows["ft-prefix"]["trainable"] == config.num_hidden_layers * per_layer  # keys and values, 5 tokens


def test_an_unknown_mode_is_refused(model_dir):
    with pytest.raises(ValueError, match="choose one of inference, mezo"):
        probe(str(model_dir), "lora", batch=2, length=8)
