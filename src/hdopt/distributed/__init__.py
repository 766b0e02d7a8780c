"""hdopt.distributed: Local SGD (post-local, QSR, DiLoCo outer step) and data-parallel forward-only training.

Built on torch.distributed (``torchrun``; gloo on CPU, NCCL on GPU). Pieces:
:mod:`.comm` (collectives with a deadline that name a dead or hung rank), :mod:`.consistency` (start-up
config checks), :mod:`.averaging` (mean over local replicas x processes), :mod:`.schedules` (constant,
per-phase and QSR periods), :mod:`.local_sgd` (the Local SGD wrapper), :mod:`.zo` (data-parallel ZO),
:mod:`.data` (batch sharding, per-worker seeds), :mod:`.checkpoint` (rank-0 atomic checkpoints).
See docs/distributed.md.
"""

from hdopt.distributed.averaging import ReplicaAverager
from hdopt.distributed.checkpoint import load_checkpoint, save_checkpoint
from hdopt.distributed.comm import (
    Communicator,
    ConfigMismatchError,
    RankFailureError,
    exit_on_rank_failure,
    init_from_env,
)
from hdopt.distributed.consistency import broadcast_parameters, check_consistent, fingerprint
from hdopt.distributed.data import shard_batch, shard_range, worker_seed
from hdopt.distributed.local_sgd import LocalSGD, LocalSGDConfig, SyncRound, parameter_bytes
from hdopt.distributed.schedules import ConstantPeriod, PhasePeriod, QSRPeriod
from hdopt.distributed.zo import ScalarAllReduce, data_parallel_zo

__all__ = [
    "Communicator", "ConfigMismatchError", "ConstantPeriod", "LocalSGD", "LocalSGDConfig", "PhasePeriod",
    "QSRPeriod", "RankFailureError", "ReplicaAverager", "ScalarAllReduce", "SyncRound",
    "broadcast_parameters", "check_consistent", "data_parallel_zo", "exit_on_rank_failure", "fingerprint",
    "init_from_env", "load_checkpoint", "parameter_bytes", "save_checkpoint", "shard_batch",
    "shard_range", "worker_seed",
]
