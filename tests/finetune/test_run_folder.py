"""A run folder is one consistent unit: ZO folders hold seeds, not weights, and rebuild them bitwise; best and
checkpoint never pair one step's weights with another's metrics; a lock keeps a second run out; every weight
and trajectory file is checked against its checksum (issue 14 item 7, issue 19 items 1, 2, 4, 8)."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hdopt.finetune import finetune, resume, rundir
from hdopt.finetune.checkpoint import load_checkpoint, tensors_digest
from hdopt.finetune.errors import RunFolderError
from hdopt.finetune.kinds import BackpropKind, ZOKind
from hdopt.finetune.methods import METHODS, Method, get_method, register_method
from hdopt.finetune.replay import rebuild
from hdopt.finetune.trained import load_trained, run_config
from hdopt.finetune.trainer import evaluate_examples, load_data
from hdopt.lm.evaluation import EvalResult
from hdopt.lm.tasks import resolve_task
from tests.finetune.conftest import make_model, toy_config

ROOT = Path(__file__).resolve().parents[2]


class Killed(Exception):
    """Stands in for SIGKILL: leaves the loop without saving anything."""


def kill_at(step: int):
    def hook(current: int) -> None:
        if current == step:
            raise Killed

    return hook


def run(task_file, folder, method="mezo", family="llama", tokenizer=None, on_step=None, **overrides):
    cfg = toy_config(task_file, folder, method, **{"steps": 6, "eval_every": 2, "lr": 2e-2, **overrides})
    return finetune(cfg, make_model(family), tokenizer, on_step=on_step)


def test_test_metrics_are_the_best_dev_weights_test_metrics(task_file, tokenizer, tmp_path):
    """Measured when found (no weights kept): the same as evaluating the best weights afterwards."""
    results, folder = run(task_file, tmp_path, tokenizer=tokenizer, lr=5e-2, steps=8)
    assert results["best_step"] == 8  # the last step: the model still holds the best weights
    cfg, task = run_config(folder), resolve_task(str(task_file))
    model, _ = load_trained(folder, make_model("llama"), tokenizer)
    assert evaluate_examples(model, tokenizer, task, cfg, load_data(cfg, task).eval).metrics["accuracy"] == (
        results["test"])  # fmt: skip


# -- seeds, not weights (issue 14 item 7) --------------------------------------------------------------------
@pytest.mark.parametrize("method, family, overrides", [
    ("mezo", "llama", {}),
    ("mezo-lora", "opt", dict(optimizer="zoadam", grad_accum=2, lr=0.1)),  # Adam moments rebuilt by replay
    ("mezo-prefix", "gpt2", dict(lr=0.1)),
], ids=["mezo", "zoadam-lora", "prefix"])  # fmt: skip
def test_a_zo_folder_holds_seeds_and_rebuilds_the_weights_bitwise(method, family, overrides, task_file,
                                                                  tokenizer, tmp_path):  # fmt: skip
    kept, kept_folder = run(task_file, tmp_path / "kept", method, family, tokenizer, keep_weights=True,
                            **overrides)  # fmt: skip
    seeds, folder = run(task_file, tmp_path / "seeds", method, family, tokenizer, **overrides)
    assert seeds["test"] == kept["test"] and seeds["best_step"] == kept["best_step"]
    assert not (folder / rundir.BEST).exists() and load_checkpoint(folder / rundir.CHECKPOINT)[0] == {}
    assert (folder / rundir.TRAJECTORY).read_bytes() == (kept_folder / rundir.TRAJECTORY).read_bytes()
    # the best dev weights and the last ones, rebuilt from the trajectory: bitwise the stored ones
    model, _ = load_trained(folder, make_model(family), tokenizer)
    best = load_checkpoint(kept_folder / rundir.BEST)[0]
    got = {n: p for n, p in model.named_parameters() if n in best}
    assert got.keys() == best.keys() and all(torch.equal(got[n], best[n]) for n in best)
    _, params, steps = rebuild(folder, make_model(family), tokenizer)
    last = load_checkpoint(kept_folder / rundir.CHECKPOINT)[0]
    assert steps == 6 and all(torch.equal(p, last[n]) for n, p in params)


@pytest.mark.parametrize("overrides", [
    {}, dict(optimizer="zoadam", lr=1e-2),
    dict(optimizer="lozo", momentum=0.9, optimizer_args={"interval": 2}, lr=1e-3),  # LOZO-M's factor
    dict(optimizer="hizoo", lr=1e-3),  # the Hessian estimate, rebuilt from the records' curvatures
], ids=["zosgd", "zoadam", "lozo-m", "hizoo"])  # fmt: skip
def test_a_seeds_only_run_resumes_bitwise_by_replay(overrides, task_file, tokenizer, tmp_path):
    full, _ = run(task_file, tmp_path / "full", tokenizer=tokenizer, **overrides)
    with pytest.raises(Killed):
        run(task_file, tmp_path / "killed", tokenizer=tokenizer, on_step=kill_at(5), **overrides)
    resumed, _ = resume(tmp_path / "killed", make_model("llama"), tokenizer)
    full_dir, killed_dir = tmp_path / "full", tmp_path / "killed"
    assert (full_dir / rundir.TRAJECTORY).read_bytes() == (killed_dir / rundir.TRAJECTORY).read_bytes()
    metrics = [[{k: v for k, v in r.items() if k != "elapsed"} for r in rundir.read_metrics(f)]
               for f in (full_dir, killed_dir)]  # fmt: skip
    assert metrics[0] == metrics[1]
    digests = [load_checkpoint(f / rundir.CHECKPOINT)[2]["weights_sha256"] for f in (full_dir, killed_dir)]
    assert digests[0] == digests[1]
    assert (resumed["test"], resumed["best_step"]) == (full["test"], full["best_step"])


def test_resume_and_rebuilds_refuse_another_starting_model(task_file, tokenizer, tmp_path):
    run(task_file, tmp_path, tokenizer=tokenizer, steps=4)
    other = make_model("llama")
    with torch.no_grad():
        other.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3  # frozen or not: another starting model
    calls = (lambda: resume(tmp_path, other, tokenizer, steps=6), lambda: rebuild(tmp_path, other, tokenizer),
             lambda: load_trained(tmp_path, other, tokenizer))  # fmt: skip
    for call in calls:
        with pytest.raises(RunFolderError, match="not the starting model"):
            call()


def test_folder_sizes_seeds_against_weights(task_file, tokenizer, tmp_path):
    """The tiny model's numbers (the SmolLM2 ones are measured by benchmarks/finetune_run_memory.py)."""
    run(task_file, tmp_path / "kept", tokenizer=tokenizer, keep_weights=True)
    run(task_file, tmp_path / "seeds", tokenizer=tokenizer, optimizer="zoadam")  # its moments are not kept
    size = {f: sum(p.stat().st_size for p in (tmp_path / f).iterdir()) for f in ("kept", "seeds")}
    weights = sum(p.numel() * 4 for p in make_model("llama").parameters())
    assert size["kept"] > 2 * weights > 10 * size["seeds"], size  # checkpoint + best vs trajectory + state


# -- best and checkpoint, one consistent pair (issue 19 item 1) ----------------------------------------------
DEV = {0: 10.0, 2: 20.0, 4: 15.0, 5: 12.0, 6: 30.0, 8: 5.0}  # scripted dev accuracy: best at step 2, then 6


class ScriptedDev(BackpropKind):
    """Backprop whose dev metric is the script above (the test split keeps the real evaluation)."""

    def evaluate(self, examples):
        return EvalResult({"accuracy": DEV[self.scheduler.last_epoch]}, [], 0, 0.0, {})


class ScriptedZO(ZOKind):
    evaluate = ScriptedDev.evaluate


@pytest.fixture
def scripted():
    defaults = {**get_method("ft").defaults, "lr": 1e-2, "schedule": "constant"}
    method = register_method(Method("test-scripted-ft", ScriptedDev, "full", defaults))
    yield method.name
    METHODS.unregister(method.name)


@pytest.mark.parametrize("kind, keep", [(ScriptedDev, False), (ScriptedZO, False), (ScriptedZO, True)])
def test_the_reported_test_metrics_are_those_of_the_best_dev_step(kind, keep, task_file, tokenizer, tmp_path,
                                                                  monkeypatch):  # fmt: skip
    """The test evaluation answers 1000 + the step of the weights it sees: the run reports the best step's."""
    from hdopt.finetune import trainer

    real = trainer.Setup.evaluate

    def tagged(self, examples):
        result = real(self, examples)
        if examples is self.splits.eval:
            result.metrics["accuracy"] = 1000.0 + self.kind.scheduler.last_epoch
        return result

    monkeypatch.setattr(trainer.Setup, "evaluate", tagged)
    base = "mezo" if kind is ScriptedZO else "ft"
    method = register_method(Method("test-tagged", kind, "full", {**get_method(base).defaults, "lr": 1e-2,
                                                                   "schedule": "constant"}))  # fmt: skip
    try:
        results, _ = run(task_file, tmp_path, method.name, tokenizer=tokenizer, steps=5, keep_weights=keep)
    finally:
        METHODS.unregister(method.name)
    assert (results["best_step"], results["test"]) == (2, 1002.0)


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)[0]


@pytest.mark.parametrize("kill, steps, best", [(6, 5, 2), (7, 8, 6)])
def test_a_kill_near_a_new_best_keeps_the_reported_best(kill, steps, best, scripted, task_file, tokenizer,
                                                        tmp_path):  # fmt: skip
    """Kill right after the dev evaluation of step 6 (a new best), before its checkpoint, and resume to step
    5; or kill at step 7, after best.safetensors of step 6, and resume to the end: results and
    best.safetensors hold the best step's, as a straight run to that step has them."""
    common = dict(steps=8, eval_every=2, save_every=4, lr=1e-2)
    straight, _ = run(task_file, tmp_path / "straight", scripted, tokenizer=tokenizer,
                      **{**common, "steps": steps})  # fmt: skip
    with pytest.raises(Killed):
        run(task_file, tmp_path / "killed", scripted, tokenizer=tokenizer, on_step=kill_at(kill), **common)
    resumed, _ = resume(tmp_path / "killed", make_model("llama"), tokenizer, steps=steps)
    assert resumed["best_step"] == straight["best_step"] == best and resumed["test"] == straight["test"]
    a, b = _weights(tmp_path / "straight" / rundir.BEST), _weights(tmp_path / "killed" / rundir.BEST)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_kill_between_the_checkpoint_and_best_rewrites_best_on_resume(scripted, task_file, tokenizer,
                                                                        tmp_path, monkeypatch):  # fmt: skip
    from hdopt.finetune import trainer

    common = dict(steps=8, eval_every=2, save_every=4, lr=1e-2)
    run(task_file, tmp_path / "full", scripted, tokenizer=tokenizer, **common)
    real = trainer.save_best

    def killed_at_6(s, state, folder):
        if state.step == 6:
            raise Killed
        real(s, state, folder)

    monkeypatch.setattr(trainer, "save_best", killed_at_6)
    with pytest.raises(Killed):
        run(task_file, tmp_path / "killed", scripted, tokenizer=tokenizer, **common)
    monkeypatch.setattr(trainer, "save_best", real)
    assert load_checkpoint(tmp_path / "killed" / rundir.CHECKPOINT)[2]["step"] == 6
    assert load_checkpoint(tmp_path / "killed" / rundir.BEST)[2]["step"] == 2  # the older best
    resume(tmp_path / "killed", make_model("llama"), tokenizer)
    a, b = _weights(tmp_path / "full" / rundir.BEST), _weights(tmp_path / "killed" / rundir.BEST)
    assert load_checkpoint(tmp_path / "killed" / rundir.BEST)[2]["step"] == 6
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- the lock (issue 19 item 2) ------------------------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import time; from hdopt.finetune.rundir import RunLock\n"
            f"with RunLock({str(folder)!r}):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_locked_folder_refuses_a_second_run_and_a_dead_holders_lock_is_taken_over(task_file, tokenizer,
                                                                                     tmp_path, capsys):
    holder = _hold_lock(tmp_path)
    try:
        with pytest.raises(RunFolderError, match=rf"is in use by process {holder.pid} on .*choose another"):
            run(task_file, tmp_path, tokenizer=tokenizer, steps=1)
        assert sorted(p.name for p in tmp_path.iterdir()) == [rundir.LOCK]  # the second run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    results, _ = run(task_file, tmp_path, tokenizer=tokenizer, steps=1)
    assert results["status"] == "completed"
    assert f"locked by process {holder.pid}, which ended without releasing it" in capsys.readouterr().err
    lock = json.loads((tmp_path / rundir.LOCK).read_text())
    assert lock["pid"] == os.getpid() and lock["released"] is True


def test_a_fresh_run_clears_the_temporary_files_a_killed_writer_left(task_file, tokenizer, tmp_path):
    tmp_path.mkdir(exist_ok=True)
    leftover = tmp_path / f".{rundir.CHECKPOINT}.0123456789ab.tmp"
    leftover.write_bytes(b"\0" * 100)
    run(task_file, tmp_path, tokenizer=tokenizer, steps=1)
    assert not leftover.exists()


# -- checksums (issue 19 item 4) -----------------------------------------------------------------------------
def _tensor_span(path: Path, key: str) -> tuple[int, int]:
    """The byte range of tensor ``key`` in a safetensors file."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + size])[key]["data_offsets"]
    return 8 + size + begin, 8 + size + end


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("target", ["weights", "rng", "header"])
def test_a_flipped_byte_in_a_checkpoint_is_named(target, task_file, tokenizer, tmp_path):
    run(task_file, tmp_path, "ft", tokenizer=tokenizer, steps=2, lr=1e-2, schedule="constant")
    path = tmp_path / rundir.CHECKPOINT
    if target == "header":  # a digit of the step in the JSON metadata
        offset = path.read_bytes().index(b'\\"step\\": 2') + len(b'\\"step\\": ')
    else:
        key = "weights/model.norm.weight" if target == "weights" else "state//rng"
        start, end = _tensor_span(path, key)
        offset = (start + end) // 2
    _flip(path, offset)
    with pytest.raises(RunFolderError, match=rf"{rundir.CHECKPOINT} is damaged"):
        resume(tmp_path, make_model("llama"), tokenizer, steps=4)


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_truncated_or_foreign_checkpoint_is_named(damage, task_file, tokenizer, tmp_path):
    run(task_file, tmp_path, tokenizer=tokenizer, steps=2)
    path = tmp_path / rundir.CHECKPOINT
    data = path.read_bytes()
    damaged = {"truncated": data[: len(data) // 2], "random": os.urandom(len(data)), "empty": b""}
    path.write_bytes(damaged[damage])
    with pytest.raises(RunFolderError, match=rf"{rundir.CHECKPOINT} is damaged"):
        resume(tmp_path, make_model("llama"), tokenizer, steps=4)


def test_damaged_best_weights_are_named_by_load_trained(task_file, tokenizer, tmp_path):
    run(task_file, tmp_path, "ft", tokenizer=tokenizer, steps=2, lr=1e-2)
    start, end = _tensor_span(tmp_path / rundir.BEST, "weights/model.norm.weight")
    _flip(tmp_path / rundir.BEST, start + 1)
    with pytest.raises(RunFolderError, match=rf"{rundir.BEST} is damaged"):
        load_trained(tmp_path, make_model("llama"), tokenizer)


@pytest.mark.parametrize("damage", ["flip", "last record"])
def test_a_damaged_trajectory_is_named(damage, task_file, model_dir, tokenizer, tmp_path, capsys):
    from hdopt.finetune import cli_replay

    run(task_file, tmp_path, tokenizer=tokenizer, steps=4, eval_every=2, model=str(model_dir))
    path = tmp_path / rundir.TRAJECTORY
    record = 8 + 8 + 8 + 8 + 8 + 8  # step, key, scale, 1 grad, 1 lr, 1 eps
    if damage == "flip":
        _flip(path, len(path.read_bytes()) - 3)
    else:
        path.write_bytes(path.read_bytes()[:-record])
    with pytest.raises(RunFolderError, match=rf"{rundir.TRAJECTORY} (is damaged|holds 3 steps)"):
        load_trained(tmp_path, make_model("llama"), tokenizer)
    parser = argparse.ArgumentParser()
    cli_replay.configure(parser)
    assert cli_replay.run(parser.parse_args([str(tmp_path)])) == 2
    assert rundir.TRAJECTORY in capsys.readouterr().err
    # resume does not need it (the checkpoint holds the trajectory): it says so and writes it again
    capsys.readouterr()
    resume(tmp_path, make_model("llama"), tokenizer, steps=6)
    assert f"warning: {path}" in capsys.readouterr().err
    rundir.load_trajectory(path)


def test_sigterm_stops_like_ctrl_c_and_resume_is_bitwise(task_file, tokenizer, tmp_path):
    def terminate_at_3(step: int) -> None:
        if step == 3:
            signal.raise_signal(signal.SIGTERM)

    full, _ = run(task_file, tmp_path / "full", tokenizer=tokenizer)
    stopped, folder = run(task_file, tmp_path / "stopped", tokenizer=tokenizer, on_step=terminate_at_3)
    assert (stopped["status"], stopped["steps"], stopped["stopped_by"]) == ("interrupted", 3, "SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handler restored
    assert load_checkpoint(folder / rundir.CHECKPOINT)[2]["step"] == 3
    resumed, _ = resume(folder, make_model("llama"), tokenizer)
    assert resumed["test"] == full["test"]
    assert (tmp_path / "full" / rundir.TRAJECTORY).read_bytes() == (folder / rundir.TRAJECTORY).read_bytes()


def test_the_digest_of_weights_is_their_bytes():
    a = [("w", torch.tensor([1.0, 2.0])), ("b", torch.tensor([0.5]))]
    assert tensors_digest(a) == tensors_digest(list(reversed(a)))  # name order, not list order
    assert tensors_digest(a) != tensors_digest([("w", torch.tensor([1.0, 2.0 + 2**-22])), a[1]])
    assert tensors_digest(a) != tensors_digest([("w", a[0][1].double()), a[1]])  # the dtype counts
