"""``hdopt finetune`` under torchrun: 2 CPU processes (gloo) against one process with the whole batch.

One launch of two worker processes (torchrun's environment, tests/finetune/torchrun_worker.py) runs every
scenario in one process group; a second launch resumes a killed run with the trainer creating and
destroying the group itself; the last test runs ``python -m torch.distributed.run ... -m hdopt finetune``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdopt.finetune import ConfigError, cli, finetune, resume, rundir, trainer
from hdopt.finetune.checkpoint import load_checkpoint
from hdopt.finetune.replay import compare_with_checkpoint, rebuild
from hdopt.zo import Trajectory
from tests.distributed.launch import free_port
from tests.finetune import torchrun_worker as worker
from tests.finetune.conftest import make_model

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), str(ROOT), env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def launch(*args: str, world: int = 2, timeout: float = 240) -> list[subprocess.CompletedProcess]:
    """Start ``world`` worker processes with torchrun's variables; wait for all of them."""
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(Path(worker.__file__)), *args],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                     MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for r in range(world)
    ]
    done = []
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            stdout, stderr = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            stdout, stderr = p.communicate()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, stderr))
    return done


def _load(path: Path) -> dict:
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def tasks(task_file, tmp_path_factory) -> dict[str, Path]:
    """The toy classification task, and a toy generation task whose answers differ in length."""
    folder = tmp_path_factory.mktemp("gen")
    words = ["ox", "cat", "lion", "zebra", "donkey", "giraffe", "elephant", "hippopotamus"]
    rows = [{"text": f"animal {i}", "answer": words[i % 8]} for i in range(32)]
    for split, part in (("train", rows[:24]), ("eval", rows[24:])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part), encoding="utf-8")
    (folder / "gen.yaml").write_text(
        "name: gen\ndata: {train: train.jsonl, eval: eval.jsonl}\ntemplate: '{text} is'\n"
        "target_column: answer\nmetric: f1\n", encoding="utf-8",
    )  # fmt: skip
    return {"toy": task_file, "gen": folder / "gen.yaml"}


SCENARIOS = [*worker.RUNS, "kill", *worker.ERRORS, "nan"]


@pytest.fixture(scope="module")
def two(tasks, tmp_path_factory) -> Path:
    """Both launches: every scenario in one process group, then the resume of the killed run."""
    out = tmp_path_factory.mktemp("two")
    args = [str(out), str(tasks["toy"]), str(tasks["gen"])]
    for mode, names in (("own", SCENARIOS), ("trainer", ["resume"])):
        start = time.perf_counter()
        procs = launch(*args, mode, *names)
        print(f"launch {mode}: {time.perf_counter() - start:.1f} s")
        for rank, p in enumerate(procs):
            assert p.returncode == 0, f"rank {rank}: {p.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def one(tasks, tokenizer, tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The same runs in one process, each step on the whole batch; and each run's initial weights."""
    out, initial = tmp_path_factory.mktemp("one"), {}
    real_setup = trainer.setup

    def setup(*args, **kwargs):
        s = real_setup(*args, **kwargs)
        initial[name] = {n: p.detach().clone() for n, p in s.params}
        return s

    trainer.setup = setup
    try:
        with worker.float64_losses():
            for name in worker.RUNS:
                finetune(worker.run_config(name, tasks, out / name), worker.tiny_model(), tokenizer)
    finally:
        trainer.setup = real_setup
    return out, initial


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([weights[k].reshape(-1).double() for k in sorted(weights)])


def _grads(folder: Path) -> torch.Tensor:
    _, trajectory = Trajectory.load(folder / rundir.TRAJECTORY)
    return torch.tensor([g for r in trajectory for g in r.grads], dtype=torch.float64)


@pytest.mark.parametrize("name", list(worker.RUNS))
def test_two_processes_equal_one_process_with_the_whole_batch(name, two, one):
    (ref, initial), a = one, two / "runs" / name
    b, w0 = ref / name, _flat(initial[name])
    grads_two, grads_one = _grads(a), _grads(b)
    assert len(grads_one) == worker.STEPS * (2 if name == "mezo" else 1)
    torch.testing.assert_close(grads_two, grads_one, rtol=1e-6, atol=0)
    for file in (rundir.CHECKPOINT,) if name == "gen" else (rundir.CHECKPOINT, rundir.BEST):
        moved_two = _flat(load_checkpoint(a / file)[0]) - w0
        moved_one = _flat(load_checkpoint(b / file)[0]) - w0
        if file == rundir.BEST and not moved_one.any():  # the best dev metric was the initial weights'
            assert not moved_two.any()
            continue
        assert moved_one.norm() > 1e-4 * w0.norm()  # the steps did something
        assert _relative(moved_two, moved_one) <= 1e-6, file  # the steps taken agree, not just the weights
    rank0, rank1 = _load(two / f"{name}.rank0.pt"), _load(two / f"{name}.rank1.pt")
    assert rank0["error"] is None and rank1["error"] is None
    accum = worker.RUNS[name][2].get("grad_accum", 1)
    assert len(rank0["examples"]) == len(rank1["examples"]) == worker.STEPS * accum
    for mine, theirs in zip(rank0["examples"], rank1["examples"], strict=True):  # each rank: its own half
        assert len(mine) == len(theirs) == worker.COMMON["batch_size"] // (2 * accum)
        assert not set(mine) & set(theirs)
    for k, w in rank0["weights"].items():  # both ranks end with identical weights (the test's selection)
        assert torch.equal(w, rank1["weights"][k])
    final = load_checkpoint(b / (rundir.CHECKPOINT if name == "gen" else rundir.BEST))[0]
    moved = _flat(final) - w0
    assert (_flat(rank0["weights"]) - w0 - moved).norm() <= 1e-6 * moved.norm()
    # the same log and results: train loss (mean over ranks), dev and test metrics (sharded evaluation)
    rows_two, rows_one = rundir.read_metrics(a), rundir.read_metrics(b)
    assert [sorted(r) for r in rows_two] == [sorted(r) for r in rows_one]
    for r2, r1 in zip(rows_two, rows_one, strict=True):
        for key in set(r1) - {"elapsed"}:
            assert r2[key] == pytest.approx(r1[key], rel=1e-6), key
    res, res_one = rank0["results"], json.loads((b / rundir.RESULTS).read_text())
    assert res["test"] == res_one["test"] and res["best_step"] == res_one["best_step"]
    assert json.loads((a / rundir.RESULTS).read_text())["world_size"] == 2
    assert json.loads((a / rundir.CONFIG).read_text())["method_record"]["world_size"] == 2
    # only scalars cross: per step 8 bytes per direction, 16 for the loss and stop flag, 24 for the
    # conservative rule's candidate losses; + the prefix broadcast at start-up, + 1 byte per barrier
    q = worker.RUNS[name][2].get("q", 1)
    per_step = 8 * q + 16 + (24 if name == "prefix" else 0)
    start = 8 * sum(w.numel() for w in rank0["weights"].values()) if name == "prefix" else 0
    barrier = 1  # before reading best.safetensors
    assert res["communicated_bytes"] == worker.STEPS * per_step + start + barrier


def test_only_rank_0_writes_the_run_folders(two, one):
    rank0, rank1 = (_load(two / f"writes.own.rank{r}.pt")["writes"] for r in (0, 1))
    assert rank1 == [] and _load(two / "writes.trainer.rank1.pt")["writes"] == []
    written = {Path(line.split(" ", 1)[1]).name for line in rank0}
    assert {rundir.CONFIG, rundir.METRICS, rundir.RESULTS, rundir.TRAJECTORY} <= written  # the audit works
    for name in worker.RUNS:  # and rank 0 wrote what one process writes
        assert sorted(p.name for p in (two / "runs" / name).iterdir()) == sorted(
            p.name for p in (one[0] / name).iterdir())


def test_resume_with_the_same_number_of_processes_continues_bitwise(two):
    straight, resumed = two / "runs" / "mezo", two / "runs" / "kill"
    for file in (rundir.CHECKPOINT, rundir.BEST):
        a, b = load_checkpoint(straight / file)[0], load_checkpoint(resumed / file)[0]
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / rundir.TRAJECTORY).read_bytes() == (resumed / rundir.TRAJECTORY).read_bytes()
    drop = lambda rows: [{k: v for k, v in r.items() if k != "elapsed"} for r in rows]  # noqa: E731
    assert drop(rundir.read_metrics(straight)) == drop(rundir.read_metrics(resumed))
    for rank in range(2):  # the trainer created the group for the resumed run and destroyed it at the end
        record = _load(two / f"resume.rank{rank}.pt")
        assert record["error"] is None and record["results"]["steps"] == worker.STEPS
        assert record["group_alive"] is False


def test_resume_with_another_number_of_processes_is_refused(two, tokenizer):
    with pytest.raises(ConfigError, match=r"trained by 2 processes and this is 1: .*--nproc_per_node 2"):
        resume(two / "runs" / "mezo", worker.tiny_model(), tokenizer)


def test_replay_rebuilds_a_two_process_run_bitwise(two):
    _, params, steps = rebuild(two / "runs" / "mezo", worker.tiny_model(), None)
    assert steps == worker.STEPS
    assert compare_with_checkpoint(params, two / "runs" / "mezo" / rundir.CHECKPOINT) == (True, 0.0)


@pytest.mark.parametrize("name, message", [
    ("indivisible", "ConfigError: batch_size 3 cannot be split evenly over 2 processes"),
    ("backprop", "ConfigError: method 'ft' trains with backprop and cannot run on 2 processes"),
    ("mismatch", "ConfigMismatchError: refusing to start the data-parallel ZO"),
])  # fmt: skip
def test_refused_runs_stop_every_rank_with_a_clear_error(two, name, message):
    for rank in range(2):
        record = _load(two / f"{name}.rank{rank}.pt")
        assert record["error"].startswith(message), record["error"]
        assert not (two / "runs" / name / rundir.CONFIG).exists()
    if name == "indivisible":
        assert "divisible by 2 (e.g. --batch-size 4)" in record["error"]
    if name == "backprop":
        assert "mezo, mezo-lora, mezo-prefix" in record["error"] and "one process" in record["error"]
    if name == "mismatch":
        assert "'lr': 0.01" in record["error"] and "'lr': 0.02" in record["error"]


def test_a_nan_loss_on_one_rank_stops_every_rank_at_the_same_step(two):
    records = [_load(two / f"nan.rank{rank}.pt") for rank in range(2)]
    assert records[1]["error"].startswith("DivergenceError: training diverged: the closure returned nan")
    assert records[0]["error"].startswith("DivergenceError: training diverged: the projected gradients")
    assert all(r["seconds"] < 30 for r in records)  # no wait for the 600 s deadline
    results = json.loads((two / "runs" / "nan" / rundir.RESULTS).read_text())
    assert results["status"] == "diverged" and results["steps"] == 2
    assert load_checkpoint(two / "runs" / "nan" / rundir.CHECKPOINT)[2]["step"] == 2


def test_torchrun_runs_the_finetune_cli(task_file, tokenizer, tmp_path, capsys):
    """``python -m torch.distributed.run --nproc_per_node 2 -m hdopt finetune`` on a saved tiny model, in
    float32 with the real losses, against the same command in one process (run folders without weights:
    each rebuilt from its trajectory)."""
    model_dir = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    flags = ["--model", str(model_dir), "--task", str(task_file), "--method", "mezo", "--q", "2",
             "--lr", "1e-2", "--steps", "3", "--batch-size", "4", "--eval-every", "3", "--num-train", "16",
             "--num-dev", "8", "--num-eval", "8", "--max-length", "32", "--no-progress"]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hdopt", "finetune", *flags, "--output-dir", str(tmp_path / "two")]  # fmt: skip
    start = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("run folder:") == 1 and "test accuracy" in done.stdout  # rank 0 alone prints
    assert cli.main([*flags, "--output-dir", str(tmp_path / "one")]) == 0
    capsys.readouterr()
    two, one = tmp_path / "two", tmp_path / "one"
    results = json.loads((two / rundir.RESULTS).read_text())
    assert results["status"] == "completed" and results["world_size"] == 2
    assert results["test"] == json.loads((one / rundir.RESULTS).read_text())["test"]
    # float32 losses: the shard mean and the batch loss differ by about an ulp, which 1 / (2 eps) amplifies
    grads_two, grads_one = _grads(two), _grads(one)
    worst = float(((grads_two - grads_one).abs() / grads_one.abs()).max())
    w_two, w_one = (_flat(dict(rebuild(f)[1])) for f in (two, one))
    print(f"torchrun: {seconds:.1f} s; float32: projected gradients max relative difference {worst:.2e}; "
          f"weights relative difference {_relative(w_two, w_one):.2e}")
    assert worst <= 1e-3 and _relative(w_two, w_one) <= 1e-4  # measured: 4.3e-4 and 2.7e-5
