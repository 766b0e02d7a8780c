"""Config dataclasses, YAML mapping and the methods registry."""

from __future__ import annotations

import dataclasses

import pytest

from hdopt.finetune import ConfigError, Method, MethodError, RunConfig, get_method, register_method
from hdopt.finetune.config import SECTIONS, field_owner
from hdopt.finetune.methods import list_methods
from hdopt.finetune.trainer import resolve
from hdopt.lm.tasks import get_task


def test_field_names_are_unique_across_sections():
    owner = field_owner()
    assert owner["lr"] == "optim" and owner["method"] == "method" and owner["num_train"] == "data"
    assert len(owner) == sum(len(dataclasses.fields(c)) for c in SECTIONS.values())


@pytest.mark.parametrize(
    "field, value, words",
    [("dtype", "int8", "dtype"), ("lr", -1.0, "lr"), ("eps", 0.0, "eps"), ("q", 0, "q"),
     ("schedule", "cosine", "schedule"), ("noise", "uniform", "noise"), ("steps", 0, "steps"),
     ("optimizer", "lion", "optimizer"), ("divergence_factor", 1.0, "divergence_factor")],
)  # fmt: skip
def test_bad_values_name_the_field(field, value, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig().replace(**{field: value})


def test_batch_must_split_into_micro_batches():
    with pytest.raises(ConfigError, match="multiple of grad_accum"):
        RunConfig().replace(batch_size=10, grad_accum=4)


def test_yaml_maps_onto_sections(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: {method: mezo-lora, q: 2}\noptim: {lr: 0.001}\ntrain: {steps: 7}\n")
    cfg = RunConfig.from_yaml(path)
    assert (cfg.method.method, cfg.method.q, cfg.optim.lr, cfg.train.steps) == ("mezo-lora", 2, 1e-3, 7)
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_yaml_rejects_unknown_keys(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("optim: {learning_rate: 0.1}\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        RunConfig.from_yaml(path)
    path.write_text("optimiser: {}\n")
    with pytest.raises(ConfigError, match="optimiser"):
        RunConfig.from_yaml(path)


def test_registry_rejects_duplicates_and_unknown_names():
    with pytest.raises(MethodError, match="already registered"):
        register_method(Method("mezo", "zo", "full"))
    with pytest.raises(MethodError, match="mezo-lora"):
        get_method("meso")
    assert {"mezo", "mezo-lora", "mezo-prefix", "ft", "ft-lora", "ft-prefix", "lp"} <= set(list_methods())


def test_method_defaults_fill_only_unset_fields():
    cfg = resolve(RunConfig().replace(method="mezo", lr=3e-6), get_method("mezo"), get_task("sst2"))
    assert cfg.optim.lr == 3e-6 and cfg.optim.eps == 1e-3 and cfg.train.batch_size == 16
    assert cfg.method.optimizer == "zosgd" and cfg.data.num_dev == 500
    ft = resolve(RunConfig().replace(method="ft"), get_method("ft"), get_task("cb"))
    assert ft.method.optimizer == "adamw" and ft.optim.schedule == "linear" and ft.data.num_dev == 100
    lp = resolve(RunConfig().replace(method="lp"), get_method("lp"), get_task("sst2"))  # no steps to take
    assert lp.train.steps is None and lp.train.eval_every == 0
