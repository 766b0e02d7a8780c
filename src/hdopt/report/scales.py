"""How much each report section runs at each scale.

``smoke`` takes seconds to a minute (the test suite renders it), ``quick`` fits in about 15 minutes on a
2-core CPU, ``paper`` uses the papers' protocols (hours on a CPU; meant for a GPU).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

SCALES = ("smoke", "quick", "paper")


@dataclass(frozen=True)
class Budget:
    """Attributes:
    lab_scale: the ``hdopt lab`` preset used for the implicit-bias and Local SGD experiments.
    num_train, num_dev, num_eval, max_length: SST-2 sample sizes and prompt length for fine-tuning.
    icl_demos: demonstrations for in-context learning.
    zo_steps, zo_eval_every, zo_noise: MeZO's budget; fo_steps, fo_eval_every: backprop FT's budget.
    top_lr, top_steps, top_eval_every: the best forward-only method hdopt has, read-position adapters on
        their exact gradient from forward passes over the context's cached keys and values (``--method
        read-adapters-exact``), chosen by benchmarks/zo_convergence.py (its SST-2 grid's lr; ``paper`` runs
        that grid's 400 steps, ``quick`` 200, where that grid's choice had its best dev accuracy, which
        keeps the whole report within its 15 minutes).
    memory_batch, memory_length: the random batch of the peak-memory probes.
    cost_rounds, cost_batch, cost_length: the ZO step vs forward timing.
    tint_tasks, tint_shots, tint_eval, tint_dev, tint_seeds: few-shot ICL vs TinT.
    tint_check_seeds: seeds of the tiny-model agreement checks.
    """

    lab_scale: str
    num_train: int
    num_dev: int
    num_eval: int
    max_length: int
    icl_demos: int
    zo_steps: int
    zo_eval_every: int
    zo_noise: str
    fo_steps: int
    fo_eval_every: int
    top_lr: float
    top_steps: int
    top_eval_every: int
    memory_batch: int
    memory_length: int
    cost_rounds: int
    cost_batch: int
    cost_length: int
    tint_tasks: tuple[str, ...]
    tint_shots: int
    tint_eval: int
    tint_dev: int
    tint_seeds: tuple[int, ...]
    tint_check_seeds: tuple[int, ...]

    def to_dict(self) -> dict:
        return asdict(self)


BUDGETS = {
    "smoke": Budget(
        lab_scale="smoke", num_train=32, num_dev=8, num_eval=8, max_length=48, icl_demos=2,
        zo_steps=2, zo_eval_every=1, zo_noise="rademacher", fo_steps=2, fo_eval_every=1,
        top_lr=3e-3, top_steps=4, top_eval_every=2,
        memory_batch=2, memory_length=16, cost_rounds=1, cost_batch=2, cost_length=16,
        tint_tasks=("cr",), tint_shots=4, tint_eval=8, tint_dev=4, tint_seeds=(0,), tint_check_seeds=(0,),
    ),
    "quick": Budget(
        lab_scale="default", num_train=1000, num_dev=50, num_eval=100, max_length=64, icl_demos=16,
        zo_steps=60, zo_eval_every=20, zo_noise="rademacher", fo_steps=30, fo_eval_every=10,
        top_lr=3e-3, top_steps=200, top_eval_every=50,
        memory_batch=16, memory_length=32, cost_rounds=3, cost_batch=16, cost_length=32,
        tint_tasks=("cr",), tint_shots=32, tint_eval=100, tint_dev=16, tint_seeds=(0,), tint_check_seeds=(0,),
    ),
    "paper": Budget(
        lab_scale="full", num_train=1000, num_dev=500, num_eval=1000, max_length=256, icl_demos=32,
        zo_steps=20000, zo_eval_every=500, zo_noise="gaussian", fo_steps=625, fo_eval_every=125,
        top_lr=3e-3, top_steps=400, top_eval_every=50,
        memory_batch=16, memory_length=32, cost_rounds=7, cost_batch=16, cost_length=32,
        tint_tasks=("sst2", "mr", "cr"), tint_shots=32, tint_eval=200, tint_dev=16, tint_seeds=(0, 1, 2),
        tint_check_seeds=(0, 1, 2),
    ),
}  # fmt: skip


def budget(scale: str) -> Budget:
    """The budget of ``scale`` (one of :data:`SCALES`)."""
    if scale not in BUDGETS:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}")
    return BUDGETS[scale]
