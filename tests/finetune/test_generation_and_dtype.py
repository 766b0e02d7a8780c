"""Generation tasks (answer loss, F1 objective) and half-precision runs."""

from __future__ import annotations

import pytest
import torch

from hdopt.finetune import finetune, rundir
from tests.finetune.conftest import make_model, toy_config


@pytest.mark.parametrize("objective", ["loss", "f1"])
def test_zo_on_a_generation_task(objective, qa_task, tokenizer, tmp_path):
    cfg = toy_config(qa_task, tmp_path, "mezo-lora", steps=2, eval_every=0, num_dev=4, num_eval=4,
                     batch_size=4, objective=objective, lr=1e-2)  # fmt: skip
    results, _ = finetune(cfg, make_model("llama"), tokenizer)
    assert results["metric"] == "f1" and 0.0 <= results["test"] <= 100.0
    losses = [r["loss"] for r in rundir.read_metrics(tmp_path) if "loss" in r]
    assert all(v <= 0.0 for v in losses) if objective == "f1" else all(v > 0.0 for v in losses)


def test_f1_objective_refuses_classification_tasks(task_file, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="--objective accuracy"):
        finetune(toy_config(task_file, tmp_path, "mezo", objective="f1"), make_model("llama"), tokenizer)


@pytest.mark.parametrize("method", ["mezo", "ft"])
def test_bfloat16_runs(method, task_file, tokenizer, tmp_path):
    model = make_model("llama").to(torch.bfloat16)
    cfg = toy_config(task_file, tmp_path, method, steps=3, eval_every=0, lr=1e-2)
    results, folder = finetune(cfg, model, tokenizer)
    assert results["status"] == "completed"
    changed = [n for n, p in model.named_parameters() if p.dtype == torch.bfloat16]
    assert changed and all(torch.isfinite(p).all() for p in model.parameters())
