"""The fine-tuning recipe: setup -> train (eval, select, checkpoint) -> finish (test), for every method.

Reads top to bottom: :func:`setup` builds everything a run needs from its config, and attaches the method's
kind (:mod:`hdopt.finetune.kinds`: forward passes only, backprop, or a closed-form probe), which builds the
optimizer and takes the steps; :func:`train_loop` runs the steps; :func:`finish` evaluates the selected
weights on the test split and writes results.json. :func:`finetune` starts a run, :func:`resume` continues
one from its folder; both end bitwise where an uninterrupted run ends, because the batches, the ZO
directions and the dropout masks depend only on (seed, step) and the restored state.

Under ``torchrun --nproc_per_node N`` the pieces that depend on the number of processes (the closure of a
micro-batch, evaluation, the loss every rank logs, the run folder) come from the run's ``workers``
(:mod:`hdopt.finetune.data_parallel`), which shards and all-reduces for the forward-only methods; rank 0
alone writes the run folder.
"""

from __future__ import annotations

import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hdopt.distributed import Communicator
from hdopt.finetune import rundir
from hdopt.finetune.adapters import ADAPTERS, prepare_model, trainable_parameters
from hdopt.finetune.batches import MAX_NEW_TOKENS, make_closure, micro_batches, step_indices
from hdopt.finetune.checkpoint import checkpoint_meta, load_checkpoint, load_weights, save_checkpoint
from hdopt.finetune.config import RunConfig
from hdopt.finetune.data_parallel import (
    OneProcess,
    launched_world,
    process_group,
    workers_for,
    world_size_message,
)
from hdopt.finetune.errors import ConfigError, DivergenceError
from hdopt.finetune.kinds import MethodKind
from hdopt.finetune.label_head import (
    LabelHead,
    apply_label_head,
    fit_label_head,
    load_label_head,
    save_label_head,
)
from hdopt.finetune.methods import Method, get_method
from hdopt.finetune.optimizers import paper_defaults
from hdopt.io import atomic_write_json, remove_stale_temp_files
from hdopt.lm.evaluation import EvalConfig, EvalResult, context_length, evaluate
from hdopt.lm.models import load_model
from hdopt.lm.tasks import Splits, Task, load_split, resolve_task, sample_protocol

GUARD_WINDOW = 5  # losses averaged by the divergence guard


# -- setup ---------------------------------------------------------------------------------------------------
def resolve(cfg: RunConfig, method: Method, task: Task) -> RunConfig:
    """Fill the fields left at ``None``: from the optimizer's ``paper_defaults``, then the method's defaults,
    the adapter's settings and the task's protocol."""
    out = cfg.to_dict()
    name = out["method"]["optimizer"] or method.defaults.get("optimizer")
    fields, rule_args = paper_defaults(name)
    adapter = ADAPTERS.get(method.adapter).defaults()
    for defaults in (fields, method.defaults, adapter):
        for section in out.values():
            for key, value in section.items():
                if value is None and key in defaults:
                    section[key] = defaults[key]
    if rule_args:
        out["method"]["optimizer_args"] = {**rule_args, **(out["method"]["optimizer_args"] or {})}
    if out["data"]["num_dev"] is None:
        out["data"]["num_dev"] = task.num_dev
    train = out["train"]
    if train["save_every"] is None:
        train["save_every"] = train["eval_every"] or train["steps"]
    return RunConfig.from_dict(out)


@dataclass
class Setup:
    """Everything a run needs, built once from its config; ``kind`` (attached last) trains it."""

    cfg: RunConfig
    method: Method
    task: Task
    splits: Splits
    model: torch.nn.Module
    tokenizer: object
    params: list[tuple[str, torch.nn.Parameter]]
    device: torch.device
    workers: OneProcess = field(default_factory=OneProcess)  # torchrun: data-parallel pieces
    label_head: LabelHead | None = None  # --lp-init: the probe written into the LM head
    kind: MethodKind | None = None

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self.kind.optimizer

    @property
    def scheduler(self) -> torch.optim.lr_scheduler.LRScheduler | None:
        return self.kind.scheduler

    @property
    def comm(self) -> Communicator:
        return self.workers.comm

    @property
    def writer(self) -> bool:
        """True on the process that writes the run folder (rank 0; the only process without torchrun)."""
        return self.workers.rank == 0

    def objective(self, examples: Sequence) -> Callable[[], torch.Tensor]:
        """The run's training objective on ``examples`` as a closure (:func:`make_closure`)."""
        c = self.cfg
        return make_closure(self.model, self.tokenizer, self.task, examples, c.method.objective,
                            c.data.max_length, self.device)  # fmt: skip

    def evaluate(self, examples: Sequence) -> EvalResult:
        """hdopt.lm's zero-shot evaluation of the current weights on ``examples``."""
        return evaluate_examples(self.model, self.tokenizer, self.task, self.cfg, examples)


@dataclass
class LoopState:
    """The loop's counters (checkpointed with the weights)."""

    step: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    initial_loss: float | None = None
    recent_losses: list[float] = field(default_factory=list)
    forwards: float = 0
    backwards: float = 0
    elapsed: float = 0.0


def load_data(cfg: RunConfig, task: Task) -> Splits:
    d = cfg.data
    train_pool = load_split(task, "train", d.data_dir)
    eval_pool = load_split(task, "eval", d.data_dir)
    return sample_protocol(train_pool, eval_pool, d.data_seed, d.num_train, d.num_dev, d.num_eval)


def setup(cfg: RunConfig, model=None, tokenizer=None, comm: Communicator | None = None,
          label_head: LabelHead | None = None) -> Setup:  # fmt: skip
    """Resolve the config, load data and model, attach the adapter, then the method's kind (which builds the
    optimizer and schedule).

    With ``--lp-init`` the linear probe is fit on the adapted model's features and written into its LM
    head (or ``label_head``, a resumed run's saved probe, is written). With a communicator of several ranks
    (torchrun), every rank checks that it runs the same config from the same weights before the first step.
    """
    workers = workers_for(comm if comm is not None else Communicator.single())
    task = resolve_task(cfg.data.task)
    method = get_method(cfg.method.method).for_task(task)  # lp without label words: head tuning
    cfg = resolve(cfg, method, task)
    workers.check(cfg, method)
    kind = method.kind.variant(cfg)
    kind.check(cfg, task)
    torch.manual_seed(cfg.train.seed)  # dropout masks and any other draw from torch's global generator
    splits = load_data(cfg, task)
    if not splits.train:
        raise ValueError(f"task {task.name!r}: no training examples (check --num-train and the data)")
    if model is None:
        m = cfg.model
        model, tokenizer = load_model(m.model, m.dtype, m.device, m.cache_dir)
    model = prepare_model(model, method.adapter, cfg.method, cfg.train.seed)
    if cfg.method.lp_init:
        label_head = label_head or _fit_label_head(cfg, method, task, splits, model, tokenizer)
        apply_label_head(model, label_head)
    params = trainable_parameters(model)
    s = Setup(cfg, method, task, splits, model, tokenizer, params, _device(model), workers, label_head)
    s.kind = kind(s)
    workers.start(s)
    return s


def _fit_label_head(cfg: RunConfig, method: Method, task: Task, splits: Splits, model,
                    tokenizer) -> LabelHead:  # fmt: skip
    """--lp-init: fit the probe on the train features (C on dev, or --lp-c)."""
    if not method.kind.takes_steps:
        raise ConfigError("--lp-init starts a trained method from the linear probe; lp is the probe itself")
    return fit_label_head(model, tokenizer, task, splits.train, splits.dev, cfg.data.max_length,
                          cfg.method.lp_c, cfg.train.seed, cfg.train.eval_batch_size)  # fmt: skip


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def evaluate_examples(model, tokenizer, task: Task, cfg: RunConfig, examples) -> EvalResult:
    """hdopt.lm's zero-shot evaluation of ``model`` on ``examples``, as a run of ``cfg`` evaluates dev/test
    (eval mode during the evaluation; the model's mode is restored after)."""
    answer_room = MAX_NEW_TOKENS if task.is_generation else 0  # max_length bounds the prompt
    ecfg = EvalConfig(
        model=cfg.model.model, task=task.name, batch_size=cfg.train.eval_batch_size,
        max_length=context_length(model, cfg.data.max_length + answer_room),
        max_new_tokens=MAX_NEW_TOKENS, progress=False,
    )  # fmt: skip
    was_training = model.training
    model.eval()
    result = evaluate(model, tokenizer, task, examples, [], ecfg)
    model.train(was_training)
    return result


# -- train ---------------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C sets a flag; the loop finishes its step, saves a checkpoint and stops (twice: stop now)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: saving a checkpoint after this step (Ctrl-C again to stop now)", file=sys.stderr)

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def check_divergence(state: LoopState, loss: float, factor: float, guarded: bool) -> None:
    """Raise :class:`DivergenceError` when the loss is not finite or has blown up."""
    if not math.isfinite(loss):
        raise DivergenceError(f"the loss is {loss} at step {state.step}")
    if state.initial_loss is None:
        state.initial_loss = loss
    state.recent_losses = (state.recent_losses + [loss])[-GUARD_WINDOW:]
    mean = sum(state.recent_losses) / len(state.recent_losses)
    if guarded and state.initial_loss > 0 and mean > factor * state.initial_loss:
        raise DivergenceError(
            f"the mean loss of the last {len(state.recent_losses)} steps ({mean:.4g}) exceeds "
            f"{factor:g} x the first loss ({state.initial_loss:.4g}) at step {state.step}"
        )


def train_step(s: Setup, step: int) -> float:
    """One optimizer step on the batch of ``step`` (its micro-batches' closures, then the kind's step)."""
    cfg = s.cfg
    indices = step_indices(len(s.splits.train), cfg.train.batch_size, cfg.train.seed, step)
    closures = [s.workers.closure(s, [s.splits.train[i] for i in micro])
                for micro in micro_batches(indices, cfg.train.grad_accum)]  # fmt: skip
    return s.kind.step(closures)


def evaluate_split(s: Setup, examples, evaluate: Callable[[Sequence], EvalResult] | None = None) -> dict:
    """The metrics of ``evaluate`` (default: the whole model's evaluation) on ``examples``."""
    return s.workers.evaluate(s, examples, evaluate or s.evaluate)


def evaluate_and_select(s: Setup, state: LoopState, folder: Path, log: rundir.MetricsLog) -> None:
    """Dev evaluation (the kind's); keeps the best trainable weights in best.safetensors."""
    if not s.splits.dev:
        return
    metrics = evaluate_split(s, s.splits.dev, s.kind.evaluate)
    value = metrics[s.task.metric]
    log.record({"step": state.step, "forwards": state.forwards, "backwards": state.backwards,
                **{f"dev_{k}": v for k, v in metrics.items()}})  # fmt: skip
    if state.best_metric is None or value > state.best_metric:
        state.best_metric, state.best_step = value, state.step
        if s.cfg.train.keep_best and s.writer:
            save_checkpoint(folder / rundir.BEST, s.params, meta={"step": state.step, s.task.metric: value})


def train_loop(s: Setup, state: LoopState, folder: Path, log: rundir.MetricsLog,
               on_step: Callable[[int], None] | None = None) -> str:  # fmt: skip
    """Run steps ``state.step .. steps-1``; returns ``completed`` or ``interrupted``."""
    t = s.cfg.train
    fwd, bwd = s.kind.passes_per_step()
    guarded = s.cfg.method.objective == "loss"
    s.model.train(s.kind.training_mode())
    if state.step == 0 and t.eval_every:
        evaluate_and_select(s, state, folder, log)
    bar = tqdm(total=t.steps, initial=state.step, desc=s.method.name, unit="step",
               disable=not (t.progress and s.writer))  # fmt: skip
    status = "completed"
    with StopRequest() as stop:
        while state.step < t.steps:
            start = time.perf_counter()
            loss = train_step(s, state.step)
            loss, stop.requested = s.workers.agree(loss, stop.requested, state.step)
            s.scheduler.step()
            state.step += 1
            state.forwards, state.backwards = state.forwards + fwd, state.backwards + bwd
            state.elapsed += time.perf_counter() - start
            check_divergence(state, loss, t.divergence_factor, guarded)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
            if state.step % t.log_every == 0 or state.step == t.steps:
                log.record({"step": state.step, "loss": loss, "lr": s.scheduler.get_last_lr()[0],
                            "elapsed": round(state.elapsed, 3)})  # fmt: skip
            if t.eval_every and (state.step % t.eval_every == 0 or state.step == t.steps):
                evaluate_and_select(s, state, folder, log)
            if on_step is not None:
                on_step(state.step)
            if state.step % t.save_every == 0 or state.step == t.steps or stop.requested:
                save_resume_point(s, state, folder)
            if stop.requested and state.step < t.steps:
                status = "interrupted"
                break
    bar.close()
    return status


# -- save ----------------------------------------------------------------------------------------------------
def save_resume_point(s: Setup, state: LoopState, folder: Path) -> None:
    """The kind's files first (a longer trajectory is truncated on resume), then the checkpoint (rank 0)."""
    if not s.writer:
        return
    s.kind.save_files(folder)
    training = {**s.kind.state_dict(), "rng": torch.get_rng_state(), "loop": dataclasses.asdict(state)}
    meta = {"step": state.step, "world_size": s.workers.world_size}
    save_checkpoint(folder / rundir.CHECKPOINT, s.params, training, meta)


def restore(s: Setup, folder: Path, log: rundir.MetricsLog) -> LoopState:
    """Load the resume checkpoint into the setup; returns the loop state it was taken at."""
    weights, training, meta = load_checkpoint(folder / rundir.CHECKPOINT)
    saved = meta.get("world_size", 1)
    if saved != s.workers.world_size:
        raise ConfigError(world_size_message(folder, saved, s.workers.world_size))
    load_weights(s.params, weights)
    s.kind.load_state_dict(training)
    torch.set_rng_state(training["rng"])
    state = LoopState(**training["loop"])
    log.truncate(state.step)
    return state


# -- finish --------------------------------------------------------------------------------------------------
def finish(s: Setup, state: LoopState, folder: Path, status: str = "completed", error: str = "") -> dict:
    """Test evaluation of the selected weights (unless the run stopped early); writes results.json."""
    results = {
        "status": status, "method": s.method.name, "model": s.cfg.model.model, "task": s.task.name,
        "metric": s.task.metric, "steps": state.step, "forwards": state.forwards,
        "backwards": state.backwards, "wall_seconds": round(state.elapsed, 2),
        "best_dev": state.best_metric, "best_step": state.best_step,
        "trainable_parameters": sum(p.numel() for _, p in s.params),
    }  # fmt: skip
    if s.label_head is not None:
        results["lp_init"] = s.label_head.meta()
    if error:
        results["error"] = error
    if status == "completed":
        if s.cfg.train.keep_best:
            s.workers.barrier("barrier before reading best.safetensors")  # written by rank 0
            if (folder / rundir.BEST).is_file():
                load_weights(s.params, load_checkpoint(folder / rundir.BEST)[0])
        test = evaluate_split(s, s.splits.eval)
        results.update({f"test_{k}": v for k, v in test.items()})
        results["test"] = test[s.task.metric]
    results.update(s.kind.results())
    results["peak_memory_mib"] = round(rundir.peak_memory_mib(s.device), 1)
    results.update(s.workers.record())  # torchrun: the number of processes and the bytes they exchanged
    if s.writer:
        atomic_write_json(folder / rundir.RESULTS, results, default=str)
    return results


def _run(s: Setup, state: LoopState, folder: Path, log: rundir.MetricsLog, on_step) -> dict:
    try:
        status = train_loop(s, state, folder, log, on_step)
    except DivergenceError as err:
        message = (
            f"training diverged: {err}. The last checkpoint ({rundir.CHECKPOINT}, step "
            f"{_checkpoint_step(folder)}) is intact; lower --lr (or, for ZO, --eps) and start again"
        )
        finish(s, state, folder, "diverged", message)
        log.close()
        raise DivergenceError(message) from None
    if s.writer:
        s.kind.save_files(folder)
    results = finish(s, state, folder, status)
    log.close()
    return results


# -- entry points --------------------------------------------------------------------------------------------
def finetune(cfg: RunConfig, model=None, tokenizer=None, *,
             on_step: Callable[[int], None] | None = None) -> tuple[dict, Path]:  # fmt: skip
    """Run ``cfg`` from the start; returns ``(results, run folder)``.

    Args:
        cfg: the run's configuration (``None`` fields take the method's defaults).
        model, tokenizer: an already loaded pair (else ``load_model(cfg.model.model, ...)``).
        on_step: called after every step with the step number (tests use it to simulate a kill).
    """
    with process_group(cfg) as comm:
        s = setup(cfg, model, tokenizer, comm)
        if not s.kind.takes_steps:  # the logistic-regression probe: a closed-form fit
            return s.kind.fit()
        folder = s.workers.run_folder(
            rundir.new_run_dir(s.cfg.train.output_dir, s.task.name, s.method.name, s.cfg.model.model))
        if (folder / rundir.CHECKPOINT).exists():
            raise FileExistsError(f"{folder} already holds a run: resume it with --resume {folder}")
        if s.writer:
            record = _method_record(s.method, s.workers.world_size)
            config = {**s.cfg.to_dict(), "method_record": record}
            atomic_write_json(folder / rundir.CONFIG, config, default=str)
            if ADAPTERS.get(s.method.adapter).computed_start:  # replay and resume start from these
                save_checkpoint(folder / rundir.INITIAL, s.params, meta={"step": 0})
            if s.label_head is not None:  # resume, replay and load_trained start from these rows
                save_label_head(folder / rundir.LP_HEAD, s.label_head)
        board = rundir.open_tensorboard(folder, s.cfg.train.tensorboard and s.writer)
        log = rundir.MetricsLog(folder, tensorboard=board, write=s.writer)
        return _run(s, LoopState(), folder, log, on_step), folder


def resume(folder: str | Path, model=None, tokenizer=None, *,
           on_step: Callable[[int], None] | None = None, **overrides) -> tuple[dict, Path]:  # fmt: skip
    """Continue the run in ``folder`` from its last checkpoint (same config; ``overrides`` e.g. progress).

    ``steps`` may be changed, to extend a finished run or end an interrupted one sooner, when the lr
    schedule does not depend on the number of steps (``constant``); the run then ends bitwise where a run
    started with that many steps ends. The new number is written to the folder's config.json.
    """
    folder = Path(folder)
    cfg, record = rundir.read_config(folder)
    steps = overrides.pop("steps", None)
    cfg = cfg.replace(**overrides) if overrides else cfg
    if not (folder / rundir.CHECKPOINT).is_file():
        raise FileNotFoundError(f"{folder} has no {rundir.CHECKPOINT} to resume from (none saved yet)")
    if steps is not None and steps != cfg.train.steps:
        cfg = _change_steps(folder, cfg, record, steps)
    saved, world = record.get("world_size", 1), launched_world()[1]
    if saved != world:
        raise ConfigError(world_size_message(folder, saved, world))
    label_head = load_label_head(folder / rundir.LP_HEAD) if cfg.method.lp_init else None
    with process_group(cfg) as comm:
        s = setup(cfg, model, tokenizer, comm, label_head)
        if s.writer:  # a hard kill may have left temporary files of half-written checkpoints
            remove_stale_temp_files(folder)
        board = rundir.open_tensorboard(folder, s.cfg.train.tensorboard and s.writer)
        rows = rundir.read_metrics(folder) if s.writer else []
        log = rundir.MetricsLog(folder, rows, board, write=s.writer)
        state = restore(s, folder, log)
        return _run(s, state, folder, log, on_step), folder


def _change_steps(folder: Path, cfg: RunConfig, record: dict, steps: int) -> RunConfig:
    """``cfg`` with ``steps`` for a resumed run; refuses a schedule that depends on the number of steps."""
    at = _checkpoint_step(folder)
    if cfg.optim.schedule != "constant":
        raise ConfigError(
            f"{folder} uses the {cfg.optim.schedule!r} lr schedule, which is set by the number of steps "
            f"({cfg.train.steps}): changing it would change the lr of the steps already run. Resume without "
            "--steps, or start a new run"
        )
    if steps < at:
        raise ConfigError(f"{folder} is at step {at}: --steps must be at least that, got {steps}")
    cfg = cfg.replace(steps=steps)
    if launched_world()[0] == 0:
        atomic_write_json(folder / rundir.CONFIG, {**cfg.to_dict(), "method_record": record}, default=str)
    return cfg


def _checkpoint_step(folder: Path):
    path = folder / rundir.CHECKPOINT
    return checkpoint_meta(path).get("step") if path.is_file() else None


def _method_record(method: Method, world_size: int = 1) -> dict:
    return {"name": method.name, "trainer": method.trainer, "adapter": method.adapter,
            "world_size": world_size}


__all__ = ["LoopState", "Setup", "evaluate_examples", "finetune", "load_data", "resume", "setup"]
