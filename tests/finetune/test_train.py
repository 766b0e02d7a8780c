"""Every method trains through the same trainer: the loss goes down, and only what should change changes."""

from __future__ import annotations

import pytest
import torch

from hdopt.finetune import rundir
from hdopt.finetune.batches import make_closure
from hdopt.finetune.trainer import LoopState, setup, train_loop
from tests.finetune.conftest import FAMILIES, make_model, toy_config

# (method, overrides) that learn the toy task in 40 steps
LEARNS = [
    ("mezo", dict(lr=2e-2, eps=1e-3, q=4)),
    ("mezo-lora", dict(lr=0.2, eps=1e-2, q=4)),
    ("mezo-prefix", dict(lr=30.0, eps=1e-1, q=4)),  # the prefix barely moves a random model
    ("ft", dict(lr=1e-2)),
    ("ft-lora", dict(lr=2e-2)),
    ("ft-prefix", dict(lr=5e-2)),
]


def train_set_loss(s) -> float:
    closure = make_closure(s.model, s.tokenizer, s.task, s.splits.train, "loss", 32, s.device)
    with torch.no_grad():
        return float(closure())


def run_steps(cfg, model, tokenizer, folder):
    s = setup(cfg, model, tokenizer)
    before = train_set_loss(s)
    log = rundir.MetricsLog(folder)
    assert train_loop(s, LoopState(), folder, log) == "completed"
    s.model.eval()
    return s, before, train_set_loss(s)


@pytest.mark.parametrize("method, overrides", LEARNS, ids=[m for m, _ in LEARNS])
def test_loss_decreases(method, overrides, task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, method, steps=40, eval_every=0, keep_best=False, **overrides)
    s, before, after = run_steps(cfg, make_model("llama"), tokenizer, tmp_path)
    assert after < before - 0.02, (before, after)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["mezo", "mezo-lora", "mezo-prefix"])
def test_zo_with_lr_zero_leaves_weights_unchanged(method, task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, method, steps=3, eval_every=0, lr=0.0)
    s = setup(cfg, make_model("llama"), tokenizer)
    before = _snapshot(s.model)
    train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path))
    after = _snapshot(s.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert len(s.optimizer.trajectory) == 3


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["mezo-lora", "ft-lora", "mezo-prefix", "ft-prefix"])
def test_peft_methods_change_only_their_parameters(method, family, task_file, tokenizer, tmp_path):
    lr = {"mezo-lora": 0.1, "ft-lora": 1e-2, "mezo-prefix": 0.1, "ft-prefix": 1e-2}[method]
    cfg = toy_config(task_file, tmp_path, method, steps=2, eval_every=0, lr=lr)
    s = setup(cfg, make_model(family), tokenizer)
    trainable = {name for name, _ in s.params}
    marker = "lora_" if "lora" in method else "prefix."
    assert trainable and all(marker in name for name in trainable)
    before = dict(s.model.named_parameters())
    before = {k: v.detach().clone() for k, v in before.items()}
    train_loop(s, LoopState(), tmp_path, rundir.MetricsLog(tmp_path))
    changed = {k for k, v in s.model.named_parameters() if not torch.equal(v, before[k])}
    assert changed and changed <= trainable
    if "prefix" in method:
        assert changed == trainable  # keys and values of every layer move


def test_linear_probe_fits_the_toy_task(task_file, tokenizer, tmp_path):
    from hdopt.finetune import finetune

    cfg = toy_config(task_file, tmp_path, "lp", steps=None, eval_every=None)  # as the CLI leaves them
    results, folder = finetune(cfg, make_model("llama"), tokenizer)
    assert results["method"] == "lp" and results["status"] == "completed"
    assert results["test"] >= 75.0 and (folder / rundir.BEST).is_file()


def test_tensorboard_is_optional(task_file, tokenizer, tmp_path):
    from hdopt.finetune import finetune

    cfg = toy_config(task_file, tmp_path, "mezo", steps=1, eval_every=0, tensorboard=True)
    try:
        import torch.utils.tensorboard  # noqa: F401

        installed = True
    except ImportError:
        installed = False
    if installed:
        finetune(cfg, make_model("llama"), tokenizer)
        assert (tmp_path / "tensorboard").is_dir()
    else:
        with pytest.warns(UserWarning, match="tensorboard is not installed"):
            finetune(cfg, make_model("llama"), tokenizer)
    assert (tmp_path / rundir.RESULTS).is_file()
