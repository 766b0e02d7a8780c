"""``hdopt eval``: zero-shot / in-context evaluation of a language model on a task."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator

from hdopt.lm.evaluation import DEFAULT_DEMOS, DEFAULT_NEW_TOKENS, METHODS, EvalConfig, run_eval
from hdopt.lm.models import DTYPES, ModelLoadError
from hdopt.lm.tasks import DataError, TaskError, TaskWarning, list_tasks

_DEFAULTS = EvalConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    parser.add_argument(
        "--model", default=d.model, help="alias (smollm2-135m, gemma3-270m), folder or hub name"
    )
    parser.add_argument(
        "--task", default=d.task, help=f"{', '.join(list_tasks())}, or a task .yaml/.json file"
    )
    parser.add_argument("--method", default=d.method, choices=METHODS)
    parser.add_argument("--num-eval", type=int, default=d.num_eval, help="test examples (0: the whole split)")
    parser.add_argument("--num-train", type=int, default=d.num_train, help="train sample the demos come from")
    parser.add_argument("--num-dev", type=int, default=d.num_dev, help="dev sample (default: the task's)")
    parser.add_argument(
        "--num-demos", type=int, default=d.num_demos,
        help=f"ICL demonstrations (default: the task file's num_fewshot, else {DEFAULT_DEMOS})",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument(
        "--data-dir",
        default=d.data_dir,
        help="folder with the task files (else $HDOPT_DATA_DIR, else the hub)",
    )
    parser.add_argument(
        "--max-length", type=int, default=d.max_length, help="context tokens (capped at the model's)"
    )
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per forward")
    parser.add_argument("--batch-tokens", type=int, default=d.batch_tokens, help="padded tokens per forward")
    parser.add_argument(
        "--max-new-tokens", type=int, default=d.max_new_tokens,
        help=f"generation length (default: the task file's max_gen_toks, else {DEFAULT_NEW_TOKENS})",
    )  # fmt: skip
    parser.add_argument("--dtype", default=d.dtype, choices=sorted(DTYPES))
    parser.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--cache-dir", default=d.cache_dir, help="converted-model folder")
    parser.add_argument("--output-dir", default=d.output_dir, help="run folder (default: runs/eval-...)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    parser.add_argument(
        "--allow-outside-data", action="store_true",
        help="let a task file read data files outside its folder (also: HDOPT_ALLOW_OUTSIDE_DATA=1)",
    )  # fmt: skip


@contextlib.contextmanager
def task_warnings_to_stderr(prog: str) -> Iterator[None]:
    """Print each :class:`TaskWarning` at once as one line ``<prog>: warning: ...`` on stderr."""

    def show(message, category, *args, **kwargs) -> None:
        if issubclass(category, TaskWarning):
            print(f"{prog}: warning: {message}", file=sys.stderr, flush=True)
        else:
            previous(message, category, *args, **kwargs)

    previous = warnings.showwarning
    with warnings.catch_warnings():
        warnings.simplefilter("always", TaskWarning)
        warnings.showwarning = show
        yield


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    fields = {name: getattr(args, name) for name in EvalConfig.__dataclass_fields__}
    if fields["num_eval"] == 0:
        fields["num_eval"] = None
    return EvalConfig(**fields)


def format_table(results: dict) -> str:
    metric = ["accuracy"] if results["metric"] == "accuracy" else ["f1", "em"]
    keys = ["task", "model", "method", "num_eval", "num_demos", *metric, "tokens_per_second", "seconds"]
    header = "| " + " | ".join(keys) + " |"
    values = "| " + " | ".join(str(results[k]) for k in keys) + " |"
    return "\n".join([header, "|" + "---|" * len(keys), values])


def run(args: argparse.Namespace) -> int:
    try:
        with task_warnings_to_stderr("hdopt eval"):
            results, out = run_eval(config_from_args(args))
    except (TaskError, DataError, ModelLoadError, ValueError) as error:
        print(f"hdopt eval: {error}", file=sys.stderr)
        return 2
    print(format_table(results))
    print(f"run folder: {out}")
    return 0
