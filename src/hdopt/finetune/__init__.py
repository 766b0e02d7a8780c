"""Fine-tuning language models with forward passes (MeZO: full, LoRA, prefix) and backprop baselines.

Modules: :mod:`~hdopt.finetune.config` (one dataclass per component), :mod:`~hdopt.finetune.methods`
(the methods registry: a kind, an adapter, defaults), :mod:`~hdopt.finetune.kinds` (how a method trains:
forward passes only, backprop, the closed-form probe), :mod:`~hdopt.finetune.adapters` (what is trained,
registered with its settings; :mod:`~hdopt.finetune.prefix`, :mod:`~hdopt.finetune.head`),
:mod:`~hdopt.finetune.optimizers` (optimizers by name, their keywords, schedules, one step),
:mod:`~hdopt.finetune.prefix_generation` (greedy decoding after a prefix), :mod:`~hdopt.finetune.batches`
(data order, objectives), :mod:`~hdopt.finetune.trainer` (the recipe), :mod:`~hdopt.finetune.data_parallel`
(the loop's pieces under torchrun), :mod:`~hdopt.finetune.checkpoint` and :mod:`~hdopt.finetune.rundir`
(what a run writes), :mod:`~hdopt.finetune.trained` (the tested model, rebuilt from a run folder),
:mod:`~hdopt.finetune.peak_memory` (peak memory of one step per method, in a fresh process).

    >>> from hdopt.finetune import RunConfig, finetune                      # doctest: +SKIP
    >>> cfg = RunConfig().replace(method="mezo", task="sst2", steps=2000)  # doctest: +SKIP
    >>> results, run_dir = finetune(cfg)                                   # doctest: +SKIP
"""

from hdopt.finetune.config import (
    ConfigError,
    DataConfig,
    MethodConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from hdopt.finetune.methods import Method, MethodError, get_method, list_methods, register_method
from hdopt.finetune.optimizers import DivergenceError
from hdopt.finetune.trained import load_trained
from hdopt.finetune.trainer import finetune, resume

__all__ = [
    "ConfigError",
    "DataConfig",
    "DivergenceError",
    "Method",
    "MethodConfig",
    "MethodError",
    "ModelConfig",
    "OptimConfig",
    "RunConfig",
    "TrainConfig",
    "finetune",
    "get_method",
    "list_methods",
    "load_trained",
    "register_method",
    "resume",
]
