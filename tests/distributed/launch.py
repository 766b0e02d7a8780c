"""Starting 2-process jobs for the tests: through torchrun, or bare processes with torchrun's environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import hdopt

WORKER = Path(__file__).with_name("worker.py")
SRC = str(Path(hdopt.__file__).resolve().parents[1])


@dataclass
class Proc:
    returncode: int | None
    stdout: str
    stderr: str
    seconds: float


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, env.get("PYTHONPATH", "")]))
    env.update(OMP_NUM_THREADS="1", **extra)
    return env


def torchrun(out: Path, *scenarios: str, nproc: int = 2, timeout: float = 180) -> Proc:
    """``torchrun --standalone --nproc_per_node N worker.py OUT SCENARIO...``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(WORKER), str(out), *scenarios]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    return Proc(done.returncode, done.stdout, done.stderr, time.perf_counter() - start)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare(out: Path, scenario: str, world: int = 2, timeout_s: float = 3.0, wait: float = 90) -> list[Proc]:
    """Start ``world`` worker processes directly (no agent that would kill the survivors when one dies).

    Waits for rank 0 (at most ``wait`` seconds), then kills any rank still running.
    """
    port = str(free_port())
    procs = []
    start = time.perf_counter()
    for rank in range(world):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port, HDOPT_TEST_TIMEOUT=str(timeout_s))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), scenario], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for i, p in enumerate(procs):
        try:
            stdout, stderr = p.communicate(timeout=wait if i == 0 else 2)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, stderr = p.communicate()
            results.append(Proc(None, stdout, stderr, time.perf_counter() - start))
            continue
        results.append(Proc(p.returncode, stdout, stderr, time.perf_counter() - start))
    return results
