"""Resume after a kill or Ctrl-C ends bitwise where an uninterrupted run ends; replay rebuilds ZO weights."""

from __future__ import annotations

import json
import os
import signal
import stat

import pytest
import torch

from hdopt.finetune import finetune, resume, rundir
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.config import ConfigError
from hdopt.finetune.replay import compare_with_checkpoint, rebuild
from tests.finetune.conftest import make_model, toy_config

CASES = [  # (method, family, overrides); GPT-2 has dropout, so ft also checks the RNG state
    ("mezo", "llama", dict(lr=1e-2, keep_weights=True)),  # ZO runs store weights only with keep_weights
    ("mezo-lora", "opt", dict(lr=0.1, optimizer="zoadam", grad_accum=2, keep_weights=True)),
    ("ft", "gpt2", dict(lr=1e-2)),
    ("ft-prefix", "llama", dict(lr=1e-2, schedule="linear")),
]


class Killed(Exception):
    """Stands in for SIGKILL: leaves the loop without saving anything."""


def _kill_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            raise Killed

    return hook


def _interrupt_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            signal.raise_signal(signal.SIGINT)  # as Ctrl-C: the handler asks the loop to stop

    return hook


def _same_weights(a, b) -> bool:
    wa, wb = load_checkpoint(a)[0], load_checkpoint(b)[0]
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _metrics(folder):
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in rundir.read_metrics(folder)]


def _run(task_file, folder, method, overrides, family, tokenizer, **kwargs):
    cfg = toy_config(task_file, folder, method, **{"steps": 6, "eval_every": 2, **overrides})
    return finetune(cfg, make_model(family), tokenizer, **kwargs)


@pytest.mark.parametrize("method, family, overrides", CASES, ids=[c[0] for c in CASES])
def test_resume_after_kill_is_bitwise_identical(method, family, overrides, task_file, tokenizer, tmp_path):
    full, _ = _run(task_file, tmp_path / "full", method, overrides, family, tokenizer)
    with pytest.raises(Killed):
        _run(task_file, tmp_path / "killed", method, overrides, family, tokenizer, on_step=_kill_at(5))
    assert json.loads((tmp_path / "killed" / rundir.CONFIG).read_text())["train"]["steps"] == 6
    assert not (tmp_path / "killed" / rundir.RESULTS).exists()
    leftover = tmp_path / "killed" / f".{rundir.CHECKPOINT}.0123456789ab.tmp"  # what kill -9 mid-save leaves
    leftover.write_bytes(b"half a checkpoint")
    resumed, _ = resume(tmp_path / "killed", make_model(family), tokenizer)
    assert not leftover.exists()
    for name in (rundir.CHECKPOINT, rundir.BEST):
        assert _same_weights(tmp_path / "full" / name, tmp_path / "killed" / name)
    assert _metrics(tmp_path / "full") == _metrics(tmp_path / "killed")
    assert resumed["test"] == full["test"] and resumed["steps"] == 6
    if method.startswith("mezo"):
        traj = rundir.TRAJECTORY
        assert (tmp_path / "full" / traj).read_bytes() == (tmp_path / "killed" / traj).read_bytes()


def test_every_run_file_has_the_mode_of_a_normal_new_file(task_file, tokenizer, tmp_path):
    """Checkpoints, trajectory, JSON alike: 0666 minus the umask (0644 under the usual 022), not 0600."""
    mask = os.umask(0o022)
    try:
        _run(task_file, tmp_path, "mezo-prefix", dict(steps=2, eval_every=1, keep_weights=True), "llama",
             tokenizer)  # fmt: skip
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir() if p.is_file()}
    assert {rundir.CHECKPOINT, rundir.BEST, rundir.TRAJECTORY, rundir.INITIAL, rundir.RESULTS} <= set(modes)
    assert set(modes.values()) == {0o644}, modes


def test_ctrl_c_saves_a_checkpoint_and_resume_finishes_the_run(task_file, tokenizer, tmp_path):
    method, family, overrides = CASES[0]
    before = signal.getsignal(signal.SIGINT)  # Python's default, or SIG_IGN under a shell's `cmd &`
    _run(task_file, tmp_path / "full", method, overrides, family, tokenizer)
    stopped, folder = _run(task_file, tmp_path / "stopped", method, overrides, family, tokenizer,
                           on_step=_interrupt_at(3))  # fmt: skip
    assert stopped["status"] == "interrupted" and stopped["steps"] == 3
    assert load_checkpoint(folder / rundir.CHECKPOINT)[2]["step"] == 3  # saved off the save_every grid
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before the run, restored
    resume(folder, make_model(family), tokenizer)
    assert _same_weights(tmp_path / "full" / rundir.CHECKPOINT, folder / rundir.CHECKPOINT)


def test_finetune_refuses_a_folder_holding_a_run(task_file, tokenizer, tmp_path):
    _run(task_file, tmp_path, "mezo", dict(steps=2), "llama", tokenizer)
    with pytest.raises(FileExistsError, match="--resume"):
        _run(task_file, tmp_path, "mezo", dict(steps=2), "llama", tokenizer)


@pytest.mark.parametrize("method", ["mezo", "mezo-lora", "mezo-prefix"])
def test_replay_reproduces_the_checkpoint(method, task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, method, steps=5, eval_every=0, lr=1e-2, noise="rademacher")
    finetune(cfg, make_model("llama"), tokenizer)
    _, params, steps = rebuild(tmp_path, make_model("llama"), tokenizer)
    assert steps == 5
    assert compare_with_checkpoint(params, tmp_path / rundir.CHECKPOINT) == (True, 0.0)
    _, partial, _ = rebuild(tmp_path, make_model("llama"), tokenizer, upto=2)
    assert not compare_with_checkpoint(partial, tmp_path / rundir.CHECKPOINT)[0]


def test_replay_refuses_backprop_runs(task_file, tokenizer, tmp_path):
    finetune(toy_config(task_file, tmp_path, "ft", steps=1, eval_every=0), make_model("llama"), tokenizer)
    with pytest.raises(ValueError, match="only ZO runs"):
        rebuild(tmp_path, make_model("llama"), tokenizer)


def test_prefix_replay_starts_from_the_saved_initial_prefix(task_file, tokenizer, tmp_path, monkeypatch):
    """The activation init depends on float op order (threads): replay must not recompute it."""
    from hdopt.finetune import prefix

    cfg = toy_config(task_file, tmp_path, "mezo-prefix", steps=3, eval_every=0, lr=1e-2)
    finetune(cfg, make_model("llama"), tokenizer)
    assert (tmp_path / rundir.INITIAL).is_file()
    real = prefix.activation_prefix
    monkeypatch.setattr(prefix, "activation_prefix", lambda *a: tuple(t + 1e-4 for t in real(*a)))
    _, params, _ = rebuild(tmp_path, make_model("llama"), tokenizer)
    assert compare_with_checkpoint(params, tmp_path / rundir.CHECKPOINT) == (True, 0.0)


def test_resume_with_more_steps_equals_the_longer_run(task_file, tokenizer, tmp_path):
    method, family, overrides = "mezo", "llama", dict(steps=10, eval_every=2, keep_weights=True)
    long, _ = _run(task_file, tmp_path / "long", method, overrides, family, tokenizer)
    _run(task_file, tmp_path / "short", method, dict(overrides, steps=6), family, tokenizer)
    extended, _ = resume(tmp_path / "short", make_model(family), tokenizer, steps=10)
    assert json.loads((tmp_path / "short" / rundir.CONFIG).read_text())["train"]["steps"] == 10
    for name in (rundir.CHECKPOINT, rundir.BEST):
        assert _same_weights(tmp_path / "long" / name, tmp_path / "short" / name)
    dev = [[r for r in _metrics(tmp_path / name) if "dev_accuracy" in r] for name in ("long", "short")]
    assert dev[0] == dev[1] and len(dev[0]) == 6  # steps 0, 2, ..., 10 (short also logged a loss at 6)
    assert extended["steps"] == 10 and extended["test"] == long["test"]
    traj = rundir.TRAJECTORY
    assert (tmp_path / "long" / traj).read_bytes() == (tmp_path / "short" / traj).read_bytes()
    with pytest.raises(ConfigError, match="at step 10"):
        resume(tmp_path / "short", make_model(family), tokenizer, steps=8)


def test_steps_of_a_linear_schedule_cannot_change(task_file, tokenizer, tmp_path):
    _run(task_file, tmp_path, "mezo", dict(steps=4, schedule="linear"), "llama", tokenizer)
    with pytest.raises(ConfigError, match="'linear' lr schedule"):
        resume(tmp_path, make_model("llama"), tokenizer, steps=8)
    assert json.loads((tmp_path / rundir.CONFIG).read_text())["train"]["steps"] == 4
