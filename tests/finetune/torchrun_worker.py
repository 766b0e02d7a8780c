"""Worker for tests/finetune/test_torchrun.py: one rank of a data-parallel ``finetune`` run.

    python torchrun_worker.py OUT TOY_TASK GEN_TASK own|trainer SCENARIO...

Started with torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT, ...). ``own``: the worker
creates the process group once and runs every scenario in it (the trainer uses that group and leaves it);
``trainer``: the trainer creates and destroys the group itself in every run. Runs write their folders under
``OUT/runs``; every rank records its own file writes there (an audit hook) and saves what each scenario
did to ``OUT/<scenario>.rank<r>.pt``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.distributed as dist

from hdopt.distributed import init_from_env
from hdopt.finetune import RunConfig, finetune, resume, trainer
from hdopt.lm import scoring
from tests.finetune.conftest import byte_tokenizer, make_model, toy_config

STEPS = 4
COMMON = dict(steps=STEPS, batch_size=4, eval_every=2, keep_weights=True)  # batch 4: 2 examples per rank
RUNS = {  # name -> (method, task, overrides)
    "mezo": ("mezo", "toy", dict(q=2, momentum=0.5, lr=1e-2)),
    "lora": ("mezo-lora", "toy", dict(optimizer="zoadam", lr=0.1, grad_accum=2)),
    "prefix": ("mezo-prefix", "toy", dict(optimizer="zoconservative", lr=1e-2)),
    "gen": ("mezo", "gen", dict(lr=1e-2, num_dev=0, num_eval=4, eval_every=0)),  # answer loss
}
ERRORS = {  # name -> (run, overrides for every rank, overrides for rank 1 only)
    "indivisible": ("mezo", dict(batch_size=3), {}),
    "backprop": ("mezo", dict(method="ft", optimizer="adamw"), {}),
    "mismatch": ("mezo", {}, dict(lr=2e-2)),
}
KILL_AT = 3  # the "kill" run stops after this step; it last saved at step 2


class Killed(Exception):
    """Stands in for a kill of every rank: leaves the loop without saving."""


def run_config(name: str, tasks: dict[str, Path], out: Path, **extra) -> RunConfig:
    """The config of run ``name`` (shared with the one-process reference in the test)."""
    method, task, overrides = RUNS[name]
    return toy_config(tasks[task], out, method, **{**COMMON, **overrides, **extra})


def tiny_model():
    """The tiny GPT-2 in float64 (with :func:`float64_losses`, exact comparisons far below 1e-6; Llama
    would not do: its RMSNorm and rotary embeddings compute in float32 whatever the weights' dtype)."""
    return make_model("gpt2").double()


@contextlib.contextmanager
def float64_losses() -> Iterator[None]:
    """Keep the logits in float64 in hdopt.lm.scoring, which casts them to float32 for the log-softmax.

    In float32 the mean of the shard losses and the whole-batch loss differ by an ulp, which SPSA's
    1 / (2 eps) amplifies to about 1e-4 of a projected gradient: too coarse to show that data-parallel
    training computes the one-process step (the CLI test measures the float32 figure).
    """
    real = scoring.token_logprobs

    def token_logprobs(model, batch, prefix=None):  # scoring.token_logprobs without the float32 cast
        seq, pos = batch.target_seq, batch.target_pos
        inner = scoring.unwrap_peft(model)
        if inner is not None and scoring._can_split(inner) and scoring._check_head(inner):
            hidden = inner.base_model(**scoring._model_inputs(inner.base_model, batch, prefix))[0]
            logits = scoring._head_logits(inner, hidden[seq, pos])
        else:
            logits = model(**scoring._model_inputs(model, batch, prefix)).logits[seq, pos]
        return torch.log_softmax(logits, dim=-1).gather(1, batch.target_token[:, None])[:, 0]

    scoring.token_logprobs = token_logprobs
    try:
        yield
    finally:
        scoring.token_logprobs = real


def watch_writes(root: Path, seen: list[str]) -> None:
    """Record every write, rename, removal and mkdir under ``root`` made by this process."""
    prefix = str(root)
    writing_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            by_mode = isinstance(mode, str) and any(c in mode for c in "wax+")
            writing = by_mode or bool(flags & writing_flags)
        elif event in ("os.rename", "os.remove", "os.mkdir", "os.rmdir"):
            path, writing = args[0] if event != "os.rename" else args[1], True
        else:
            return
        if writing and str(path).startswith(prefix):
            seen.append(f"{event} {path}")

    sys.addaudithook(hook)


def nan_on_rank_1(rank: int):
    """A ``make_closure`` whose closures return NaN on rank 1 from the 3rd micro-batch (step 2) on."""
    real, calls = trainer.make_closure, [0]

    def make_closure(*args, **kwargs):
        closure = real(*args, **kwargs)
        calls[0] += 1
        if rank == 1 and calls[0] > 2:
            return lambda: closure() * float("nan")
        return closure

    return make_closure


def recording(seen: list[list[str]]):
    """A ``make_closure`` that records the examples (uids) of every closure this rank builds."""
    real = trainer.make_closure

    def make_closure(model, tokenizer, task, examples, *args, **kwargs):
        seen.append([e.uid for e in examples])
        return real(model, tokenizer, task, examples, *args, **kwargs)

    return make_closure


def scenario(name: str, rank: int, tasks: dict[str, Path], runs: Path, tokenizer) -> dict:
    """Run one scenario on this rank; returns what it gave (results, or the error)."""
    record: dict = {"error": None}
    try:
        if name in RUNS:
            record["results"], _ = finetune(run_config(name, tasks, runs / name), tiny_model(), tokenizer)
        elif name == "kill":
            def stop(step: int) -> None:
                if step == KILL_AT:
                    raise Killed

            finetune(run_config("mezo", tasks, runs / "kill"), tiny_model(), tokenizer, on_step=stop)
        elif name == "resume":
            record["results"], _ = resume(runs / "kill", tiny_model(), tokenizer)
        elif name == "nan":
            real, trainer.make_closure = trainer.make_closure, nan_on_rank_1(rank)
            try:
                finetune(run_config("mezo", tasks, runs / "nan"), tiny_model(), tokenizer)
            finally:
                trainer.make_closure = real
        else:
            base, every, rank_1 = ERRORS[name]
            cfg = run_config(base, tasks, runs / name).replace(**every, **(rank_1 if rank == 1 else {}))
            finetune(cfg, tiny_model(), tokenizer)
    except Exception as err:  # noqa: BLE001 - the test reads the type and the message
        record["error"] = f"{type(err).__name__}: {err}"
    return record


def main() -> None:
    out, toy, gen, mode, names = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5:]
    tasks, runs = {"toy": Path(toy), "gen": Path(gen)}, out / "runs"
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    tokenizer = byte_tokenizer(add_bos=True)
    setups: list = []
    real_setup = trainer.setup
    trainer.setup = lambda *a, **k: setups.append(real_setup(*a, **k)) or setups[-1]
    writes: list[str] = []
    watch_writes(runs, writes)
    seen: list[list[str]] = []
    trainer.make_closure = recording(seen)
    if mode == "own":
        init_from_env(timeout_s=60.0)
    for name in names:
        start = time.perf_counter()
        with float64_losses():
            record = scenario(name, rank, tasks, runs, tokenizer)
        record["seconds"] = time.perf_counter() - start
        record["examples"] = list(seen)  # per closure built: the uids of this rank's shard
        seen.clear()
        if setups and name not in ERRORS:
            record["weights"] = {n: p.detach().clone() for n, p in setups[-1].params}
        setups.clear()
        record["group_alive"] = dist.is_initialized()
        torch.save(record, out / f"{name}.rank{rank}.pt")
    torch.save({"writes": writes}, out / f"writes.{mode}.rank{rank}.pt")
    if mode == "own":  # an orderly shutdown (see tests/distributed/worker.py)
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
