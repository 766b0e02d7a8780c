"""Fault injection on the ``hdopt`` command line (issue 19): bad inputs, damaged files, kills and signals.

    python benchmarks/faults.py                               # this checkout
    python benchmarks/faults.py --src ../main/src --tag before  # another checkout, for comparison

Every case runs ``python -m hdopt ...`` (or a few lines of Python for a hard kill at a chosen moment) in fresh
processes on a tiny random Llama and a toy task built here, and classifies the outcome:

* ``clear``: the expected exit status with one error line and no traceback (or, for a case that must
  succeed, the right result);
* ``traceback``: a Python traceback where a message belongs;
* ``silent``: exit status 0 (or a result) that is wrong: a value coerced, a damaged file used, a wrong
  weight or metric reported;
* ``lost``: a run's output overwritten or never saved;
* ``no answer``: no result within the case's time limit.

Results: benchmarks/results/faults[_TAG].json; without ``--tag``, also faults.md, the table of the cases with
their outcome before (faults_before.json) and after (the table in docs/finetune.md). The same cases, in
process and faster, are tests in tests/finetune/test_faults.py and tests/finetune/test_run_folder.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
VERDICTS = ("clear", "traceback", "silent", "lost", "no answer")
WORK = re.compile(r"(?:/[\w.-]+)*/hdopt-faults-\w+")  # the cases' temporary folder, in their messages


@dataclass
class Outcome:
    verdict: str
    detail: str


class Context:
    """The tiny model, the toy task and the code under test (``src``)."""

    def __init__(self, work: Path, src: Path) -> None:
        self.work, self.src = work, src
        self.model, self.task = work / "tiny-llama", work / "toy" / "toy.yaml"
        self.n = 0

    def folder(self) -> Path:
        self.n += 1
        return self.work / f"run{self.n}"

    def env(self, **extra: str) -> dict:
        return {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.src), str(ROOT)]),
                "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **extra}  # fmt: skip

    def hdopt(self, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "hdopt", *map(str, args)]
        try:
            return subprocess.run(cmd, capture_output=True, text=True, env=self.env(), timeout=timeout,
                                  **popen)  # fmt: skip
        except subprocess.TimeoutExpired as err:
            return subprocess.CompletedProcess(cmd, None, err.stdout or "", err.stderr or "")

    def python(self, code: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=self.env(),
                              timeout=timeout)  # fmt: skip

    def finetune_flags(self, out: Path, *extra, task: Path | None = None) -> list[str]:
        return ["finetune", "--model", self.model, "--task", task or self.task, "--num-train", "16",
                "--num-dev", "8", "--num-eval", "8", "--max-length", "32", "--batch-size", "8",
                "--output-dir", out, "--no-progress", "--lr", "1e-2", *extra]  # fmt: skip

    def finetune(self, out: Path, *extra, timeout: float = 300, task: Path | None = None
                 ) -> subprocess.CompletedProcess:  # fmt: skip
        return self.hdopt(*self.finetune_flags(out, *extra, task=task), timeout=timeout)


def classify(done: subprocess.CompletedProcess, code: int, right: bool = True) -> Outcome:
    """The verdict for a case that must exit with ``code`` (``right``: its result or files are right)."""
    err = (done.stderr or "").strip()
    said = [line for line in err.splitlines() if line.strip() and "it/s]" not in line]  # no progress bars
    last = said[-1][:160] if said else ""
    if done.returncode is None:
        return Outcome("no answer", "still running at the time limit")
    if "Traceback" in err:
        return Outcome("traceback", last)
    if done.returncode == code and right:
        if code == 0:
            return Outcome("clear", "the right result")
        lines = [line for line in err.splitlines() if line.startswith(("error", "hdopt", "warning"))]
        if not lines:
            return Outcome("silent", f"exit {code}, no message")
        return Outcome("clear", lines[0][:160])
    return Outcome("silent", f"exit {done.returncode}, {last or 'no error'}")


def _flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def _span(path: Path, key: str) -> int:
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    begin, end = json.loads(data[8 : 8 + size])[key]["data_offsets"]
    return 8 + size + (begin + end) // 2


def _yaml(ctx: Context, text: str) -> Outcome:
    path = ctx.work / f"case{ctx.n}.yaml"
    path.write_text(text)
    return classify(ctx.finetune(ctx.folder(), "--config", path), 2)


# -- the cases -----------------------------------------------------------------------------------------------
def lock(ctx: Context) -> Outcome:
    out = ctx.folder()
    flags = ctx.finetune_flags(out, "--steps", "400", "--lr", "1e-3")
    cmd = [sys.executable, "-m", "hdopt", *map(str, flags)]
    first = subprocess.Popen(cmd, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    second = ctx.finetune(out, "--steps", "2", "--lr", "0.02")
    stdout, stderr = first.communicate(timeout=600)
    if first.returncode == 0 and second.returncode == 0:
        steps = json.loads((out / "config.json").read_text())["train"]["steps"]
        return Outcome("lost", f"both exited 0; the folder holds the config of the run of {steps} steps")
    if second.returncode:
        return classify(second, 2)
    refused = subprocess.CompletedProcess(first.args, first.returncode, stdout, stderr)
    return classify(refused, 2)


def stale_best(ctx: Context) -> Outcome:
    """Kill -9 right after the dev evaluation of a new best (step 6), resume to step 5; against a straight
    5-step run (the dev metric is scripted so that steps 2 and 6 are new bests)."""
    out, straight = ctx.folder(), ctx.folder()
    code = f"""
import os, sys, json
from hdopt.finetune import finetune, resume, RunConfig
from hdopt.finetune.methods import Method, register_method, get_method
from hdopt.finetune import methods
from hdopt.lm.evaluation import EvalResult
kinds = __import__("hdopt.finetune.kinds", fromlist=["x"]) if hasattr(methods, "KINDS") else None
DEV = {{0: 10.0, 2: 20.0, 4: 15.0, 5: 12.0, 6: 30.0, 8: 5.0}}
if kinds is not None:
    class Scripted(kinds.BackpropKind):
        def evaluate(self, examples):
            return EvalResult({{"accuracy": DEV[self.scheduler.last_epoch]}}, [], 0, 0.0, {{}})
    defaults = {{**get_method("ft").defaults, "schedule": "constant"}}
    register_method(Method("scripted", Scripted, "full", defaults))
else:  # before the method kinds: patch the trainer's dev evaluation
    from hdopt.finetune import trainer
    real = trainer.evaluate_split
    def evaluate_split(s, examples):
        if examples is s.splits.dev:
            return {{"accuracy": DEV[s.scheduler.last_epoch]}}
        return real(s, examples)
    trainer.evaluate_split = evaluate_split
    register_method(Method("scripted", "fo", "full", {{**get_method("ft").defaults, "schedule": "constant"}}))
def cfg(out, steps):
    return RunConfig().replace(model="{ctx.model}", task="{ctx.task}", method="scripted", num_train=16,
        num_dev=8, num_eval=8, max_length=32, batch_size=8, steps=steps, eval_every=2, save_every=4, lr=1e-2,
        progress=False, output_dir=out)
if sys.argv[1] == "straight":
    r, _ = finetune(cfg("{straight}", 5))
elif sys.argv[1] == "kill":
    def hook(step):
        if step == 6:
            os._exit(137)
    finetune(cfg("{out}", 8), on_step=hook)
else:
    r, _ = resume("{out}", steps=5)
if sys.argv[1] != "kill":
    print("RESULT", json.dumps({{"best_step": r["best_step"], "test": r["test"]}}))
"""
    script = ctx.work / "stale_best.py"
    script.write_text(code)
    run = [subprocess.run([sys.executable, str(script), what], capture_output=True, text=True, env=ctx.env(),
                          timeout=600) for what in ("straight", "kill", "resume")]  # fmt: skip
    if "Traceback" in run[2].stderr or run[2].returncode:
        return classify(run[2], 0)
    got = [json.loads(r.stdout.split("RESULT ")[1]) for r in (run[0], run[2])]
    same = ctx.python(f"""
from safetensors.torch import load_file
a, b = (load_file(f"{{d}}/best.safetensors") for d in ("{straight}", "{out}"))
print("SAME", all((a[k] == b[k]).all() for k in a))
""")  # fmt: skip
    if got[0] != got[1] or "SAME True" not in same.stdout:
        how = "as" if "SAME True" in same.stdout else "unlike"
        return Outcome("silent", f"resumed to step 5: {got[1]}, best.safetensors {how} a straight run's "
                       f"({got[0]})")
    return Outcome("clear", f"the resumed run reports {got[1]} and keeps the best weights of a straight one")


def lr_inf(ctx: Context) -> Outcome:
    out = ctx.folder()
    done = ctx.finetune(out, "--lr", "inf", "--steps", "1")
    return classify(done, 2, right=not (out / "checkpoint.safetensors").exists())


def overflow(ctx: Context) -> Outcome:
    out = ctx.folder()
    done = ctx.finetune(out, "--lr", "3e38", "--eps", "1e-6", "--steps", "1")
    check = ctx.python(f"""
import torch, pathlib
from safetensors.torch import load_file
bad = [p.name for p in pathlib.Path("{out}").glob("*.safetensors")
       if any(not torch.isfinite(t).all() for t in load_file(str(p)).values())]
print("NONFINITE", bad)
""")  # fmt: skip
    if "NONFINITE []" not in check.stdout:
        saved = check.stdout.strip()[-80:]
        return Outcome("silent", f"exit {done.returncode}; non-finite tensors saved: {saved}")
    if "step None" in done.stderr:
        return Outcome("silent", "says 'checkpoint (step None) is intact'")
    return classify(done, 3)


def _trained(ctx: Context, *flags: str) -> Path:
    out = ctx.folder()
    ctx.finetune(out, "--steps", "4", "--eval-every", "2", *flags)
    return out


def flip_checkpoint(ctx: Context, key: str) -> Outcome:
    out = _trained(ctx, "--method", "ft", "--schedule", "constant")
    _flip(out / "checkpoint.safetensors", _span(out / "checkpoint.safetensors", key))
    return classify(ctx.hdopt("finetune", "--resume", out, "--steps", "6", "--no-progress"), 2)


def flip_best(ctx: Context) -> Outcome:
    out = _trained(ctx, "--method", "ft")
    _flip(out / "best.safetensors", _span(out / "best.safetensors", "weights/model.norm.weight"))
    return classify(ctx.hdopt("compare", out), 2)


def flip_trajectory(ctx: Context) -> Outcome:
    out = _trained(ctx)
    path = out / "trajectory.bin"
    _flip(path, len(path.read_bytes()) - 3)
    return classify(ctx.hdopt("replay", out), 2)


def short_trajectory(ctx: Context) -> Outcome:
    out = _trained(ctx)
    path = out / "trajectory.bin"
    path.write_bytes(path.read_bytes()[:-48])  # one record of q = 1, one group
    return classify(ctx.hdopt("replay", out), 2)


def broken_checkpoint(ctx: Context, how: str) -> Outcome:
    out = _trained(ctx, "--method", "ft", "--schedule", "constant")
    path = out / "checkpoint.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncated" else os.urandom(len(data)))
    return classify(ctx.hdopt("finetune", "--resume", out, "--steps", "6", "--no-progress"), 2)


def sigterm(ctx: Context) -> Outcome:
    out = ctx.folder()
    flags = ctx.finetune_flags(out, "--steps", "200", "--eval-every", "50", "--lr", "1e-3")
    cmd = [sys.executable, "-m", "hdopt", *map(str, flags)]
    proc = subprocess.Popen(cmd, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    time.sleep(2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=300)
    if not (out / "checkpoint.safetensors").exists():
        return Outcome("lost", f"exit {proc.returncode}, nothing saved")
    data = (out / "checkpoint.safetensors").read_bytes()
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    saved = json.loads(header["__metadata__"]["meta"])["step"]
    rows = (out / "metrics.jsonl").read_text().splitlines()
    logged = max(json.loads(line)["step"] for line in rows if line)
    if proc.returncode != 143 and logged > saved:
        return Outcome("lost", f"exit {proc.returncode}: steps {saved + 1}-{logged} and more were not saved")
    resumed = ctx.hdopt("finetune", "--resume", out, "--no-progress")
    if proc.returncode != 143 or resumed.returncode != 0:
        return Outcome("silent", f"exit {proc.returncode}; resume exit {resumed.returncode}")
    return Outcome("clear", "checkpoint saved, exit 143, resume completes")


def leftover_temp(ctx: Context) -> Outcome:
    out = ctx.folder()
    out.mkdir()
    (out / ".checkpoint.safetensors.0123456789ab.tmp").write_bytes(b"\0" * 1000)
    done = ctx.finetune(out, "--steps", "1")
    left = (out / ".checkpoint.safetensors.0123456789ab.tmp").exists()
    return Outcome("silent", "the temporary file of a killed write is left") if left else classify(done, 0)


def _task_copy(ctx: Context, **splits: str) -> Path:
    """The toy task copied into a new folder, the named splits' files replaced by ``splits[name]``."""
    folder = ctx.work / f"task{ctx.n}"
    ctx.n += 1
    shutil.copytree(ctx.task.parent, folder)
    for split, text in splits.items():
        (folder / f"{split}.jsonl").write_text(text)
    return folder / ctx.task.name


def _refused_before_training(ctx: Context, task: Path, *flags: str) -> Outcome:
    out = ctx.folder()
    return classify(ctx.finetune(out, "--steps", "2", *flags, task=task), 2, right=not out.exists())


def empty_eval(ctx: Context) -> Outcome:
    return _refused_before_training(ctx, _task_copy(ctx, eval=""))


def dict_field(ctx: Context) -> Outcome:
    rows = (ctx.task.parent / "train.jsonl").read_text().splitlines()
    rows[0] = json.dumps({"text": {"a": [1, 2]}, "label": "0"})
    return _refused_before_training(ctx, _task_copy(ctx, train="\n".join(rows) + "\n"))


def max_length(ctx: Context, length: str) -> Outcome:
    """The toy's options are 4 byte tokens: 1 leaves no room for them, 4 none for a prompt token."""
    out = ctx.folder()
    done = ctx.finetune(out, "--steps", "2", "--max-length", length)
    if done.returncode == 0:
        return Outcome("silent", f"exit 0: trained and tested with --max-length {length}")
    return classify(done, 2, right=f"--max-length {length}" in done.stderr and not out.exists())


def outside_data(ctx: Context, allowed: bool) -> Outcome:
    """A task file whose train split is ``../secret.jsonl``: refused without echoing a line of it, unless
    ``--allow-outside-data``."""
    task = _task_copy(ctx)
    secret = task.parent.parent / f"secret{ctx.n}.jsonl"
    secret.write_text('{"text": "the secret line", "label": "1"}\n' * 32)
    task.write_text(task.read_text().replace("train: train.jsonl", f"train: ../{secret.name}"))
    out = ctx.folder()
    done = ctx.finetune(out, "--steps", "1", *(["--allow-outside-data"] if allowed else []), task=task)
    if "the secret line" in (done.stderr or "") + (done.stdout or ""):
        return Outcome("silent", "a line of the outside file is echoed")
    if allowed:
        return classify(done, 0, right=(out / "results.json").is_file())
    if done.returncode == 0:
        return Outcome("silent", "exit 0: the outside file was read")
    return classify(done, 2, right=not out.exists())


def eval_unwritable(ctx: Context) -> Outcome:
    """``hdopt eval --output-dir`` under a regular file (root ignores read-only modes): refused before the
    model is evaluated, within seconds."""
    blocker = ctx.work / f"a-file{ctx.n}"
    blocker.write_text("not a folder")
    done = ctx.hdopt("eval", "--model", ctx.model, "--task", ctx.task, "--num-eval", "8", "--no-progress",
                     "--output-dir", blocker / "run")  # fmt: skip
    return classify(done, 2)


def eval_late_failure(ctx: Context) -> Outcome:
    """A failure in the third batch of ``hdopt eval`` (batches of 4): the first two batches' predictions
    must be in predictions.jsonl."""
    out = ctx.folder()
    done = ctx.python(f"""
import sys
from hdopt.lm import evaluation
real, calls = evaluation.predict, []
def predict(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        raise RuntimeError("a late failure")
    return real(*args, **kwargs)
evaluation.predict = predict
from hdopt.cli import main
try:
    main(["eval", "--model", "{ctx.model}", "--task", "{ctx.task}", "--num-eval", "16", "--batch-size", "4",
          "--no-progress", "--output-dir", "{out}"])
except RuntimeError:
    pass
""")  # fmt: skip
    path = out / "predictions.jsonl"
    rows = len(path.read_text().splitlines()) if path.is_file() else 0
    if rows < 8:
        return Outcome("lost", f"{rows} predictions kept of the 8 made before the failure")
    return Outcome("clear", f"{rows} predictions of the 8 made before the failure are in predictions.jsonl"
                   if done.returncode == 0 else f"exit {done.returncode}; {rows} predictions kept")


def rank0_dies(ctx: Context) -> Outcome:
    """torchrun, 2 processes: rank 0 is killed (-9) mid-run; rank 1 must name it, in one line."""
    out = ctx.folder()
    flags = ctx.finetune_flags(out, "--steps", "3000", "--eval-every", "1000", "--lr", "1e-3", "--log-every",
                               "1", "--dist-timeout", "30")  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m",
           "hdopt", *map(str, flags)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=ctx.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        if (out / "metrics.jsonl").is_file() and '"loss"' in (out / "metrics.jsonl").read_text():
            break
        time.sleep(0.1)
    ranks = {}
    for pid in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split():
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks.update({int(e[5:]): int(pid) for e in env if e.startswith(b"RANK=")})
    if 0 not in ranks:
        proc.kill()
        return Outcome("no answer", "rank 0 was not found among the launcher's processes")
    os.kill(ranks[0], signal.SIGKILL)
    try:
        _, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        return Outcome("no answer", "rank 1 still running 300 s after rank 0 died")
    said = [line for line in stderr.splitlines() if line.startswith("hdopt.distributed:")]
    if not said:
        return Outcome("silent", "rank 1 said nothing about its peer")
    line = said[0]
    if "frame #" in stderr or "never joined" in line or "rank 0" not in line:
        return Outcome("silent", line[:160])
    return Outcome("clear", line[line.find("collective #"):][:160])


CASES: list[tuple[str, str, Callable[[Context], Outcome]]] = [
    ("2", "two `hdopt finetune --output-dir SAME` started 3 s apart", lock),
    ("1", "kill -9 after a new best's dev evaluation, then `--resume --steps 5`", stale_best),
    ("3", "`--lr inf --steps 1`", lr_inf),
    ("3", "an update that overflows (`--lr 3e38 --eps 1e-6 --steps 1`)", overflow),
    ("4", "one byte flipped in the checkpoint's weights, then resume",
     lambda c: flip_checkpoint(c, "weights/model.norm.weight")),
    ("4", "one byte flipped in the checkpoint's RNG state, then resume",
     lambda c: flip_checkpoint(c, "state//rng")),
    ("4", "one byte flipped in best.safetensors, then `hdopt compare`", flip_best),
    ("4", "one byte flipped in trajectory.bin, then `hdopt replay`", flip_trajectory),
    ("4", "trajectory.bin without its last record, then `hdopt replay`", short_trajectory),
    ("4", "a truncated checkpoint, then resume", lambda c: broken_checkpoint(c, "truncated")),
    ("4", "a checkpoint of random bytes, then resume", lambda c: broken_checkpoint(c, "random")),
    ("5", "`--model` that does not exist (offline)",
     lambda c: classify(c.hdopt("finetune", "--model", c.work / "no-such-model", "--task", c.task), 2)),
    ("5", "a YAML config with a syntax error", lambda c: _yaml(c, "optim: {lr: [1e-5\n")),
    ("5", "`--device cuda` on a machine without CUDA",
     lambda c: classify(c.finetune(c.folder(), "--device", "cuda"), 2)),
    ("5", "`--device tpu9`", lambda c: classify(c.finetune(c.folder(), "--device", "tpu9"), 2)),
    ("5", "`hdopt compare` on a truncated results.json", lambda c: _compare_truncated(c)),
    ("5", "`hdopt lab equilibrium --set lr=nan`",
     lambda c: classify(c.hdopt("lab", "equilibrium", "--scale", "smoke", "--set", "lr=nan", "--out",
                                c.folder(), timeout=300), 2)),  # fmt: skip
    ("5", "`hdopt report --model bad`",
     lambda c: classify(c.hdopt("report", "--model", "bad", "--out", c.folder(), timeout=120), 2)),
    ("6", "YAML `steps: 2.5`", lambda c: _yaml(c, "train: {steps: 2.5}\n")),
    ("6", "YAML `batch_size: true`", lambda c: _yaml(c, "train: {batch_size: true, steps: 1}\n")),
    ("6", "YAML `num_train: abc`", lambda c: _yaml(c, "data: {num_train: abc}\n")),
    ("6", "`hdopt replay --steps -3`",
     lambda c: classify(c.hdopt("replay", _trained(c), "--steps", "-3"), 2)),
    ("6", "`hdopt lab equilibrium --n-train -5`",
     lambda c: classify(c.hdopt("lab", "equilibrium", "--scale", "smoke", "--n-train", "-5", "--out",
                                c.folder(), timeout=300), 2)),  # fmt: skip
    ("8", "a temporary file of a killed checkpoint write, then a fresh run", leftover_temp),
    ("8", "SIGTERM during a run, then resume", sigterm),
    ("5", "`hdopt eval --output-dir` that cannot be written", eval_unwritable),
    ("5", "`hdopt eval` failing in its third batch: predictions of the first two kept", eval_late_failure),
    ("7", "an empty evaluation file", empty_eval),
    ("7", "`--max-length 1` (options of 4 tokens)", lambda c: max_length(c, "1")),
    ("7", "`--max-length 4` (options of 4 tokens: no prompt token left)", lambda c: max_length(c, "4")),
    ("7", "torchrun, 2 processes: rank 0 killed (-9) mid-run", rank0_dies),
    ("7", "a dict-valued field of a data row", dict_field),
    ("9", "a custom task whose data path is `../secret.jsonl`", lambda c: outside_data(c, False)),
    ("9", "the same with `--allow-outside-data`", lambda c: outside_data(c, True)),
]


def _compare_truncated(ctx: Context) -> Outcome:
    out = _trained(ctx)
    text = (out / "results.json").read_text()
    (out / "results.json").write_text(text[: len(text) // 2])
    return classify(ctx.hdopt("compare", out), 2)


def build(work: Path) -> None:
    """The tiny random Llama (saved) and the toy task of tests/finetune."""
    code = f"""
from pathlib import Path
from tests.finetune.conftest import make_model, byte_tokenizer, _write_task
work = Path("{work}")
make_model("llama").save_pretrained(work / "tiny-llama")
byte_tokenizer(add_bos=True).save_pretrained(work / "tiny-llama")
(work / "toy").mkdir()
words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]
rows = [{{"text": f"{{'good' if i % 2 else 'bad'}} {{words[i % 8]}}", "label": str(i % 2)}}
        for i in range(64)]
_write_task(work / "toy", "toy", rows, 48,
            "template: '{{text}}:'\\nlabel_column: label\\nlabel_words: {{'0': ' no', '1': ' yes'}}\\n")
"""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="src/ of the checkout under test")
    parser.add_argument("--tag", default=None, help="results file suffix (e.g. before)")
    parser.add_argument("--only", nargs="+", type=int, help="run only these case numbers (1-based)")
    parser.add_argument("--table", action="store_true",
                        help="only write results/faults.md from faults_before.json and faults.json")
    args = parser.parse_args()
    if args.table:
        from hdopt.io import atomic_write_text

        atomic_write_text(RESULTS / "faults.md", table() + "\n")
        return
    work = Path(tempfile.mkdtemp(prefix="hdopt-faults-"))
    build(work)
    ctx = Context(work, args.src.resolve())
    rows = []
    try:
        for number, (item, what, case) in enumerate(CASES, 1):
            if args.only and number not in args.only:
                continue
            start = time.perf_counter()
            try:
                outcome = case(ctx)
            except Exception as err:  # noqa: BLE001 - a case the harness could not run is reported as such
                outcome = Outcome("no answer", f"the harness failed: {type(err).__name__}: {err}"[:160])
            seconds = round(time.perf_counter() - start, 1)
            rows.append({"case": number, "item": item, "what": what, "verdict": outcome.verdict,
                         "detail": outcome.detail, "seconds": seconds})  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    name = f"faults{'_' + args.tag if args.tag else ''}"
    if args.only and (RESULTS / f"{name}.json").is_file():  # rerun cases: the other rows stay
        kept = json.loads((RESULTS / f"{name}.json").read_text())
        rows = sorted([r for r in kept["rows"] if r["case"] not in args.only] + rows, key=lambda r: r["case"])
        sys.argv = [a for a in sys.argv if a != "--only" and not a.isdigit()]
    counts = {v: sum(r["verdict"] == v for r in rows) for v in VERDICTS}
    command = ("python benchmarks/faults.py " + " ".join(sys.argv[1:])).strip()
    host = {"python": platform.python_version(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    doc = {"command": command, "src": str(args.src), "counts": counts, "rows": rows, "host": host}
    from hdopt.io import atomic_write_json

    atomic_write_json(RESULTS / f"{name}.json", doc)
    if not args.tag and (RESULTS / "faults_before.json").is_file():
        from hdopt.io import atomic_write_text

        atomic_write_text(RESULTS / "faults.md", table() + "\n")
    print(json.dumps(counts))


def table() -> str:
    """The cases with their outcome before (``faults_before.json``) and after (``faults.json``)."""
    before, after = (json.loads((RESULTS / f"{n}.json").read_text()) for n in ("faults_before", "faults"))
    old = {r["case"]: r for r in before["rows"]}
    (old_cmd, old_date), (new_cmd, new_date) = ((d["command"], d["host"]["date_utc"]) for d in (before,
                                                                                                 after))
    lines = [f"Generated by `python benchmarks/faults.py --table` from `{old_cmd}` ({old_date} UTC) "
             f"and `{new_cmd}` ({new_date} UTC).", "",
             "| case | item | before | after: what it says |", "|---|---|---|---|"]  # fmt: skip
    for r in after["rows"]:
        was = old.get(r["case"], {}).get("verdict", "-")
        detail = WORK.sub("WORK", r["detail"]).replace("|", "/")  # the temporary folder of the run
        lines.append(f"| {r['case']}. {r['what']} | {r['item']} | {was} | {r['verdict']}: {detail} |")
    for name, doc in (("before", before), ("after", after)):
        counts = ", ".join(f"{doc['counts'][v]} {v}" for v in VERDICTS)
        lines.append(f"\n{name}: {counts} (of {len(doc['rows'])} cases)")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
