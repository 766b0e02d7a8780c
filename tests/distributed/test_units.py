"""Single-process pieces: schedules, configs, sharding, start-up checks, diagnosis, checkpoints, DP-ZO."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from hdopt.distributed import (
    Communicator,
    ConfigMismatchError,
    ConstantPeriod,
    LocalSGDConfig,
    PhasePeriod,
    QSRPeriod,
    RankFailureError,
    check_consistent,
    data_parallel_zo,
    fingerprint,
    load_checkpoint,
    save_checkpoint,
    shard_batch,
    shard_range,
    worker_seed,
)
from hdopt.zo import ZOSGD


# -- schedules and config ---------------------------------------------------------------------------------
def test_schedules():
    assert ConstantPeriod(16).period(123, 0.5) == 16
    phases = PhasePeriod((100, 200), (2, 8, 32))
    assert [phases.period(s, 1.0) for s in (0, 99, 100, 199, 200, 10**6)] == [2, 2, 8, 8, 32, 32]
    qsr = QSRPeriod(base=4, alpha=0.2, max_period=1000)
    assert qsr.period(0, 0.2) == 4 and qsr.period(0, 0.1) == 4  # (0.2/0.1)^2 = 4
    assert qsr.period(0, 0.05) == 16 and qsr.period(0, 0.03) == math.floor((0.2 / 0.03) ** 2)
    assert qsr.period(0, 1e-9) == 1000 and qsr.period(0, 0.0) == 1000


@pytest.mark.parametrize("kwargs,match", [
    ({"period": 0}, "period H"),
    ({"schedule": "cubic"}, "schedule must be one of"),
    ({"schedule": "phase", "phase_milestones": (10,), "phase_periods": (2,)}, "one more period"),
    ({"schedule": "phase", "phase_milestones": (10, 5), "phase_periods": (1, 2, 3)}, "increasing"),
    ({"schedule": "qsr", "qsr_alpha": 0.0}, "alpha"),
    ({"post_local_steps": -1}, "post_local_steps"),
    ({"outer_lr": 0.0}, "outer_lr"),
    ({"outer_momentum": 1.0}, "outer_momentum"),
    ({"outer_nesterov": True}, "outer_nesterov needs"),
])
def test_bad_configs_are_refused_with_the_field_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LocalSGDConfig(**kwargs)


# -- sharding ---------------------------------------------------------------------------------------------
def test_shard_batch_splits_every_tensor_contiguously():
    batch = {"ids": torch.arange(12).view(6, 2), "labels": torch.arange(6), "name": "sst2"}
    parts = [shard_batch(batch, r, 3) for r in range(3)]
    assert torch.equal(torch.cat([p["ids"] for p in parts]), batch["ids"])
    assert parts[1]["labels"].tolist() == [2, 3] and parts[2]["name"] == "sst2"
    x, y = shard_batch((torch.ones(4, 3), torch.zeros(4)), 1, 2)
    assert x.shape == (2, 3) and y.shape == (2,)
    assert shard_range(8, 3, 4) == slice(6, 8)
    with pytest.raises(ValueError, match="divisible"):
        shard_batch(torch.ones(5), 0, 2)
    with pytest.raises(ValueError, match="different first dimensions"):
        shard_batch((torch.ones(4), torch.ones(6)), 0, 2)
    assert worker_seed(0, 1) != worker_seed(0, 2) and worker_seed(0, 1) == worker_seed(0, 1)


# -- start-up checks with fake peers ----------------------------------------------------------------------
class FakePeers(Communicator):
    """Rank 0 of a pretend world whose other ranks report the given records."""

    def __init__(self, others):
        super().__init__()
        self.others = others
        self.world_size = 1 + len(others)

    def all_gather_object(self, obj, what):
        return [obj, *self.others]


def _model(seed=0, width=4):
    torch.manual_seed(seed)
    return nn.Linear(3, width)


def test_matching_fingerprints_pass_and_mismatches_name_field_and_rank():
    cfg = LocalSGDConfig(period=4)
    mine = fingerprint(cfg, _model())
    check_consistent(mine, FakePeers([dict(mine)]))
    with pytest.raises(ConfigMismatchError, match=r"initial weights differs \(rank 0 vs ranks \[2\]\)"):
        check_consistent(mine, FakePeers([dict(mine), fingerprint(cfg, _model(seed=1))]))
    with pytest.raises(ConfigMismatchError, match=r"config differs.*period: 4 vs 8.*model layout differs"):
        check_consistent(mine, FakePeers([fingerprint(LocalSGDConfig(period=8), _model(width=5))]))


def test_zo_seed_is_part_of_the_fingerprint():
    m = _model()
    a = fingerprint(None, m, ZOSGD(m.named_parameters(), lr=1e-3, seed=1))
    b = fingerprint(None, m, ZOSGD(m.named_parameters(), lr=1e-3, seed=2))
    assert {k for k in a if a[k] != b[k]} == {"zo seed and estimator"}


class FakeStore:
    def __init__(self, values):
        self.values = values

    def check(self, keys):
        return all(k in self.values for k in keys)

    def get(self, key):
        return self.values[key].encode()


def test_diagnosis_names_the_rank_that_did_not_join():
    comm = Communicator.single()
    comm.world_size, comm.rank, comm._seq, comm.timeout_s = 4, 0, 12, 5.0
    comm.store = FakeStore({"hdopt/heartbeat/0": "12", "hdopt/heartbeat/1": "12", "hdopt/heartbeat/2": "11"})
    message = comm.diagnose("Local SGD averaging at step 40", RuntimeError("Operation timed out!"))
    assert "rank 2 (last joined #11), rank 3 (never joined a collective) did not join it" in message
    assert message.startswith("Local SGD averaging at step 40: collective #12 failed on rank 0 of 4")
    comm.store = FakeStore({f"hdopt/heartbeat/{r}": "12" for r in range(4)})
    assert "a rank died during it" in comm.diagnose("x", RuntimeError("reset"))
    assert issubclass(RankFailureError, RuntimeError)


class DeadStore(FakeStore):
    """The store of a job whose host (rank 0, or the launcher) died: every read fails."""

    def check(self, keys):
        raise RuntimeError("Connection reset by peer\nException raised from recvBytes\nframe #0: c10::Error")


def test_diagnosis_blames_the_store_host_when_the_store_cannot_be_read():
    """Rank 0 died with the store: the heartbeats are unreadable, not absent ("never joined a collective"
    would blame every rank that joined ~170 collectives)."""
    comm = Communicator.single()
    comm.world_size, comm.rank, comm._seq, comm.timeout_s = 2, 1, 170, 5.0
    comm.store = DeadStore({})
    message = comm.diagnose("ZO all-reduce", RuntimeError("Connection closed by peer\nframe #0: c10::Error"))
    assert "the rendezvous store is unreachable: rank 0 or the launcher died" in message
    assert "never joined" not in message and "frame #" not in message and "\n" not in message
    comm.store = FakeStore({"hdopt/heartbeat/0": "170", "hdopt/heartbeat/1": "170"})  # the store outlived it
    assert "every rank had joined it, so rank 0 died during it" in comm.diagnose("x", RuntimeError("reset"))


# -- checkpoints ------------------------------------------------------------------------------------------
def test_checkpoint_round_trip_and_world_size_check(tmp_path):
    comm = Communicator.single()
    state = {"model": _model().state_dict(), "step": 7, "gen": torch.Generator().manual_seed(3).get_state()}
    path = save_checkpoint(tmp_path / "run" / "ckpt.pt", state, comm)
    loaded = load_checkpoint(path, comm)
    assert loaded["step"] == 7 and torch.equal(loaded["model"]["weight"], state["model"]["weight"])
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]
    other = FakePeers([{}])
    with pytest.raises(ValueError, match="nproc_per_node 1"):
        load_checkpoint(path, other)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "missing.pt", comm)


# -- data-parallel ZO in one process ----------------------------------------------------------------------
def test_data_parallel_zo_in_one_process_is_the_plain_optimizer():
    x, y = torch.randn(8, 3), torch.randint(0, 4, (8,))
    runs = []
    for parallel in (False, True):
        m = _model(width=4)
        if parallel:
            opt = data_parallel_zo(ZOSGD, m.named_parameters(), Communicator.single(), model=m, lr=1e-2,
                                   seed=5)  # fmt: skip
        else:
            opt = ZOSGD(m.named_parameters(), lr=1e-2, seed=5)
        for _ in range(3):
            opt.step(lambda m=m: nn.functional.cross_entropy(m(x), y))
        runs.append(m.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])
    assert opt.reduce.steps == 3 and opt.reduce.bytes == 0
    with pytest.raises(ValueError, match="leave `reduce` out"):
        data_parallel_zo(ZOSGD, m.named_parameters(), Communicator.single(), lr=1e-2, reduce=opt.reduce)


def test_data_parallel_zo_refuses_what_it_cannot_run():
    m = _model()
    with pytest.raises(TypeError, match="DistributedDataParallel"):
        data_parallel_zo(torch.optim.SGD, m.parameters(), Communicator.single(), lr=0.1)
