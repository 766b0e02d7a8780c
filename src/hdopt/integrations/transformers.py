"""Forward-only fine-tuning inside the Hugging Face ``Trainer``: :class:`ZOTrainer`.

    from transformers import TrainingArguments
    from hdopt.integrations.transformers import ZOTrainer

    args = TrainingArguments("out", learning_rate=1e-6, max_steps=1000, gradient_accumulation_steps=2)
    trainer = ZOTrainer(model, args, train_dataset=data, data_collator=collator,
                        zo_optimizer="zosgd", zo_kwargs={"eps": 1e-3})
    trainer.train()         # train(resume_from_checkpoint=True) continues a run bitwise
    trainer.save_model()    # the model and trajectory.bin (hdopt.zo.replay rebuilds it from the start)

How the Trainer's loop becomes a ZO step (checked against transformers 4.56 and 5.24). The Trainer calls
``training_step`` once per micro-batch, with ``accelerator.sync_gradients`` true on the last micro-batch of
an accumulation window, then clips gradients, calls ``optimizer.step()``, steps the LR scheduler and calls
``model.zero_grad()``. :meth:`ZOTrainer.training_step` calls the ZO optimizer's ``estimate(closure)`` on every
micro-batch of the window but the last and ``step(closure)`` on the last (the hdopt.zo contract for gradient
accumulation; a rule that evaluates candidate updates, ZOConservative, gets the closure it needs). The
optimizer the Trainer holds, :class:`TrainerOptimizer`, shares the ZO optimizer's param groups and state: the
Trainer's LR scheduler sets the ZO lr, its ``optimizer.pt`` is the ZO state dict (step count, per-parameter
state and the trajectory, so ``resume_from_checkpoint`` continues bitwise), and its ``step()`` only checks
that the window's update was applied. No forward builds an autograd graph and nothing calls ``backward``:
no parameter ever has a ``.grad``, so gradient clipping (``max_grad_norm``) and ``model.zero_grad()`` have
nothing to act on, and the logged ``grad_norm`` (always 0) is dropped.

The ZO forwards run with the model in eval mode: dropout off, so the two sides of a finite difference see the
same function (as in MeZO); the model's mode is restored after each micro-batch.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn
from transformers import Trainer

from hdopt.zo import ZOOptimizer, optimizer_class

logger = logging.getLogger(__name__)

TRAJECTORY_NAME = "trajectory.bin"  # written next to the model by ZOTrainer.save_model
FROM_TRAINING_ARGUMENTS = {"lr": "learning_rate", "weight_decay": "weight_decay"}


class TrainerOptimizer(torch.optim.Optimizer):
    """The optimizer the Trainer drives, over the ZO optimizer that :class:`ZOTrainer` steps.

    It shares ``zo``'s ``param_groups``, ``state`` and ``defaults`` (an LR scheduler built on it sets the ZO
    lr) and its state dict (the Trainer's ``optimizer.pt``). ``step()`` applies nothing: training_step applied
    the update at the end of the window, and ``step()`` checks that it did. Like accelerate's
    ``AcceleratedOptimizer`` it does not call ``Optimizer.__init__``: it owns no state of its own.
    """

    def __init__(self, zo: ZOOptimizer):  # noqa: D107 (no super().__init__: see the class docstring)
        self.zo = zo
        self.updates_applied = 0  # updates training_step applied that step() has not acknowledged yet

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.zo.param_groups

    @property
    def state(self):  # type: ignore[override]
        return self.zo.state

    @property
    def defaults(self) -> dict[str, Any]:  # type: ignore[override]
        return self.zo.defaults

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.zo.add_param_group(param_group)

    def state_dict(self) -> dict[str, Any]:
        return self.zo.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a ZO state dict; its trajectory bytes are read on the CPU (accelerate moves every tensor of
        the state to the training device when it wraps the optimizer)."""
        zo = state_dict.get("state", {}).get("zo")
        if isinstance(zo, dict) and isinstance(zo.get("trajectory"), torch.Tensor):
            zo = {**zo, "trajectory": zo["trajectory"].cpu()}
            state_dict = {**state_dict, "state": {**state_dict["state"], "zo": zo}}
        self.zo.load_state_dict(state_dict)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.zo.zero_grad(set_to_none)

    def step(self, closure=None) -> None:  # type: ignore[override]
        """Acknowledge the update training_step applied at the end of this accumulation window."""
        if closure is not None:
            raise TypeError("ZOTrainer applies the ZO update in training_step: step() takes no closure")
        if self.updates_applied != 1:
            raise RuntimeError(
                f"optimizer.step() found {self.updates_applied} zeroth-order updates applied since the last "
                "step (expected 1): ZOTrainer updates in training_step on the micro-batch where the "
                "Trainer's accelerator.sync_gradients is true, and this Trainer loop did not set it as "
                "transformers 4.56-5.24 do. Call trainer.train() rather than stepping by hand"
            )
        self.updates_applied = 0


class ZOTrainer(Trainer):
    """A ``transformers.Trainer`` whose optimizer step is a zeroth-order (forward-only) :mod:`hdopt.zo` step.

    Args:
        *args, **kwargs: as for ``Trainer`` (model, args, data_collator, datasets, callbacks, ...), except
            ``optimizers`` and ``optimizer_cls_and_kwargs``: the optimizer is ``zo_optimizer``, and the LR
            schedule is the one ``args`` names (``lr_scheduler_type``, warmup).
        zo_optimizer: a name in :data:`hdopt.zo.OPTIMIZERS` (``"zosgd"`` is MeZO), a
            :class:`~hdopt.zo.ZOOptimizer` subclass, or an instance over the model's trainable parameters
            (an instance keeps its own lr, weight decay and seed; the scheduler scales its lr).
        zo_kwargs: the optimizer's own keywords (``eps``, ``q``, ``noise``, ``estimator``, ``momentum``, ...).
            ``lr`` and ``weight_decay`` come from ``args.learning_rate`` and ``args.weight_decay`` (decay on
            the parameters the Trainer decays: not biases and norms), ``seed`` from ``args.seed`` unless
            given; keywords left unset take the rule's ``paper_defaults``, then its own defaults.

    The optimizer sees only the trainable parameters (``requires_grad``): with a PEFT model, the adapters.
    Attributes: ``zo_optimizer`` (the :class:`~hdopt.zo.ZOOptimizer`, once training has started).
    """

    def __init__(self, *args, zo_optimizer: str | type[ZOOptimizer] | ZOOptimizer = "zosgd",
                 zo_kwargs: dict[str, Any] | None = None, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        if self.optimizer is not None or self.lr_scheduler is not None or self.optimizer_cls_and_kwargs:
            raise ValueError(
                "ZOTrainer builds its own optimizer: pass zo_optimizer=... (and zo_kwargs=...) instead of "
                "optimizers= or optimizer_cls_and_kwargs=; the LR schedule comes from TrainingArguments "
                "(lr_scheduler_type, warmup_steps), or override create_scheduler"
            )
        check_training_arguments(self.args, self)
        self.zo_optimizer: ZOOptimizer | None = None
        self._zo_class: type[ZOOptimizer] | None = None
        self._zo_kwargs = dict(zo_kwargs or {})
        if isinstance(zo_optimizer, ZOOptimizer):
            if self._zo_kwargs:
                raise ValueError("zo_kwargs configure an optimizer ZOTrainer builds; an instance has its own")
            if self.model_init is not None:
                raise ValueError("with model_init the model is built in train(): pass the optimizer's name")
            check_optimizer_covers(zo_optimizer, self.model)
            self.zo_optimizer = zo_optimizer
        else:
            self._zo_class = resolve_optimizer_class(zo_optimizer)
            check_keywords(self._zo_class, self._zo_kwargs)
        self._window_loss = 0.0  # what training_step returned for the current window's earlier micro-batches
        self._stepper: TrainerOptimizer | None = None

    # -- the optimizer ---------------------------------------------------------------------------------
    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build the ZO optimizer (unless given) and the :class:`TrainerOptimizer` the Trainer steps."""
        if self.optimizer is None:
            if self.zo_optimizer is None:
                self.zo_optimizer = self.create_zo_optimizer(self.model if model is None else model)
            self._stepper = TrainerOptimizer(self.zo_optimizer)
            self.optimizer = self._stepper
        return self.optimizer

    def create_zo_optimizer(self, model: nn.Module) -> ZOOptimizer:
        """The ZO optimizer over ``model``'s trainable parameters, named (noise is keyed by name)."""
        assert self._zo_class is not None
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("the model has no trainable parameters (requires_grad=True): nothing to train")
        decay = self.args.weight_decay
        params: list = named
        if decay:
            decayed = set(self.get_decay_parameter_names(model))
            groups = [{"params": [(n, p) for n, p in named if n in decayed], "weight_decay": decay},
                      {"params": [(n, p) for n, p in named if n not in decayed], "weight_decay": 0.0}]
            params = [g for g in groups if g["params"]]
        kwargs = {k: v for k, v in self._zo_class.paper_defaults.items() if k not in FROM_TRAINING_ARGUMENTS}
        kwargs = {**kwargs, "seed": self.args.seed, **self._zo_kwargs}
        return self._zo_class(params, lr=self.args.learning_rate, weight_decay=decay, **kwargs)

    # -- the step ----------------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict[str, Any],
                      num_items_in_batch=None) -> torch.Tensor:  # fmt: skip
        """One micro-batch: ``estimate`` on it, or ``step`` (the update) on the window's last micro-batch.

        Returns the micro-batch's share of the window's loss (the Trainer sums them): the ZO optimizer's
        reported loss (``L(theta + eps z)`` for the central estimator, ``L(theta)`` for the one-sided one).
        """
        assert self.zo_optimizer is not None and self._stepper is not None, "train() creates the optimizer"
        inputs = send_to_device(inputs, self.args.device)
        micro = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        scale = micro if self._loss_is_scaled_for_accumulation(num_items_in_batch) else 1
        closure = self._closure(model, inputs, num_items_in_batch, scale)
        was_training = model.training
        model.eval()  # no dropout: both sides of each finite difference see the same function
        try:
            if self.accelerator.sync_gradients:  # the window's last micro-batch
                share = self.zo_optimizer.step(closure) - self._window_loss
                self._stepper.updates_applied += 1
                self._window_loss = 0.0
            else:
                share = self.zo_optimizer.estimate(closure) / micro
                self._window_loss += share
        except Exception:
            self._window_loss = 0.0  # the ZO optimizer discarded the window's estimates too
            raise
        finally:
            model.train(was_training)
        return torch.tensor(share, device=self.args.device)

    def _closure(self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch, scale: int):
        def closure() -> torch.Tensor:
            with self.compute_loss_context_manager():
                # a copy: compute_loss pops "labels" when it applies label smoothing or compute_loss_func
                loss = self.compute_loss(model, dict(inputs), num_items_in_batch=num_items_in_batch)
            return loss * scale if scale != 1 else loss

        return closure

    def _loss_is_scaled_for_accumulation(self, num_items_in_batch) -> bool:
        """Whether compute_loss already divided by the window's token count (the Trainer's rule, 4.56-5.24).

        Such a micro-batch loss is ``sum / N_window``; the ZO optimizer averages its micro-batches, so the
        closure multiplies it by their number, and the step sees the token-weighted mean over the window.
        """
        explicit = getattr(self, "loss_is_scaled_for_ga", None)  # transformers >= 5: a subclass may set it
        if explicit is not None:
            return bool(explicit)
        accepts = getattr(self, "model_accepts_loss_kwargs", False)
        return (accepts and num_items_in_batch is not None) or self.compute_loss_func is not None

    # -- logging and saving ----------------------------------------------------------------------------
    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The Trainer's log, without ``grad_norm``: a ZO step has no gradient (the Trainer would log 0)."""
        logs.pop("grad_norm", None)
        super().log(logs, *args, **kwargs)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model as the Trainer does, and the ZO trajectory next to it (``trajectory.bin``), from
        which ``hdopt.zo.replay(initial_model.named_parameters(), path)`` rebuilds the trained weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.zo_optimizer is not None and self.args.should_save:
            folder = Path(output_dir if output_dir is not None else self.args.output_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.zo_optimizer.save_trajectory(folder / TRAJECTORY_NAME)


def resolve_optimizer_class(spec: str | type[ZOOptimizer]) -> type[ZOOptimizer]:
    """A ZO optimizer class from a registry name (or class name) or the class itself."""
    if isinstance(spec, str):
        return optimizer_class(spec)
    if isinstance(spec, type) and issubclass(spec, ZOOptimizer):
        return spec
    raise TypeError(
        f"zo_optimizer must be a name in hdopt.zo.OPTIMIZERS, a ZOOptimizer subclass or an instance; got "
        f"{spec!r}"
    )


def accepted_keywords(cls: type[ZOOptimizer]) -> set[str]:
    """The keywords ``cls(params, ...)`` accepts: its constructor's, and its bases' down to ZOOptimizer."""
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        signature = inspect.signature(klass.__init__)
        names |= {n for n, p in signature.parameters.items()
                  if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)} - {"self", "params"}  # fmt: skip
        open_ended = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if klass is ZOOptimizer or not open_ended:
            break
    return names


def check_keywords(cls: type[ZOOptimizer], zo_kwargs: dict[str, Any]) -> None:
    """Refuse keywords ``cls`` does not take, and those TrainingArguments set (raises ValueError)."""
    for key, field in FROM_TRAINING_ARGUMENTS.items():
        if key in zo_kwargs:
            raise ValueError(f"set {key} with TrainingArguments({field}=...), not in zo_kwargs")
    if "reduce" in zo_kwargs:
        raise ValueError("ZOTrainer runs one process: zo_kwargs cannot set reduce")
    unknown = sorted(set(zo_kwargs) - accepted_keywords(cls))
    if unknown:
        known = ", ".join(sorted(accepted_keywords(cls) - set(FROM_TRAINING_ARGUMENTS) - {"reduce"}))
        raise ValueError(f"{cls.__name__} does not take {', '.join(unknown)} in zo_kwargs; it takes {known}")


def check_optimizer_covers(zo: ZOOptimizer, model: nn.Module | None) -> None:
    """An optimizer given as an instance must hold parameters of the model being trained."""
    if model is None:
        return
    own = {id(p) for p in model.parameters()}
    foreign = sum(id(p) not in own for g in zo.param_groups for p in g["params"])
    if foreign:
        raise ValueError(
            f"the zo_optimizer instance holds {foreign} tensors that are not parameters of the model: build "
            "it over model.named_parameters() (the trainable ones) of the model given to ZOTrainer"
        )


def check_training_arguments(args, trainer: Trainer) -> None:
    """Refuse the Trainer settings a zeroth-order step cannot honour, naming the fix."""
    if args.fp16:
        raise ValueError(
            "fp16=True trains with a gradient scaler, and a zeroth-order step has no gradient to scale: use "
            "bf16=True (autocast without a scaler), or load the model in float16 (hdopt.zo updates half "
            "precision weights in float32 with stochastic rounding)"
        )
    if getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False):
        raise NotImplementedError("ZOTrainer does not run under DeepSpeed or FSDP: a ZO step shards nothing")
    if args.world_size > 1 or args.n_gpu > 1:
        raise NotImplementedError(
            "ZOTrainer runs in one process on one device; for data-parallel ZO use hdopt.distributed "
            "(hdopt finetune under torchrun), or set CUDA_VISIBLE_DEVICES to one GPU"
        )
    if args.max_grad_norm:
        logger.info("ZOTrainer: max_grad_norm=%s has no effect (a zeroth-order step has no gradient to clip)",
                    args.max_grad_norm)  # fmt: skip
