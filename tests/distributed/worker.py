"""Multi-process worker for tests/distributed: ``torchrun --nproc_per_node 2 worker.py OUT SCENARIO...``.

Scenarios write ``OUT/<scenario>.rank<r>.pt`` (tensors and messages) for the tests to compare.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from scenarios import LOCAL_SGD_STEPS, LocalRun, zo_run

from hdopt.distributed import (
    Communicator,
    ConfigMismatchError,
    exit_on_rank_failure,
    init_from_env,
    load_checkpoint,
    save_checkpoint,
)


def local_sgd(comm: Communicator, out: Path) -> None:
    run = LocalRun([comm.rank], comm)
    run.train(LOCAL_SGD_STEPS)
    torch.save({"flat": run.flat(), "rounds": len(run.sgd.rounds), "bytes": run.sgd.bytes_communicated,
                "comm_bytes": comm.stats.bytes}, out / f"local_sgd.rank{comm.rank}.pt")


def zo(comm: Communicator, out: Path) -> None:
    runs = {"sgd": zo_run(comm.rank, comm.world_size, comm),
            "adam+accumulation": zo_run(comm.rank, comm.world_size, comm, rule="adam", micro=2),
            "conservative": zo_run(comm.rank, comm.world_size, comm, rule="conservative"),
            "fzoo": zo_run(comm.rank, comm.world_size, comm, rule="fzoo"),
            "hizoo+accumulation": zo_run(comm.rank, comm.world_size, comm, rule="hizoo", micro=2)}
    torch.save(runs, out / f"zo.rank{comm.rank}.pt")


def checkpoint(comm: Communicator, out: Path) -> None:
    """Train 7 steps (mid-round: replicas differ), checkpoint, and stop; ``resume`` finishes the run."""
    run = LocalRun([comm.rank], comm)
    run.train(7)
    save_checkpoint(out / "ckpt.pt", run.state_dict(), comm)


def resume(comm: Communicator, out: Path) -> None:
    run = LocalRun([comm.rank], comm)
    run.load_state_dict(load_checkpoint(out / "ckpt.pt", comm))
    run.train(LOCAL_SGD_STEPS - 7)
    torch.save({"flat": run.flat()}, out / f"resume.rank{comm.rank}.pt")


def mismatch(comm: Communicator, out: Path) -> None:
    """Rank 1 builds its model from another seed, then uses another ZO seed: both ranks refuse both."""
    messages = []
    for start in (lambda: LocalRun([comm.rank], comm, seed=comm.rank),
                  lambda: zo_run(comm.rank, comm.world_size, comm, seed=7 + comm.rank)):
        try:
            start()
            messages.append("started")
        except ConfigMismatchError as err:
            messages.append(str(err))
    torch.save({"messages": messages}, out / f"mismatch.rank{comm.rank}.pt")


def fault(comm: Communicator, out: Path, kind: str) -> None:
    """Rank 1 dies (``die``) or sleeps (``hang``) before its 7th step; rank 0 must fail naming rank 1."""
    run = LocalRun([comm.rank], comm)
    run.train(6)
    if comm.rank == 1:
        if kind == "die":
            os._exit(17)
        time.sleep(120)
    start = time.perf_counter()
    try:
        run.train(10)
    finally:
        (out / f"{kind}.rank{comm.rank}.seconds").write_text(f"{time.perf_counter() - start:.3f}")


def model_import(comm: Communicator, out: Path) -> None:
    """Import transformers' model code with the group alive, as loading a model under torchrun does: it
    imports torch.distributed.nn.functional, whose default arguments capture the default group."""
    import transformers.modeling_utils  # noqa: F401


def native_threads() -> list[str]:
    """The names of this process's threads, native ones included (gloo's are ``gloo_tcp_loop`` and
    ``pt_gloo_runloop``); empty where /proc is not available."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return []
    return sorted((t / "comm").read_text().strip() for t in tasks.iterdir())


SCENARIOS = {"local_sgd": local_sgd, "zo": zo, "checkpoint": checkpoint, "resume": resume,
             "mismatch": mismatch, "model_import": model_import}


def main() -> None:
    out, names = Path(sys.argv[1]), sys.argv[2:]
    timeout = float(os.environ.get("HDOPT_TEST_TIMEOUT", "60"))
    torch.set_num_threads(1)
    init_from_env(timeout_s=60.0)  # generous start-up; the training deadline is the communicator's
    comm = Communicator(timeout_s=timeout)
    with exit_on_rank_failure(code=3):
        for name in names:
            if name in ("die", "hang"):
                fault(comm, out, name)
            else:
                SCENARIOS[name](comm, out)
        # An orderly shutdown: a group still alive when the interpreter exits is torn down during
        # finalization, which now and then aborts a rank ("terminate called without an active exception").
        # The thread list written below shows whether the destroy really freed it (see init_from_env).
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
        (out / f"threads.rank{comm.rank}.txt").write_text("\n".join(native_threads()))


if __name__ == "__main__":
    main()
