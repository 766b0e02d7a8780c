"""Training recipes shared by the in-process tests and the multi-process workers (worker.py).

Each recipe takes the global indices of the workers this process holds and a communicator, so the same
function runs K workers in one process (simulated) or one worker per rank.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from hdopt.distributed import LocalSGD, LocalSGDConfig, data_parallel_zo, shard_batch, worker_seed
from hdopt.zo import FZOO, ZOSGD, HiZOO, ZOAdam, ZOConservative

LOCAL_SGD_CONFIG = LocalSGDConfig(
    schedule="phase", phase_milestones=(9,), phase_periods=(2, 5), post_local_steps=4,
    average_optimizer_state=True, outer_lr=0.8, outer_momentum=0.5, outer_nesterov=True,
)
LOCAL_SGD_STEPS = 18
ZO_STEPS = 6
ZO_BATCH = 8  # the global batch; each of N ranks gets ZO_BATCH / N


def bn_mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """8 -> 16 -> BatchNorm (running statistics) -> ReLU -> 4."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def dataset(n: int = 256, seed: int = 5, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g, dtype=dtype)
    y = (x[:, :4].argmax(1) + (torch.rand(n, generator=g) < 0.2).long()) % 4
    return x, y


class LocalRun:
    """K replicas (one per held worker) of a BN MLP with SGD+momentum, a cosine lr on replica 0, Local SGD."""

    def __init__(self, workers: list[int], comm, config: LocalSGDConfig = LOCAL_SGD_CONFIG, seed: int = 0):
        self.data = dataset()
        self.models = [bn_mlp(seed) for _ in workers]
        self.opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
                     for m in self.models]
        cosine = lambda t: 0.5 * (1 + math.cos(math.pi * min(t, 40) / 40))  # noqa: E731
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.opts[0], cosine)
        self.gens = [torch.Generator().manual_seed(worker_seed(1, w)) for w in workers]
        self.sgd = LocalSGD(self.models, self.opts, config, comm)

    def train(self, steps: int) -> None:
        x, y = self.data
        for _ in range(steps):
            for model, opt, gen in zip(self.models, self.opts, self.gens, strict=True):
                idx = torch.randint(0, len(y), (16,), generator=gen)
                opt.zero_grad()
                F.cross_entropy(model(x[idx]), y[idx]).backward()
            self.sgd.step()
            self.scheduler.step()

    def state_dict(self) -> dict:
        return {"models": [m.state_dict() for m in self.models], "local_sgd": self.sgd.state_dict(),
                "gens": [g.get_state() for g in self.gens], "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        for m, s in zip(self.models, state["models"], strict=True):
            m.load_state_dict(s)
        for g, s in zip(self.gens, state["gens"], strict=True):
            g.set_state(s)
        self.sgd.load_state_dict(state["local_sgd"])
        self.scheduler.load_state_dict(state["scheduler"])

    def flat(self, k: int = 0) -> torch.Tensor:
        return torch.cat([t.detach().reshape(-1).double() for t in self.models[k].state_dict().values()])


def zo_run(rank: int, world_size: int, comm, steps: int = ZO_STEPS, seed: int = 7, rule: str = "sgd",
           micro: int = 1) -> dict:
    """Data-parallel ZOSGD (q = 2, momentum), ZOAdam, ZOConservative, FZOO or HiZOO on a float64 MLP; every
    rank draws the same global batch and keeps its shard; ``micro`` > 1 feeds the shard as micro-batches
    (gradient accumulation)."""
    x, y = dataset(dtype=torch.float64)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()
    if rule == "sgd":
        opt = data_parallel_zo(ZOSGD, model.named_parameters(), comm, model=model, lr=0.05, eps=1e-3, q=2,
                               seed=seed, momentum=0.5)  # fmt: skip
    elif rule == "conservative":
        opt = data_parallel_zo(ZOConservative, model.named_parameters(), comm, model=model, lr=0.05, eps=1e-3,
                               q=2, seed=seed)  # fmt: skip
    elif rule == "fzoo":  # the N + 1 = 3 raw losses are reduced, then normalized
        opt = data_parallel_zo(FZOO, model.named_parameters(), comm, model=model, lr=0.01, eps=1e-3, q=2,
                               seed=seed)  # fmt: skip
    elif rule == "hizoo":  # l0, l+_i, l-_i (2q + 1 = 5 losses) are reduced; every rank updates the same D
        opt = data_parallel_zo(HiZOO, model.named_parameters(), comm, model=model, lr=0.05, eps=1e-2, q=2,
                               hessian_smooth=0.1, seed=seed)  # fmt: skip
    else:
        opt = data_parallel_zo(ZOAdam, model.named_parameters(), comm, model=model, lr=0.01, eps=1e-3, q=2,
                               seed=seed)  # fmt: skip
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(steps):
        idx = torch.randperm(len(y), generator=gen)[:ZO_BATCH]
        xs, ys = shard_batch((x[idx], y[idx]), rank, world_size)
        if rule == "conservative":  # candidates are judged on this rank's shard, then averaged over ranks
            losses.append(opt.step(lambda xs=xs, ys=ys: F.cross_entropy(model(xs), ys)))
            continue
        for j in range(micro):
            xm, ym = shard_batch((xs, ys), j, micro)
            opt.estimate(lambda xm=xm, ym=ym: F.cross_entropy(model(xm), ym))
        losses.append(opt.step())
    params = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    grads = [g for r in opt.trajectory for g in r.grads]
    return {"params": params, "grads": torch.tensor(grads, dtype=torch.float64), "losses": losses,
            "bytes": opt.reduce.bytes}
