"""Run configuration: one dataclass per component, validated once, defaults in one place.

``hdopt finetune`` flags map one to one onto the fields (``--num-train`` -> ``DataConfig.num_train``) and a
``--config run.yaml`` file onto the sections (``model:``, ``data:``, ``method:``, ``optim:``, ``train:``).
Fields left at ``None`` take the method's defaults (:mod:`hdopt.finetune.methods`) when the run starts;
the resolved config is saved as the run's ``config.json``.

Every field is typed: a value from YAML, a flag or the API is checked against the field's declared type
before its range (``steps: 2.5`` and ``batch_size: true`` are errors naming the field and the value, never
rounded or read as 1; an int is a float where a float is declared; floats must be finite). YAML numbers
follow YAML 1.2 (``1e-5`` is a number).
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
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


def _typed(name: str, value: Any, declared: str) -> Any:
    """``value`` as the field's declared type (``int``, ``float | None``, ``list[str] | None``, ...)."""
    kinds = [k.strip() for k in declared.split("|")]
    if value is None and "None" in kinds:
        return None
    kind = next(k for k in kinds if k != "None")
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
        _check(math.isfinite(value), f"{name} must be a finite number, got {value!r}")
        return float(value)
    if kind in ("str", "bool") and type(value) is {"str": str, "bool": bool}[kind]:
        return value
    if kind == "list[str]" and isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    if kind.startswith("dict") and isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return dict(value)
    what = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false",
            "list[str]": "a list of strings"}.get(kind, "a mapping")  # fmt: skip
    raise ConfigError(f"{name} must be {what}{' or null' if 'None' in kinds else ''}, got {value!r}")


def check_types(obj) -> None:
    """Check (and normalise: int -> float) every field of a config dataclass against its declared type."""
    for f in dataclasses.fields(obj):
        object.__setattr__(obj, f.name, _typed(f.name, getattr(obj, f.name), str(f.type)))


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
        check_types(self)
        _check(self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.device != "auto":
            try:
                torch.device(self.device)
            except (RuntimeError, ValueError):
                raise ConfigError(f"device {self.device!r} is not a torch device: use cpu, cuda, cuda:N or "
                                  "auto") from None  # fmt: skip

    def check_available(self) -> None:
        """Raise :class:`ConfigError` when this machine has no such device (checked where a model loads)."""
        kind = "cuda" if self.device == "auto" else torch.device(self.device).type
        if kind == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device {self.device!r}: this machine has no CUDA device "
                              "(torch.cuda.is_available() is False); use --device cpu")  # fmt: skip
        if kind == "cuda" and self.device not in ("auto", "cuda"):
            index = torch.device(self.device).index or 0
            count = torch.cuda.device_count()
            _check(index < count, f"device {self.device!r}: this machine has {count} CUDA device(s)")


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
    allow_outside_data: bool = False  # a task file may read data files outside its folder

    def __post_init__(self) -> None:
        check_types(self)
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
    estimator: str | None = None  # central | one-sided | coordinates (read-adapters: exact, no directions)
    lora_r: int | None = None  # adapter knobs: see hdopt.finetune.adapters (LoraSettings, PrefixSettings)
    lora_alpha: float | None = None
    lora_targets: list[str] | None = None
    prefix_tokens: int | None = None
    prefix_init: str | None = None
    read_rank: int | None = None  # read-position adapters' rank (ReadSettings)
    zo_blocks: int | None = None  # ZO: train only the top K blocks, the bottom's outputs cached (None: all)
    lp_init: bool = False  # one-token label words: start from a linear probe written into the LM head
    lp_c: float | None = None  # the probe's inverse L2 strength (lp, --lp-init); None: picked on dev

    def __post_init__(self) -> None:
        check_types(self)
        names = optimizer_names()
        _check(
            self.optimizer is None or self.optimizer in names,
            f"optimizer must be one of {', '.join(names)}, got {self.optimizer!r}",
        )
        _check(self.objective in OBJECTIVES, f"objective must be one of {', '.join(OBJECTIVES)}")
        _check(self.noise in (None, "gaussian", "rademacher"),
               f"noise must be gaussian or rademacher, got {self.noise!r}")  # fmt: skip
        _check(self.estimator in (None, "central", "one-sided", "coordinates"),
               f"estimator must be central, one-sided or coordinates, got {self.estimator!r}")  # fmt: skip
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
        check_types(self)
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
    keep_weights: bool = False  # ZO runs: also store weights (default: the trajectory rebuilds them)
    output_dir: str | None = None
    log_every: int = 10
    progress: bool = True
    tensorboard: bool = False
    dist_timeout: float = 600.0  # torchrun: seconds a process waits for the others before naming the late one

    def __post_init__(self) -> None:
        check_types(self)
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


class YamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-5`` and ``3E+2`` are numbers, not strings."""


YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)  # fmt: skip


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
            bad = sorted(str(k) for k in set(values) - known)
            _check(not bad, f"{where}: unknown field(s) {bad} in {name!r}; known: {sorted(known)}")
            try:
                parts[name] = section(**values)
            except ConfigError as err:
                raise ConfigError(f"{where}: {name}.{err}") from None
        return cls(**parts)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            doc = yaml.load(path.read_text(encoding="utf-8"), Loader=YamlLoader) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML: {problem}{where}") from None
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
