"""--zo-blocks K: ZO on the top K blocks over cached bottom states is ZO on those blocks of the whole
model."""

from __future__ import annotations

import pytest
import torch

from hdopt.finetune import resume, rundir
from hdopt.finetune.batches import make_closure, step_indices
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.config import ConfigError
from hdopt.finetune.replay import compare_with_checkpoint, rebuild
from hdopt.finetune.trained import load_trained
from hdopt.finetune.trainer import LoopState, evaluate_examples, finetune, load_data, setup, train_loop
from hdopt.lm.tasks import resolve_task
from hdopt.lm.top_blocks import TopBlocksError
from hdopt.zo import ZOSGD
from tests.finetune.conftest import make_model, toy_config


def _deep_llama(layers=3):
    from transformers import AutoModelForCausalLM

    config = make_model("llama").config
    config.num_hidden_layers = layers
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).double().eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_top_block_steps_equal_whole_model_steps_on_the_same_parameters(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo", zo_blocks=1, lr=5e-2, eps=1e-3, q=2, steps=5,
                     eval_every=0, keep_best=False)  # fmt: skip
    s = setup(cfg, _deep_llama(), tokenizer)
    names = [n for n, _ in s.params]
    assert names and all(n.startswith("model.layers.2.") or n == "model.norm.weight" for n in names)
    train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path))

    whole = _deep_llama()
    params = dict(whole.named_parameters())
    for p in whole.parameters():
        p.requires_grad_(False)
    opt = ZOSGD([(n, params[n]) for n in names], lr=5e-2, eps=1e-3, q=2, seed=cfg.train.seed)
    for step in range(5):
        batch = [s.splits.train[i] for i in step_indices(len(s.splits.train), 8, cfg.train.seed, step)]
        opt.step(make_closure(whole, tokenizer, s.task, batch, "loss", 32, s.device))
    trained = _snapshot(s.model)
    for name, value in _snapshot(whole).items():
        assert torch.allclose(trained[name], value, rtol=0, atol=1e-9), name
    untouched = _deep_llama().state_dict()
    moved = [n for n in trained if not torch.equal(trained[n], untouched[n])]
    assert moved and all(n in names for n in moved)


def test_a_run_counts_k_over_l_forwards_reports_its_cache_and_replays_on_the_whole_model(
        task_file, tokenizer, tmp_path):  # fmt: skip
    cfg = toy_config(task_file, tmp_path / "run", "mezo", zo_blocks=1, lr=5e-2, eps=1e-3, q=2, steps=4,
                     eval_every=2)  # fmt: skip
    results, folder = finetune(cfg, _deep_llama(), tokenizer)
    assert results["forwards"] == pytest.approx(4 * 2 * 2 / 3)
    assert results["zo_blocks"] == 1 and results["blocks"] == 3 and results["cache_bytes"] > 0
    splits = load_data(cfg, resolve_task(cfg.data.task))
    distinct = {e.prompt for e in [*splits.train, *splits.dev]}
    assert results["cache_rows"] == 2 * len(distinct)  # byte tokens: a row per prompt and option prefix
    assert results["cache_forwards"] == pytest.approx(3 * 2 / 3)  # 24 rows in batches of 8, 2/3 of a forward
    _, params, steps = rebuild(folder, _deep_llama(), tokenizer)
    assert steps == 4 and all("layers.2." in n or n == "model.norm.weight" for n, _ in params)
    assert compare_with_checkpoint(params, folder / rundir.CHECKPOINT) == (True, 0.0)


def test_dev_accuracy_from_the_cache_is_the_whole_models(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo", zo_blocks=2, lr=5e-2, q=2, steps=3, eval_every=0)
    s = setup(cfg, _deep_llama(), tokenizer)
    train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path))
    cached = s.kind.evaluate(s.splits.dev)
    whole = s.evaluate(s.splits.dev)
    assert cached.metrics == whole.metrics
    assert [r["correct"] for r in cached.predictions] == [bool(r["correct"]) for r in whole.predictions]


def test_lora_adapters_of_the_top_blocks_only(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo-lora", zo_blocks=1, q=2, steps=2, eval_every=0)
    s = setup(cfg, _deep_llama(), tokenizer)
    assert s.params and all("layers.2." in n and "lora_" in n for n, _ in s.params)


@pytest.mark.parametrize("method, message",
                         [("ft", "forward passes only"), ("mezo-prefix", "'prefix' adapter")])  # fmt: skip
def test_methods_that_cannot_train_top_blocks_are_refused(method, message, task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, method, zo_blocks=1)
    with pytest.raises(ConfigError, match=message):
        setup(cfg, _deep_llama(), tokenizer)


def test_models_whose_body_adds_position_embeddings_are_refused(task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo", zo_blocks=1)
    with pytest.raises(TopBlocksError, match="position embeddings"):
        setup(cfg, make_model("gpt2"), tokenizer)


@pytest.mark.parametrize("optimizer", ["fzoo", "hizoo", "lozo", "sparse-mezo", "zoadam"])
def test_every_zo_rule_trains_the_top_block_and_replays_bitwise_on_the_whole_model(
        optimizer, task_file, tokenizer, tmp_path):  # fmt: skip
    cfg = toy_config(task_file, tmp_path / "run", "mezo", zo_blocks=1, optimizer=optimizer, lr=1e-2, eps=1e-3,
                     steps=3, eval_every=0, keep_best=False)  # fmt: skip
    start = _snapshot(_deep_llama())
    results, folder = finetune(cfg, _deep_llama(), tokenizer)
    assert results["steps"] == 3 and results["zo_blocks"] == 1
    model, params, steps = rebuild(folder, _deep_llama(), tokenizer)
    assert steps == 3 and all("layers.2." in n or n == "model.norm.weight" for n, _ in params)
    assert compare_with_checkpoint(params, folder / rundir.CHECKPOINT) == (True, 0.0)
    moved = [n for n, v in model.state_dict().items() if not torch.equal(v, start[n])]
    assert moved and all("layers.2." in n or n == "model.norm.weight" for n in moved)


class Killed(Exception):
    """Stands in for SIGKILL: leaves the loop without saving anything."""


def run_killed_and_resumed(cfg, tokenizer, tmp_path):
    """Run ``cfg(folder)`` on the deep Llama whole, and killed at step 3 then resumed; check that both end
    at the same weights (the checkpoints' sha256) and test accuracy. Returns the whole run and its folder."""
    full, folder = finetune(cfg(tmp_path / "full"), _deep_llama(), tokenizer)
    with pytest.raises(Killed):
        finetune(cfg(tmp_path / "killed"), _deep_llama(), tokenizer, on_step=_kill_at_3)
    resumed, _ = resume(tmp_path / "killed", _deep_llama(), tokenizer)
    digests = [load_checkpoint(f / rundir.CHECKPOINT)[2]["weights_sha256"]
               for f in (folder, tmp_path / "killed")]  # fmt: skip
    assert digests[0] == digests[1] and resumed["test"] == full["test"]
    return full, folder


def _kill_at_3(step: int) -> None:
    if step == 3:
        raise Killed


def test_a_top_block_run_folder_resumes_bitwise_and_rebuilds_its_best_weights(task_file, tokenizer, tmp_path):
    """Seeds, not weights: the checkpoint's and the best step's sha256 are of the top blocks' parameters,
    which resume and load_trained rebuild by replay on the whole model."""
    def cfg(out):
        return toy_config(task_file, out, "mezo", zo_blocks=1, lr=5e-2, eps=1e-3, q=2, steps=6, eval_every=2)

    full, folder = run_killed_and_resumed(cfg, tokenizer, tmp_path)
    model, _ = load_trained(folder, _deep_llama(), tokenizer)
    task = resolve_task(cfg(folder).data.task)
    test = evaluate_examples(model, tokenizer, task, cfg(folder), load_data(cfg(folder), task).eval)
    assert test.metrics["accuracy"] == full["test"]
