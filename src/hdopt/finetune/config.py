"""Run configuration: one dataclass per component, validated once, defaults in one place.

``hdopt finetune`` flags map one to one onto the fields (``--num-train`` -> ``DataConfig.num_train``) and a
``--config run.yaml`` file onto the sections (``model:``, ``data:``, ``method:``, ``optim:``, ``train:``).
Fields left at ``None`` take the method's defaults (:mod:`hdopt.finetune.methods`) when the run starts;
the resolved config is saved as the run's ``config.json``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hdopt.finetune.adapters import check_adapter_settings
from hdopt.finetune.errors import ConfigError
from hdopt.finetune.optimizers import optimizer_names

DTYPES = ("float32", "bfloat16", "float16")
OBJECTIVES = ("loss", "accuracy", "f1")
SCHEDULES = ("constant", "linear")


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _positive(obj, *names: str, allow_none: bool = True, minimum: float = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        if value is None and allow_none:
            continue
        _check(value is not None and value >= minimum, f"{name} must be >= {minimum}, got {value}")


@dataclass
class ModelConfig:
    """Which model to load (see ``hdopt models``) and how."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    device: str = "cpu"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")


@dataclass
class DataConfig:
    """The task and MeZO's sampling protocol (train / dev from the train split, test from the eval split)."""

    task: str = "sst2"
    data_dir: str | None = None
    num_train: int = 1000
    num_dev: int | None = None  # None: the task's protocol value (500; 100 for CB/COPA)
    num_eval: int | None = 1000
    max_length: int = 256  # tokens per training row (prompt truncated on the left)
    data_seed: int = 0

    def __post_init__(self) -> None:
        _positive(self, "num_train", "num_eval", "max_length")
        _positive(self, "num_dev", minimum=0)


@dataclass
class MethodConfig:
    """The method (a registry name) and its method-specific knobs; ``None`` = the method's default."""

    method: str = "mezo"
    optimizer: str | None = None  # a name of hdopt.zo.OPTIMIZERS (ZO) or of optimizers.FO_OPTIMIZERS
    optimizer_args: dict[str, Any] | None = None  # the optimizer's own constructor keywords (checked)
    objective: str = "loss"  # loss | accuracy (classification, ZO) | f1 (generation, ZO)
    q: int | None = None  # ZO directions per step
    noise: str | None = None  # gaussian | rademacher
    estimator: str | None = None  # central | one-sided
    lora_r: int | None = None  # adapter knobs: see hdopt.finetune.adapters (LoraSettings, PrefixSettings)
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    prefix_tokens: int | None = None
    prefix_init: str | None = None
    zo_blocks: int | None = None  # ZO: train only the top K blocks, the bottom's outputs cached (None: all)
    lp_init: bool = False  # one-token label words: start from a linear probe written into the LM head
    lp_c: float | None = None  # the probe's inverse L2 strength (lp, --lp-init); None: picked on dev

    def __post_init__(self) -> None:
        names = optimizer_names()
        _check(
            self.optimizer is None or self.optimizer in names,
            f"optimizer must be one of {', '.join(names)}, got {self.optimizer!r}",
        )
        _check(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        _check(self.noise in (None, "gaussian", "rademacher"),
               f"noise must be gaussian or rademacher, got {self.noise!r}")  # fmt: skip
        _check(self.estimator in (None, "central", "one-sided"), "estimator must be central or one-sided")
        _positive(self, "q", "zo_blocks")
        _check(self.lp_c is None or self.lp_c > 0, f"lp_c must be > 0, got {self.lp_c}")
        check_adapter_settings(self)


@dataclass
class OptimConfig:
    """Learning rate, perturbation scale and schedule; ``None`` = the method's default."""

    lr: float | None = None
    eps: float | None = None  # ZO perturbation scale
    weight_decay: float = 0.0
    momentum: float | None = None  # optimizers that take it (zosgd, sgd); None: the optimizer's default
    schedule: str | None = None  # constant | linear (decay to 0 at the last step)

    def __post_init__(self) -> None:
        _check(self.lr is None or self.lr >= 0, f"lr must be >= 0, got {self.lr}")
        _check(self.eps is None or self.eps > 0, f"eps must be > 0, got {self.eps}")
        _check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        _check(self.momentum is None or 0 <= self.momentum < 1,
               f"momentum must be in [0, 1), got {self.momentum}")  # fmt: skip
        _check(
            self.schedule is None or self.schedule in SCHEDULES,
            f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}",
        )


@dataclass
class TrainConfig:
    """The loop: steps, batches, evaluation, checkpoints, guard; ``None`` = the method's default."""

    steps: int | None = None
    batch_size: int | None = None  # examples per optimizer step (split into grad_accum micro-batches)
    grad_accum: int = 1
    eval_every: int | None = None  # steps between dev evaluations (0: only at the end)
    eval_batch_size: int = 16
    save_every: int | None = None  # steps between resume checkpoints (None: at every evaluation)
    seed: int = 0  # model-side randomness: adapter init, ZO directions, dropout
    divergence_factor: float = 10.0  # stop when the mean of the last 5 losses exceeds this x the first
    keep_best: bool = True  # select the checkpoint with the best dev metric for the test evaluation
    output_dir: str | None = None
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False
    dist_timeout: float = 600.0  # torchrun: seconds a process waits for the others before naming the late one

    def __post_init__(self) -> None:
        _positive(self, "steps", "batch_size", "grad_accum", "eval_batch_size", "log_every")
        _check(self.dist_timeout > 0, f"dist_timeout must be > 0 seconds, got {self.dist_timeout}")
        _positive(self, "eval_every", minimum=0)
        _positive(self, "save_every")
        _check(self.divergence_factor > 1, f"divergence_factor must be > 1, got {self.divergence_factor}")
        if self.batch_size is not None:
            _check(
                self.batch_size % self.grad_accum == 0,
                f"batch_size {self.batch_size} must be a multiple of grad_accum {self.grad_accum}",
            )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "data": DataConfig,
    "method": MethodConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
}


@dataclass
class RunConfig:
    """A whole fine-tuning run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], where: str = "config") -> RunConfig:
        """Build from ``{section: {field: value}}``; unknown sections or fields are errors."""
        unknown = set(doc) - set(SECTIONS)
        _check(not unknown, f"{where}: unknown section(s) {sorted(unknown)}; sections: {', '.join(SECTIONS)}")
        parts = {}
        for name, section in SECTIONS.items():
            values = doc.get(name) or {}
            _check(isinstance(values, dict), f"{where}: section {name!r} must be a mapping")
            known = {f.name for f in dataclasses.fields(section)}
            bad = set(values) - known
            _check(not bad, f"{where}: unknown field(s) {sorted(bad)} in {name!r}; known: {sorted(known)}")
            parts[name] = section(**values)
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        _check(isinstance(doc, dict), f"{path}: a run config is a mapping of sections")
        return cls.from_dict(doc, str(path))

    def replace(self, **overrides: Any) -> RunConfig:
        """A copy with fields set by name, in whichever section holds them (names are unique)."""
        doc = self.to_dict()
        owner = {f.name: s for s, c in SECTIONS.items() for f in dataclasses.fields(c)}
        for key, value in overrides.items():
            _check(key in owner, f"unknown config field {key!r}")
            doc[owner[key]][key] = value
        return RunConfig.from_dict(doc)


def field_owner() -> dict[str, str]:
    """Field name -> its section; field names are unique across sections (so flags are flat)."""
    owner: dict[str, str] = {}
    for section, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f.name not in owner, f"config field {f.name!r} appears in two sections"
            owner[f.name] = section
    return owner
