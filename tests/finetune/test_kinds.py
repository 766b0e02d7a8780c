"""Method kinds, adapters and optimizers by name: every registered optimizer runs, unset fields come from
the optimizer's paper, then the method; the rule's own keywords are checked; a new method is one registry
line; a kind variant overrides the closure, the dev evaluation and the forward count (the top-block seam)."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from hdopt.finetune import ConfigError, Method, RunConfig, finetune, register_method, rundir
from hdopt.finetune import cli as finetune_cli
from hdopt.finetune.adapters import ADAPTERS, LoraSettings
from hdopt.finetune.kinds import ZOKind
from hdopt.finetune.methods import METHODS, get_method
from hdopt.finetune.optimizers import FO_OPTIMIZERS, build_fo_optimizer, checked_arguments
from hdopt.finetune.trainer import evaluate_examples, load_data, resolve, setup, train_step
from hdopt.lm.evaluation import EvalResult
from hdopt.lm.tasks import get_task, resolve_task
from hdopt.zo import OPTIMIZERS, ZOSGD, ZOAdam
from tests.finetune.conftest import make_model, toy_config

OLD_CONFIG = {  # config.json of a run saved before q/noise/estimator/momentum/adapter fields became optional
    "model": {"model": "smollm2-135m", "dtype": "float32", "device": "cpu", "cache_dir": None},
    "data": {"task": "sst2", "data_dir": None, "num_train": 16, "num_dev": 8, "num_eval": 8, "max_length": 32,
             "data_seed": 0},
    "method": {"method": "mezo", "optimizer": "zosgd", "objective": "loss", "q": 1, "noise": "gaussian",
               "estimator": "central", "lora_r": 8, "lora_alpha": 16.0, "lora_targets": None,
               "prefix_tokens": 5, "prefix_init": "activations", "lp_init": False, "lp_c": None},
    "optim": {"lr": 0.01, "eps": 0.001, "weight_decay": 0.0, "momentum": 0.0, "schedule": "constant"},
    "train": {"steps": 6, "batch_size": 8, "grad_accum": 1, "eval_every": 3, "eval_batch_size": 16,
              "save_every": 3, "seed": 0, "divergence_factor": 10.0, "keep_best": True, "output_dir": "x",
              "log_every": 10, "progress": False, "tensorboard": False, "dist_timeout": 600.0},
}  # fmt: skip


class PaperRule(ZOSGD):
    """A ZO-SGD with a keyword of its own and a paper's hyperparameters (the test's registry entry)."""

    paper_defaults = {"lr": 3e-3, "q": 2, "noise": "rademacher", "decay": 0.5}

    def __init__(self, params, lr: float = 1e-3, eps: float = 1e-3, weight_decay: float = 0.0, *,
                 decay: float = 0.0, **kwargs):  # fmt: skip
        super().__init__(params, lr, eps, weight_decay, decay=decay, **kwargs)


@pytest.fixture
def paper_rule():
    OPTIMIZERS.register("test-paper", PaperRule)
    yield "test-paper"
    OPTIMIZERS.unregister("test-paper")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    finetune_cli.configure(parser)
    return parser.parse_args(argv)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_every_registered_zo_optimizer_runs_from_its_cli_name(name, task_file, tokenizer, tmp_path):
    overrides = finetune_cli.config_overrides(parse(["--optimizer", name, "--lr", "1e-3"]))
    cfg = toy_config(task_file, tmp_path, "mezo", **overrides)
    s = setup(cfg, make_model("llama"), tokenizer)
    assert type(s.optimizer) is OPTIMIZERS.get(name) and s.cfg.method.optimizer == name
    before = [p.detach().clone() for _, p in s.params]
    s.model.train(s.kind.training_mode())
    loss = train_step(s, 0)
    assert torch.isfinite(torch.tensor(loss)) and s.optimizer.step_count == 1
    assert any(not torch.equal(a, p) for a, (_, p) in zip(before, s.params, strict=True))


def test_unset_fields_come_from_the_papers_defaults_then_the_methods(paper_rule):
    task = get_task("sst2")
    cfg = resolve(RunConfig().replace(method="mezo", optimizer=paper_rule), get_method("mezo"), task)
    m, o = cfg.method, cfg.optim
    assert (o.lr, m.q, m.noise, m.optimizer_args) == (3e-3, 2, "rademacher", {"decay": 0.5})  # the paper's
    assert (o.eps, m.estimator, cfg.train.batch_size) == (1e-3, "central", 16)  # mezo's
    mine = RunConfig().replace(method="mezo", optimizer=paper_rule, lr=1e-2, noise="gaussian",
                               optimizer_args={"decay": 0.1})  # fmt: skip
    cfg = resolve(mine, get_method("mezo"), task)
    assert (cfg.optim.lr, cfg.method.noise, cfg.method.optimizer_args) == (1e-2, "gaussian", {"decay": 0.1})
    plain = resolve(RunConfig().replace(method="mezo"), get_method("mezo"), task)  # zosgd: no paper values
    assert (plain.optim.lr, plain.method.q, plain.method.optimizer_args) == (1e-5, 1, None)


def test_the_rules_own_keywords_reach_its_constructor(paper_rule, task_file, tokenizer, tmp_path):
    cfg = toy_config(task_file, tmp_path, "mezo", optimizer=paper_rule, steps=1)
    s = setup(cfg, make_model("llama"), tokenizer)
    assert s.optimizer.param_groups[0]["decay"] == 0.5 and s.optimizer.q == 2
    assert json.loads(json.dumps(s.cfg.to_dict()))["method"]["optimizer_args"] == {"decay": 0.5}


def test_optimizer_args_are_checked_against_the_constructor():
    assert checked_arguments(ZOAdam, "zoadam", {"betas": [0.8, 0.9], "adam_eps": 1}) == {
        "betas": (0.8, 0.9), "adam_eps": 1.0}  # fmt: skip
    with pytest.raises(ConfigError, match=r"zoadam \(ZOAdam\) takes no argument 'beta1'; it takes .*betas"):
        checked_arguments(ZOAdam, "zoadam", {"beta1": 0.9})
    with pytest.raises(ConfigError, match=r"betas of zoadam must be .*, got \[0.9\]"):
        checked_arguments(ZOAdam, "zoadam", {"betas": [0.9]})
    with pytest.raises(ConfigError, match="adam_eps of zoadam must be float, got True"):
        checked_arguments(ZOAdam, "zoadam", {"adam_eps": True})
    with pytest.raises(ConfigError, match="'lr' is a run setting: set it with --lr"):
        checked_arguments(ZOAdam, "zoadam", {"lr": 0.1})
    sgd = build_fo_optimizer("sgd", [("w", torch.nn.Parameter(torch.ones(2)))], lr=0.1, weight_decay=0.0,
                             momentum=0.9, args={"nesterov": True})  # fmt: skip
    assert sgd.param_groups[0]["nesterov"] is True and sgd.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ConfigError, match="optimizer adamw takes no momentum"):
        build_fo_optimizer("adamw", [("w", torch.nn.Parameter(torch.ones(2)))], lr=0.1, weight_decay=0.0,
                           momentum=0.9)  # fmt: skip
    assert set(FO_OPTIMIZERS) == {"adamw", "sgd"}


def test_optimizer_args_flag_reads_typed_key_values():
    args = parse(["--optimizer-args", "betas=[0.8, 0.99]", "adam_eps=1e-6", "amsgrad=true", "name=x"])
    assert finetune_cli.config_overrides(args) == {
        "optimizer_args": {"betas": [0.8, 0.99], "adam_eps": 1e-6, "amsgrad": True, "name": "x"}}  # fmt: skip
    for bad in (["--optimizer-args", "betas"], ["--optimizer-args", "a=1", "a=2"]):
        with pytest.raises(SystemExit):
            parse(bad)


def test_a_new_method_is_one_registry_line(task_file, tokenizer, tmp_path):
    method = register_method(Method("test-zoadam-lora", "zo", "lora", {**get_method("mezo-lora").defaults,
                                                                        "optimizer": "zoadam", "lr": 1e-2}))
    try:
        results, folder = finetune(toy_config(task_file, tmp_path, method.name, steps=2, eval_every=0),
                                   make_model("llama"), tokenizer)  # fmt: skip
    finally:
        METHODS.unregister(method.name)
    saved = json.loads((folder / rundir.CONFIG).read_text())
    assert results["status"] == "completed" and saved["method"]["optimizer"] == "zoadam"
    assert saved["method"]["lora_r"] == LoraSettings().lora_r and saved["method"]["prefix_tokens"] is None
    record = {"name": method.name, "trainer": "zo", "adapter": "lora", "world_size": 1}
    assert saved["method_record"] == record


class HalfModel(ZOKind):
    """A variant as top-block ZO would be one: its own closure and dev evaluation, half-model forwards."""

    forward_fraction = 0.5
    made: list[HalfModel] = []  # noqa: RUF012 - the instances the test's runs created

    def __init__(self, run) -> None:
        super().__init__(run)
        self.closures: list[list[str]] = []
        HalfModel.made.append(self)

    def closure(self, examples):
        self.closures.append([e.uid for e in examples])
        return super().closure(examples)

    def evaluate(self, examples):
        return EvalResult({"accuracy": 12.5}, [], 0, 0.0, {})


def test_a_kind_variant_overrides_closure_dev_evaluation_and_forward_count(task_file, tokenizer, tmp_path):
    defaults = {**get_method("mezo").defaults, "lr": 0.01}
    method = register_method(Method("test-half", HalfModel, "full", defaults))
    try:
        cfg = toy_config(task_file, tmp_path, method.name, steps=4, eval_every=2, grad_accum=2)
        results, folder = finetune(cfg, make_model("llama"), tokenizer)
    finally:
        METHODS.unregister(method.name)
    assert results["forwards"] == 4 * 2 * 2 * 0.5  # 4 steps x 2 micro-batches x 2 forwards, half a model each
    kind = HalfModel.made[-1]
    assert len(kind.closures) == 8 and all(len(c) == 4 for c in kind.closures)  # each micro-batch, once
    dev = [r["dev_accuracy"] for r in rundir.read_metrics(folder) if "dev_accuracy" in r]
    assert dev == [12.5, 12.5, 12.5] and results["best_step"] == 0  # dev: the variant's evaluation
    task = resolve_task(str(task_file))
    model = kind.run.model
    whole = evaluate_examples(model, tokenizer, task, kind.run.cfg, load_data(kind.run.cfg, task).eval)
    assert results["test"] == whole.metrics["accuracy"]  # test: the whole model's


def test_adapters_register_their_settings_and_check_them_at_config_time():
    assert {"full", "lora", "prefix", "head", "none"} <= set(ADAPTERS)
    cfg = resolve(RunConfig().replace(method="mezo-prefix"), get_method("mezo-prefix"), get_task("sst2"))
    assert (cfg.method.prefix_tokens, cfg.method.prefix_init, cfg.method.lora_r) == (5, "activations", None)
    for field, value in (("lora_r", 0), ("lora_alpha", 0.0), ("prefix_tokens", 0), ("prefix_init", "zeros")):
        with pytest.raises(ConfigError, match=field):
            RunConfig().replace(**{field: value})


def test_configs_saved_before_the_optional_fields_still_load_and_resolve():
    cfg = RunConfig.from_dict(OLD_CONFIG)
    resolved = resolve(cfg, get_method("mezo"), get_task("sst2"))
    assert resolved == cfg and (cfg.method.q, cfg.optim.momentum, cfg.method.lora_r) == (1, 0.0, 8)


def test_an_old_zoadam_config_with_momentum_zero_builds(task_file, tokenizer, tmp_path):
    """Old configs saved ``momentum: 0.0`` whatever the optimizer: 0 is dropped for rules without momentum."""
    cfg = toy_config(task_file, tmp_path, "mezo", optimizer="zoadam", momentum=0.0, steps=1)
    assert type(setup(cfg, make_model("llama"), tokenizer).optimizer) is ZOAdam
    with pytest.raises(ConfigError, match="zoadam takes no momentum"):
        setup(cfg.replace(momentum=0.5), make_model("llama"), tokenizer)

