"""Fixtures for the finetune tests: tiny random causal LMs (Llama / GPT-2 / OPT / Gemma-3), a byte-level
tokenizer, a trivially learnable custom task (the label is the first word of the text), a multiple-choice
task with per-example options (COPA-like) and a generation task (SQuAD-like)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hdopt.finetune import RunConfig
from tests.lm.conftest import VOCAB, byte_tokenizer, tiny_model

FAMILIES = ("llama", "gpt2", "opt", "gemma3")
torch.set_num_threads(1)  # tiny matmuls: threads only contend (the CPU is shared)


def make_model(family: str):
    """A 2-layer, hidden-32 random model of ``family`` (seeded, eval mode).

    ``llama-tied`` is the tiny Llama with its LM head tied to the input embedding (as SmolLM2); the GPT-2,
    OPT and Gemma-3 configs tie them by default, ``llama`` does not.
    """
    if family == "llama-tied":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config).eval()
    if family != "opt":
        return tiny_model(family)
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, word_embed_proj_dim=32, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return OPTForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer(add_bos=True)


def _write_rows(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def _write_task(folder: Path, name: str, rows: list[dict], n_train: int, spec: str) -> Path:
    """train.jsonl (the first ``n_train`` rows), eval.jsonl (the rest) and ``name.yaml`` (``spec`` follows the
    name and data lines); returns the yaml path."""
    _write_rows(folder / "train.jsonl", rows[:n_train])
    _write_rows(folder / "eval.jsonl", rows[n_train:])
    path = folder / f"{name}.yaml"
    path.write_text(f"name: {name}\ndata: {{train: train.jsonl, eval: eval.jsonl}}\n{spec}", encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    """``toy``: "good ..." texts are labelled ' yes', "bad ..." texts ' no' (learnable from one token)."""
    folder = tmp_path_factory.mktemp("toy")
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]
    rows = [{"text": f"{'good' if i % 2 else 'bad'} {words[i % 8]}", "label": str(i % 2)} for i in range(64)]
    return _write_task(folder, "toy", rows, 48,
                       "template: '{text}:'\nlabel_column: label\nlabel_words: {'0': ' no', '1': ' yes'}\n")


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a local model folder (load_model accepts paths)."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def qa_task(tmp_path_factory) -> Path:
    """``qa``: a generation task (question "say ab", answer "ab"), scored by F1 / exact match."""
    folder = tmp_path_factory.mktemp("qa")
    rows = [{"q": f"say {w}", "a": w} for w in ["ab", "cd", "ef", "gh"] * 6]
    return _write_task(folder, "qa", rows, 16, "template: 'Q: {q}\\nA:'\ntarget_column: a\nmetric: f1\n")


@pytest.fixture(scope="session")
def choice_task(tmp_path_factory) -> Path:
    """``choice``: COPA-like multiple choice with per-example options (no fixed label words); the gold
    option is always " yes", against a varying distractor (learnable by the LM head alone)."""
    folder = tmp_path_factory.mktemp("choice")
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]
    distractors = [" no", " nope", " never", " none"]
    rows = []
    for i in range(48):
        options = [" yes", distractors[i % 4]] if i % 2 else [distractors[i % 4], " yes"]
        rows.append({"text": f"is {words[i % 8]} ok? so", "options": options, "label": 1 - i % 2})
    return _write_task(folder, "choice", rows, 32,
                       "template: '{text}'\noptions_column: options\nlabel_column: label\n")


def toy_config(task_file: Path, out: Path, method: str, **overrides) -> RunConfig:
    """A small run on the toy task: 16 train / 8 dev / 8 test examples, batch 8, no progress bar."""
    base = dict(
        task=str(task_file), method=method, num_train=16, num_dev=8, num_eval=8, max_length=32,
        steps=6, batch_size=8, eval_every=3, output_dir=str(out), progress=False, eval_batch_size=8,
    )  # fmt: skip
    base.update(overrides)
    return RunConfig().replace(**base)


def reloaded_test_accuracy(model, tokenizer, cfg: RunConfig) -> float:
    """The test accuracy of ``model`` (a run's weights, reloaded) on the run's test split."""
    from hdopt.finetune.trainer import evaluate_examples, load_data
    from hdopt.lm.tasks import resolve_task

    task = resolve_task(cfg.data.task)
    return evaluate_examples(model, tokenizer, task, cfg, load_data(cfg, task).eval).metrics["accuracy"]


def loss_before_and_after(cfg: RunConfig, model, tokenizer, steps: int, batch_of) -> tuple[float, float]:
    """The unperturbed training loss over the whole train split before and after ``steps`` of the run's
    kind, step t on the examples ``batch_of(train, t)``."""
    from hdopt.finetune.trainer import setup

    s = setup(cfg, model, tokenizer)
    micro = s.kind.closure(s.splits.train)
    before = float(micro())
    for step in range(steps):
        s.kind.step([s.kind.closure(batch_of(s.splits.train, step))])
    return before, float(micro())

