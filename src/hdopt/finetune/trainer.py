"""The fine-tuning recipe: setup -> train (eval, select, checkpoint) -> finish (test), for every method.

Reads top to bottom: :func:`setup` builds everything a run needs from its config, and attaches the method's
kind (:mod:`hdopt.finetune.kinds`: forward passes only, backprop, or a closed-form probe), which builds the
optimizer and takes the steps; :func:`train_loop` runs the steps, evaluates dev and saves resume points;
:func:`finish` writes results.json. :func:`finetune` starts a run, :func:`resume` continues one from its
folder; both end bitwise where an uninterrupted run ends, because the batches, the ZO directions and the
dropout masks depend only on (seed, step) and the restored state.

The test metrics reported are those of the weights with the best dev metric, measured when those weights
are current (at the dev evaluation that found them), so the test never needs weights from another step;
they are part of the loop state, saved in every checkpoint. A new best dev metric forces a resume point
at its step, written before ``best.safetensors``: a kill between the two leaves a checkpoint that knows
its best step, and resume rewrites the best weights from it. A run holds its folder's lock
(:class:`hdopt.finetune.rundir.RunLock`) from start to end; SIGTERM stops it as Ctrl-C does.

Under ``torchrun --nproc_per_node N`` the pieces that depend on the number of processes (the closure of a
micro-batch, evaluation, the loss every rank logs, the run folder) come from the run's ``workers``
(:mod:`hdopt.finetune.data_parallel`), which shards and all-reduces for the forward-only methods; rank 0
alone writes the run folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hdopt.distributed import Communicator
from hdopt.finetune import rundir
from hdopt.finetune.adapters import ADAPTERS, prepare_model, trainable_parameters
from hdopt.finetune.batches import MAX_NEW_TOKENS, make_closure, micro_batches, step_indices
from hdopt.finetune.checkpoint import (
    checkpoint_meta,
    load_checkpoint,
    load_weights,
    load_weights_from,
    model_digest,
    save_checkpoint,
    tensors_digest,
)
from hdopt.finetune.config import RunConfig
from hdopt.finetune.data_parallel import (
    OneProcess,
    launched_world,
    process_group,
    workers_for,
    world_size_message,
)
from hdopt.finetune.errors import ConfigError, DivergenceError, RunFolderError
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
from hdopt.finetune.trained import check_start
from hdopt.io import atomic_write_json
from hdopt.lm.evaluation import EvalConfig, EvalResult, check_room, context_length, evaluate
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
    stopped_by: str | None = None  # the signal that stopped the run (SIGINT, SIGTERM), if one did

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
    best_test: dict[str, float] | None = None  # the test metrics of the best dev step's weights
    best_sha256: str | None = None  # the digest of those weights (a rebuild of them is checked against it)
    start_sha256: str | None = None  # the digest of the starting model (resume and rebuilds refuse others)
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
    task = resolve_task(cfg.data.task, allow_outside=cfg.data.allow_outside_data or None)
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
        m.check_available()
        model, tokenizer = load_model(m.model, m.dtype, m.device, m.cache_dir)
    # before any forward pass: --max-length must hold a prompt token and the longest option (or the answer)
    check_room(task, [*splits.train, *splits.dev, *splits.eval], tokenizer, eval_config(model, task, cfg))
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
    t = cfg.train
    return fit_label_head(model, tokenizer, task, splits.train, splits.dev, cfg.data.max_length,
                          cfg.method.lp_c, t.seed, t.eval_batch_size, t.progress)  # fmt: skip


def _device(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def eval_config(model, task: Task, cfg: RunConfig) -> EvalConfig:
    """The evaluation settings of a run of ``cfg`` (dev and test)."""
    answer_room = MAX_NEW_TOKENS if task.is_generation else 0  # max_length bounds the prompt
    return EvalConfig(
        model=cfg.model.model, task=task.name, batch_size=cfg.train.eval_batch_size,
        max_length=context_length(model, cfg.data.max_length + answer_room),
        max_new_tokens=MAX_NEW_TOKENS, progress=False,
    )  # fmt: skip


def evaluate_examples(model, tokenizer, task: Task, cfg: RunConfig, examples) -> EvalResult:
    """hdopt.lm's zero-shot evaluation of ``model`` on ``examples``, as a run of ``cfg`` evaluates dev/test
    (eval mode during the evaluation; the model's mode is restored after)."""
    was_training = model.training
    model.eval()
    result = evaluate(model, tokenizer, task, examples, [], eval_config(model, task, cfg))
    model.train(was_training)
    return result


# -- train ---------------------------------------------------------------------------------------------------
class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (what ``timeout``, ``kill`` and schedulers send) sets a flag; the loop
    finishes its step, saves a checkpoint and stops. A second signal stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested, self.signal = True, signal.Signals(signum).name
        again = "Ctrl-C" if signum == signal.SIGINT else "the signal"
        print(f"\n{self.signal}: saving a checkpoint after this step ({again} again to stop now)",
              file=sys.stderr)  # fmt: skip

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)


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


def guard_weights(s: Setup, state: LoopState) -> None:
    """Raise :class:`DivergenceError` when a trainable weight is not finite (checked before the weights are
    evaluated or saved: an update can overflow while the loss before it was finite)."""
    with torch.no_grad():
        for name, p in s.params:
            if not all(bool(torch.isfinite(c).all()) for c in p.detach().reshape(-1).split(1 << 22)):
                raise DivergenceError(f"the weights are not finite after step {state.step} ({name})")


def evaluate_and_select(s: Setup, state: LoopState, log: rundir.MetricsLog) -> bool:
    """Dev evaluation (the kind's); returns whether the dev metric is a new best. With ``keep_best`` the test
    metrics of a new best's weights are measured now, while they are current."""
    if not s.splits.dev:
        return False
    guard_weights(s, state)
    metrics = evaluate_split(s, s.splits.dev, s.kind.evaluate)
    value = metrics[s.task.metric]
    log.record({"step": state.step, "forwards": state.forwards, "backwards": state.backwards,
                **{f"dev_{k}": v for k, v in metrics.items()}})  # fmt: skip
    if state.best_metric is not None and value <= state.best_metric:
        return False
    state.best_metric, state.best_step = value, state.step
    state.best_sha256 = tensors_digest(s.params)
    if s.cfg.train.keep_best:
        state.best_test = evaluate_split(s, s.splits.eval)
    return True


def train_loop(s: Setup, state: LoopState, folder: Path, log: rundir.MetricsLog,
               on_step: Callable[[int], None] | None = None) -> str:  # fmt: skip
    """Run steps ``state.step .. steps-1``; returns ``completed`` or ``interrupted``."""
    t = s.cfg.train
    fwd, bwd = s.kind.passes_per_step()
    guarded = s.cfg.method.objective == "loss"
    s.model.train(s.kind.training_mode())
    bar = tqdm(total=t.steps, initial=state.step, desc=s.method.name, unit="step",
               disable=not (t.progress and s.writer))  # fmt: skip
    status = "completed"
    with StopRequest() as stop:  # from the first dev evaluation: a signal during it stops after step 1
        if state.step == 0 and t.eval_every and evaluate_and_select(s, state, log):
            save_best(s, state, folder)
        while state.step < t.steps:
            start = time.perf_counter()
            loss = train_step(s, state.step)
            # the ranks agree on the flag as it is now; a signal arriving later stays in it for the next
            # exchange (assigning the agreed flag back to it dropped such a signal)
            loss, stopping = s.workers.agree(loss, stop.requested, state.step)
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
            improved = bool(t.eval_every) and (state.step % t.eval_every == 0 or state.step == t.steps)
            improved = improved and evaluate_and_select(s, state, log)
            if on_step is not None:
                on_step(state.step)
            stopping = stopping or (stop.requested and s.workers.world_size == 1)  # one process: any signal
            if improved or state.step % t.save_every == 0 or state.step == t.steps or stopping:
                save_resume_point(s, state, folder)
            if improved:
                save_best(s, state, folder)
            if stopping and state.step < t.steps:
                status, s.stopped_by = "interrupted", stop.signal
                break
    bar.close()
    return status


# -- save ----------------------------------------------------------------------------------------------------
def save_resume_point(s: Setup, state: LoopState, folder: Path) -> None:
    """The kind's files first (a longer trajectory is truncated on resume), then the checkpoint (rank 0)."""
    guard_weights(s, state)
    if not s.writer:
        return
    s.kind.save_files(folder)
    training = {**s.kind.state_dict(), "rng": torch.get_rng_state(), "loop": dataclasses.asdict(state)}
    kept = s.kind.keeps_weights()
    meta = {"step": state.step, "world_size": s.workers.world_size, "weights": "kept" if kept else "replay",
            "weights_sha256": tensors_digest(s.params)}  # fmt: skip
    save_checkpoint(folder / rundir.CHECKPOINT, s.params if kept else [], training, meta)


def save_best(s: Setup, state: LoopState, folder: Path) -> None:
    """Write the current (best dev) trainable weights to best.safetensors, after the resume point."""
    if not (s.cfg.train.keep_best and s.writer and s.kind.keeps_weights()):
        return
    guard_weights(s, state)
    meta = {"step": state.step, s.task.metric: state.best_metric}
    save_checkpoint(folder / rundir.BEST, s.params, meta=meta)


def restore(s: Setup, folder: Path, log: rundir.MetricsLog) -> LoopState:
    """Load the resume checkpoint into the setup (whose model is the run's start); returns the loop state
    it was taken at.

    The starting model must be the run's (its digest); the kind loads the weights or rebuilds them. It checks
    its own files (a damaged trajectory is rewritten from the checkpoint's copy), and best.safetensors must
    hold the checkpoint's best step: a kill between the two writes of a new best leaves the older one,
    which is rewritten from the restored weights (the best step is then the checkpoint's).
    """
    _, training, meta = load_checkpoint(folder / rundir.CHECKPOINT, weights=False)
    saved = meta.get("world_size", 1)
    if saved != s.workers.world_size:
        raise ConfigError(world_size_message(folder, saved, s.workers.world_size))
    state = LoopState(**training["loop"])
    check_start(s.model, state.start_sha256, folder)
    s.kind.restore(folder / rundir.CHECKPOINT, training, meta)
    torch.set_rng_state(training["rng"])
    log.truncate(state.step)
    if s.writer:
        s.kind.check_files(folder, state.step)
        _check_best(s, state, folder)
    return state


def _check_best(s: Setup, state: LoopState, folder: Path) -> None:
    if not (s.cfg.train.keep_best and s.kind.keeps_weights()) or state.best_step is None:
        return
    path = folder / rundir.BEST
    held = checkpoint_meta(path).get("step") if path.is_file() else None
    if held == state.best_step:
        return
    if state.best_step != state.step:
        raise RunFolderError(
            f"{path} holds the weights of step {held}, but the checkpoint (step {state.step}) says the best "
            f"dev step is {state.best_step}: the best weights are stale (a run folder of an older hdopt "
            "killed between a dev evaluation and its checkpoint); start the run again"
        )
    save_best(s, state, folder)


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
        results["probe_seconds"] = s.label_head.seconds  # part of wall_seconds
    if error:
        results["error"] = error
    if s.stopped_by:
        results["stopped_by"] = s.stopped_by
    if status == "completed":
        test = None
        if s.cfg.train.keep_best:
            s.workers.barrier("barrier before reading best.safetensors")  # written by rank 0
            best = folder / rundir.BEST
            held = checkpoint_meta(best).get("step") if best.is_file() else None
            if state.best_step is not None and held == state.best_step:  # the model ends with them, as tested
                load_weights_from(best, s.params)
            test = state.best_test  # None: no dev split, or a checkpoint of an older hdopt
        test = test or evaluate_split(s, s.splits.eval)
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
        step = _checkpoint_step(folder)
        kept = (f"The last checkpoint ({rundir.CHECKPOINT}, step {step}) is intact" if step is not None
                else "No checkpoint was saved before it")  # fmt: skip
        message = f"training diverged: {err}. {kept}; lower --lr (or, for ZO, --eps) and start again"
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
        with claim_run_folder(s.workers, folder, fresh=True):
            return _start(s, folder, on_step), folder


def _start(s: Setup, folder: Path, on_step) -> dict:
    """Write a new run's start files, then train."""
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
    probe = s.label_head.seconds if s.label_head is not None else 0.0  # --lp-init: the fit is run time
    return _run(s, LoopState(start_sha256=model_digest(s.model), elapsed=probe), folder, log, on_step)


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
    saved, world = record.get("world_size", 1), launched_world()[1]
    if saved != world:
        raise ConfigError(world_size_message(folder, saved, world))
    with process_group(cfg) as comm, claim_run_folder(workers_for(comm), folder, fresh=False):
        if steps is not None and steps != cfg.train.steps:
            cfg = _change_steps(folder, cfg, record, steps)
        label_head = load_label_head(folder / rundir.LP_HEAD) if cfg.method.lp_init else None
        s = setup(cfg, model, tokenizer, comm, label_head)
        if (folder / rundir.INITIAL).is_file():  # the run's own start, not one recomputed here
            load_weights(s.params, load_checkpoint(folder / rundir.INITIAL)[0])
        board = rundir.open_tensorboard(folder, s.cfg.train.tensorboard and s.writer)
        rows = rundir.read_metrics(folder) if s.writer else []
        log = rundir.MetricsLog(folder, rows, board, write=s.writer)
        state = restore(s, folder, log)
        return _run(s, state, folder, log, on_step), folder


@contextlib.contextmanager
def claim_run_folder(workers: OneProcess, folder: Path, fresh: bool) -> Iterator[None]:
    """Rank 0 holds the folder's lock (:func:`hdopt.finetune.rundir.claim`) for the run; every rank
    raises rank 0's error when it cannot (another process holds it, a fresh run in a used folder)."""
    with contextlib.ExitStack() as stack:
        failure = None
        if workers.rank == 0:
            try:
                stack.enter_context(rundir.claim(folder, fresh))
            except (RunFolderError, FileExistsError) as err:
                failure = err
        workers.raise_for(failure, "claim of the run folder")
        yield


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
