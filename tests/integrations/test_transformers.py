"""ZOTrainer: hdopt.zo steps inside the Hugging Face Trainer, on tiny random causal LMs (seconds).

Every run is seeded: the data order (the Trainer's sampler), the initial weights and the ZO directions, so the
resume and replay tests assert bitwise equality and the others exact or derived tolerances.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    get_scheduler,
)
from transformers.utils import logging as hf_logging

from hdopt.integrations.transformers import TRAJECTORY_NAME, ZOTrainer, accepted_keywords
from hdopt.zo import OPTIMIZERS, ZOSGD, Trajectory, replay

hf_logging.set_verbosity_error()
torch.set_num_threads(1)  # tiny matmuls: threads only contend (the CPU is shared)


def tiny_model(family: str = "llama"):
    """A 1-layer, hidden-16 random causal LM (vocabulary 32); GPT-2 keeps its dropout (p = 0.1)."""
    torch.manual_seed(0)
    if family == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=32))
    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    return LlamaForCausalLM(config)


def dataset(n: int = 16, length: int = 8) -> list[dict[str, torch.Tensor]]:
    """Sequences over the first 4 tokens of 32: a model learns to put its mass there (loss ln 32 -> ln 4)."""
    ids = torch.randint(0, 4, (n, length), generator=torch.Generator().manual_seed(1))
    return [{"input_ids": row, "labels": row} for row in ids]


def arguments(out, **overrides) -> TrainingArguments:
    settings = dict(
        learning_rate=1e-2, max_steps=6, per_device_train_batch_size=4, per_device_eval_batch_size=16,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        disable_tqdm=True, seed=3,
    )  # fmt: skip
    settings.update(overrides)
    return TrainingArguments(str(out), **settings)


def trainer(model, out, zo_kwargs=None, **overrides) -> ZOTrainer:
    data = dataset()
    optimizer = overrides.pop("zo_optimizer", "zosgd")
    callbacks = overrides.pop("callbacks", None)
    return ZOTrainer(model, arguments(out, **overrides), train_dataset=data, eval_dataset=data,
                     data_collator=default_data_collator, callbacks=callbacks, zo_optimizer=optimizer,
                     zo_kwargs={"eps": 1e-2, **(zo_kwargs or {})})  # fmt: skip


def weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    different = [n for n in a if not torch.equal(a[n], b[n])]
    assert not different, f"not bitwise equal: {different[:3]}"


@pytest.fixture
def no_backward(monkeypatch):
    """Any backward pass raises."""

    def refuse(*args, **kwargs):
        raise AssertionError("backward was called")

    monkeypatch.setattr(torch.Tensor, "backward", refuse)
    monkeypatch.setattr(torch.autograd, "backward", refuse)


# -- training ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_the_loss_falls_without_backward_gradients_or_dropout(tmp_path, no_backward, family):
    model = tiny_model(family)
    modes: list[bool] = []
    model.register_forward_pre_hook(lambda module, args: modes.append(module.training))
    t = trainer(model, tmp_path, max_steps=40)
    before = t.evaluate()["eval_loss"]
    modes.clear()
    model.train()
    t.train()
    trained_modes, mode_after = list(modes), model.training
    after = t.evaluate()["eval_loss"]
    # seeded: ln 32 = 3.47 -> 3.16 (llama) in 40 steps; a loss that does not fall moves by < 0.01
    assert after < before - 0.1, (before, after)
    assert all(p.grad is None for p in model.parameters())
    assert len(trained_modes) == 40 * 2 and not any(trained_modes)  # 2 forwards a step, in eval mode
    assert mode_after  # its mode is restored after each micro-batch
    assert t.zo_optimizer.step_count == 40 and len(t.zo_optimizer.trajectory) == 40
    assert all(math.isfinite(g) and g != 0.0 for r in t.zo_optimizer.trajectory for g in r.grads)


def test_backward_guard_catches_the_trainers_own_step(tmp_path, no_backward):
    """The guard of the test above fails for a Trainer that backpropagates."""
    from transformers import Trainer

    data = dataset()
    with pytest.raises(AssertionError, match="backward was called"):
        backprop = Trainer(tiny_model(), arguments(tmp_path), train_dataset=data,
                           data_collator=default_data_collator)  # fmt: skip
        backprop.train()


@pytest.mark.parametrize("precision", ["bf16 autocast", "bfloat16 weights"])
def test_half_precision_trains_without_a_gradient_scaler(tmp_path, precision):
    model = tiny_model()
    if precision == "bfloat16 weights":
        model = model.to(torch.bfloat16)  # updated in float32, stochastically rounded (hdopt.zo)
    before = weights(model)
    t = trainer(model, tmp_path, max_steps=2, bf16=precision == "bf16 autocast")
    t.train()
    assert [math.isfinite(r.grads[0]) for r in t.zo_optimizer.trajectory] == [True, True]
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_every_registered_optimizer_trains(tmp_path, no_backward, name):
    model = tiny_model()
    before = weights(model)
    t = trainer(model, tmp_path, max_steps=2, zo_optimizer=name, gradient_accumulation_steps=2,
                learning_rate=1e-3)  # fmt: skip
    t.train()
    assert type(t.zo_optimizer) is OPTIMIZERS.get(name) and t.zo_optimizer.step_count == 2
    assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("accepts_loss_kwargs", [True, False])
def test_gradient_accumulation_is_micro_batches_of_one_zo_step(tmp_path, accepts_loss_kwargs):
    """2 micro-batches of 2 give the projected gradients of one batch of 4 (the same examples, in order).

    The micro-batch losses are token sums over the window's count (the Trainer's accumulation rule when the
    model takes ``num_items_in_batch``) or micro-batch means; either way the step's estimate is the batch's
    mean loss difference. Float32 losses (~3.5, rounding ~1e-6) over 2 eps = 0.02 bound the difference
    of the projected gradients at ~1e-4.
    """
    runs = []
    for batch, accumulation in ((4, 1), (2, 2)):
        t = trainer(tiny_model(), tmp_path / f"{batch}", max_steps=3, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=accumulation)  # fmt: skip
        t.model_accepts_loss_kwargs = accepts_loss_kwargs
        t.train()
        runs.append([r.grads[0] for r in t.zo_optimizer.trajectory])
    assert all(abs(g) > 0.1 for g in runs[0])  # the 1e-4 bound is small against the gradients
    assert runs[1] == pytest.approx(runs[0], abs=1e-4)


def test_the_logged_loss_is_the_steps_reported_loss(tmp_path, monkeypatch):
    """With 2 micro-batches the Trainer sums training_step's returns: their sum is what ZOSGD.step reports
    (the mean over the window of L(theta + eps z)), up to float32 rounding of the Trainer's sum."""
    reported = []
    step = ZOSGD.step

    def recording_step(self, closure=None):
        reported.append(step(self, closure))
        return reported[-1]

    monkeypatch.setattr(ZOSGD, "step", recording_step)
    t = trainer(tiny_model(), tmp_path, max_steps=3, per_device_train_batch_size=2,
                gradient_accumulation_steps=2)
    t.train()
    logged = [h["loss"] for h in t.state.log_history if "loss" in h]
    assert len(reported) == 3 and logged == pytest.approx(reported, rel=1e-6)


# -- checkpoints -----------------------------------------------------------------------------------------
def lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(tiny_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


@pytest.mark.parametrize(("optimizer", "accumulation", "build"),
                         [("zosgd", 1, tiny_model), ("zosgd", 2, tiny_model), ("zoadam", 2, tiny_model),
                          ("zosgd", 2, lora_model)])  # fmt: skip
def test_resume_from_checkpoint_continues_bitwise(tmp_path, optimizer, accumulation, build):
    """6 steps straight (saving at 3) against 3 steps, a new trainer and model, resume, 3 more steps."""
    common = dict(max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=accumulation,
                  lr_scheduler_type="linear", warmup_steps=2, zo_optimizer=optimizer,
                  learning_rate=1e-3 if optimizer == "zoadam" else 1e-2)  # fmt: skip
    straight = trainer(build(), tmp_path / "a", save_strategy="steps", save_steps=3, **common)
    straight.train()
    checkpoint = tmp_path / "a" / "checkpoint-3"
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / TRAJECTORY_NAME).is_file()
    resumed = trainer(build(), tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert resumed.state.global_step == 6 and resumed.zo_optimizer.step_count == 6
    assert_bitwise(weights(resumed.model), weights(straight.model))
    assert list(resumed.zo_optimizer.trajectory) == list(straight.zo_optimizer.trajectory)


def test_save_model_writes_the_trajectory_and_replay_rebuilds_the_saved_weights(tmp_path):
    model = tiny_model()
    start = weights(model)
    t = trainer(model, tmp_path, weight_decay=0.1, lr_scheduler_type="cosine")  # two groups: decayed or not
    t.train()
    t.save_model(str(tmp_path / "final"))
    saved = load_file(tmp_path / "final" / "model.safetensors")
    header, log = Trajectory.load(tmp_path / "final" / TRAJECTORY_NAME)
    assert len(log) == 6 and len(header["groups"]) == 2 and header["optimizer"] == "ZOSGD"
    fresh = tiny_model()
    assert_bitwise(weights(fresh), start)
    replay(fresh.named_parameters(), tmp_path / "final" / TRAJECTORY_NAME)
    rebuilt = weights(fresh)
    assert_bitwise(rebuilt, weights(model))
    assert all(torch.equal(saved[n], rebuilt[n]) for n in saved)
    assert any(not torch.equal(start[n], rebuilt[n]) for n in start)


# -- schedules, evaluation, callbacks, PEFT ----------------------------------------------------------------
def test_the_trainers_lr_scheduler_drives_the_zo_lr(tmp_path):
    t = trainer(tiny_model(), tmp_path, max_steps=8, lr_scheduler_type="linear", warmup_steps=3)
    t.train()
    reference = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    schedule = get_scheduler("linear", reference, num_warmup_steps=3, num_training_steps=8)
    expected = []
    for _ in range(8):
        expected.append(reference.param_groups[0]["lr"])
        reference.step()
        schedule.step()
    assert [r.lrs[0] for r in t.zo_optimizer.trajectory] == expected
    assert expected[0] == 0.0 and expected[3] == 1e-2  # warmup from 0, then linear decay


class Recorder(TrainerCallback):
    def __init__(self):
        self.events: list[str] = []
        self.logged: list[dict] = []

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append("step")

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(f"eval {metrics['eval_loss']:.3f}")

    def on_save(self, args, state, control, **kwargs):
        self.events.append("save")

    def on_log(self, args, state, control, logs=None, **kwargs):  # what report_to integrations receive
        self.logged.append(dict(logs))


def test_evaluation_logging_and_callbacks_run(tmp_path):
    recorder = Recorder()
    t = trainer(tiny_model(), tmp_path, max_steps=4, eval_strategy="steps", eval_steps=2,
                save_strategy="steps", save_steps=4, callbacks=[recorder], label_smoothing_factor=0.1)
    t.train()
    kinds = [e.split()[0] for e in recorder.events]
    assert kinds == ["step", "step", "eval", "step", "step", "eval", "save"]
    logs = [h for h in recorder.logged if "loss" in h]
    assert len(logs) == 4 and [h["step"] for h in t.state.log_history if "loss" in h] == [1, 2, 3, 4]
    assert all("learning_rate" in h and "grad_norm" not in h for h in logs)  # no gradient: no grad_norm
    steps = t.zo_optimizer.trajectory.records
    assert all(math.isfinite(h["loss"]) for h in logs) and len(steps) == 4
    evals = [h["eval_loss"] for h in t.state.log_history if "eval_loss" in h]
    assert len(evals) == 2 and all(math.isfinite(v) for v in evals)


def test_a_lora_model_trains_only_its_adapters(tmp_path, no_backward):
    model = lora_model()
    before = weights(model)
    t = trainer(model, tmp_path, max_steps=3)
    t.train()
    after = weights(model)
    adapters = {n for n, p in model.named_parameters() if p.requires_grad}
    assert adapters and all("lora_" in n for n in adapters)
    held = {n for g in t.zo_optimizer.param_groups for n in g["param_names"]}
    assert held == adapters
    assert_bitwise({n: after[n] for n in after if n not in adapters}, {n: before[n] for n in before
                                                                       if n not in adapters})  # fmt: skip
    assert all(not torch.equal(after[n], before[n]) for n in adapters)
    assert all(p.grad is None for p in model.parameters())


def test_an_optimizer_instance_is_used_as_given(tmp_path):
    model = tiny_model()
    zo = ZOSGD(model.named_parameters(), lr=5e-3, eps=1e-2, seed=11)
    t = ZOTrainer(model, arguments(tmp_path, max_steps=2), train_dataset=dataset(),
                  data_collator=default_data_collator, zo_optimizer=zo)  # fmt: skip
    t.train()
    assert t.zo_optimizer is zo and zo.step_count == 2
    assert [r.lrs[0] for r in zo.trajectory] == [5e-3, 5e-3]  # its own lr (constant schedule), not args'


# -- errors --------------------------------------------------------------------------------------------------
def test_settings_a_zo_step_cannot_honour_are_refused(tmp_path):
    model, data = tiny_model(), dataset()
    with pytest.raises(ValueError, match="unknown zeroth-order optimizer 'mezo'; known: zosgd"):
        ZOTrainer(model, arguments(tmp_path), train_dataset=data, zo_optimizer="mezo")
    with pytest.raises(ValueError, match=r"set lr with TrainingArguments\(learning_rate=...\)"):
        ZOTrainer(model, arguments(tmp_path), train_dataset=data, zo_kwargs={"lr": 1e-3})
    with pytest.raises(ValueError, match="ZOSGD does not take epsilon in zo_kwargs; it takes .*eps"):
        ZOTrainer(model, arguments(tmp_path), train_dataset=data, zo_kwargs={"epsilon": 1e-3})
    with pytest.raises(ValueError, match="pass zo_optimizer=... .* instead of optimizers="):
        adam = torch.optim.AdamW(model.parameters())
        ZOTrainer(model, arguments(tmp_path), train_dataset=data, optimizers=(adam, None))
    with pytest.raises(ValueError, match="not parameters of the model"):
        other = ZOSGD(tiny_model().parameters())
        ZOTrainer(model, arguments(tmp_path), train_dataset=data, zo_optimizer=other)
    frozen = tiny_model().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ZOTrainer(frozen, arguments(tmp_path), train_dataset=data).train()


def test_fp16_is_refused_with_the_alternatives(tmp_path):
    args = arguments(tmp_path)
    args.fp16 = True  # TrainingArguments itself refuses fp16 on a machine without a GPU
    with pytest.raises(ValueError, match="no gradient to scale: use bf16=True"):
        ZOTrainer(tiny_model(), args, train_dataset=dataset())


def test_stepping_the_trainers_optimizer_by_hand_is_refused(tmp_path):
    t = trainer(tiny_model(), tmp_path, max_steps=1)
    t.train()
    with pytest.raises(RuntimeError, match="found 0 zeroth-order updates"):
        t.optimizer.step()


class PaperRule(ZOSGD):
    paper_defaults = {"lr": 1.0, "weight_decay": 0.5, "eps": 0.05, "q": 2}


def test_keywords_come_from_args_then_zo_kwargs_then_paper_defaults(tmp_path):
    args = arguments(tmp_path, learning_rate=2e-3, weight_decay=0.0)
    t = ZOTrainer(tiny_model(), args, train_dataset=dataset(), zo_optimizer=PaperRule, zo_kwargs={"q": 3})
    zo = t.create_zo_optimizer(t.model)
    group = zo.param_groups[0]
    settings = (group["lr"], group["weight_decay"], group["eps"], group["q"], group["seed"])
    assert settings == (2e-3, 0.0, 0.05, 3, 3)


def test_accepted_keywords_follow_the_constructors_down_to_the_base():
    assert {"eps", "q", "noise", "seed", "momentum"} <= accepted_keywords(ZOSGD)
    assert "betas" in accepted_keywords(OPTIMIZERS.get("zoadam")) and "betas" not in accepted_keywords(ZOSGD)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_and_resuming_on_cuda(tmp_path):
    """accelerate moves the optimizer state (the trajectory bytes too) to the GPU when it wraps it."""
    common = dict(use_cpu=False, max_steps=4, lr_scheduler_type="linear")
    straight = trainer(tiny_model(), tmp_path / "a", save_strategy="steps", save_steps=2, **common)
    straight.train()
    resumed = trainer(tiny_model(), tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / "checkpoint-2"))
    assert_bitwise(weights(resumed.model), weights(straight.model))
