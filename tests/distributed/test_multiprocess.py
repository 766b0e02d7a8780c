"""Two CPU processes (gloo): Local SGD and data-parallel ZO against their one-process references, checkpoints,
refused configs, and a rank that dies or hangs. One torchrun launch runs the happy-path scenarios."""

from __future__ import annotations

import pytest
import torch

from hdopt.distributed import Communicator

from .launch import bare, torchrun
from .scenarios import LOCAL_SGD_STEPS, LocalRun, zo_run

pytestmark = pytest.mark.distributed


def _load(path):
    return torch.load(path, weights_only=False)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun")
    first = torchrun(out, "local_sgd", "zo", "checkpoint", "mismatch", "model_import")
    assert first.returncode == 0, first.stderr[-3000:]
    second = torchrun(out, "resume")  # new processes: a real resume
    assert second.returncode == 0, second.stderr[-3000:]
    return out


def test_destroying_the_group_stops_its_threads_even_after_a_model_import(runs):
    """A group still referenced after destroy_process_group is torn down at interpreter exit, which now and
    then aborts a finished run (SIGABRT): init_from_env imports the modules that would capture it first."""
    for rank in range(2):
        threads = (runs / f"threads.rank{rank}.txt").read_text().split()
        if not threads:
            pytest.skip("no /proc/self/task here to list a process's threads")
        assert not [t for t in threads if "gloo" in t], threads


def test_two_processes_equal_the_simulated_mode(runs):
    sim = LocalRun([0, 1], Communicator.single())
    sim.train(LOCAL_SGD_STEPS)
    for rank in range(2):
        got = _load(runs / f"local_sgd.rank{rank}.pt")
        assert (got["flat"] - sim.flat(rank)).abs().max() <= 1e-6
        assert got["rounds"] == len(sim.sgd.rounds) == 4
        assert got["bytes"] == sim.sgd.bytes_communicated == got["comm_bytes"]
    assert not torch.equal(sim.flat(0), sim.flat(1))  # the run ends mid-round: a real per-rank comparison


@pytest.mark.parametrize("variant", ["sgd", "adam+accumulation", "conservative", "fzoo",
                                     "hizoo+accumulation"])  # fmt: skip
def test_data_parallel_zo_equals_one_process_with_the_whole_batch(runs, variant):
    rule = variant.split("+")[0]
    ref = zo_run(0, 1, Communicator.single(), rule=rule)  # one process, the whole batch of 8 in one closure
    for rank in range(2):
        got = _load(runs / f"zo.rank{rank}.pt")[variant]
        rel = (got["params"] - ref["params"]).norm() / ref["params"].norm()
        assert rel <= 1e-6
        torch.testing.assert_close(got["grads"], ref["grads"], rtol=1e-6, atol=0)
        # q = 2 gradients (+ 3 candidate losses); FZOO: l_0 and 2 perturbed losses; HiZOO: l0, 2 x (l+, l-)
        per_step = 8 * {"fzoo": 3, "hizoo": 5}.get(rule, 2 + 3 * (rule == "conservative"))
        assert got["bytes"] == per_step * len(ref["losses"])
    moved = (ref["params"] - zo_run(0, 1, Communicator.single(), steps=0, rule=rule)["params"]).norm()
    assert moved > 1e-3  # the trajectory is not trivial


def test_resume_from_a_mid_round_checkpoint_matches_the_straight_run(runs):
    for rank in range(2):
        straight = _load(runs / f"local_sgd.rank{rank}.pt")["flat"]
        resumed = _load(runs / f"resume.rank{rank}.pt")["flat"]
        assert torch.equal(straight, resumed)
    assert not list(runs.glob(".ckpt.pt.*"))  # no temporary file left behind


def test_mismatched_seeds_are_refused_on_every_rank(runs):
    for rank in range(2):
        local, zo = _load(runs / f"mismatch.rank{rank}.pt")["messages"]
        assert "refusing to start the Local SGD" in local and "initial weights differs" in local
        assert "refusing to start the data-parallel ZO" in zo and "zo seed" in zo and "rank 1" in zo


@pytest.mark.parametrize("kind", ["die", "hang"])
def test_a_dead_or_hung_rank_is_named_within_the_deadline(tmp_path, kind):
    rank0, rank1 = bare(tmp_path, kind, timeout_s=3.0)
    assert rank0.returncode == 3, rank0.stderr[-2000:]
    assert "rank 1" in rank0.stderr and "did not join it: it died or hangs" in rank0.stderr, rank0.stderr
    waited = float((tmp_path / f"{kind}.rank0.seconds").read_text())
    assert waited < (1.0 if kind == "die" else 3.0 + 2.0)
    if kind == "die":
        assert rank1.returncode == 17
