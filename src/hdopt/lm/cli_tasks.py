"""``hdopt tasks``: list the built-in tasks, or check a task file before running it.

``hdopt tasks check FILE`` prints what hdopt will make of a task: its data files and split sizes, how
many eval prompts the train split shares, each label word's tokens for a model's tokenizer, and three
rendered prompts with their gold continuation. Problems that would stop ``hdopt eval`` exit with 2.
"""

from __future__ import annotations

import argparse
import sys

from hdopt.lm.cli_eval import task_warnings_to_stderr
from hdopt.lm.models import ModelLoadError, load_tokenizer
from hdopt.lm.task_checks import label_word_problems, label_word_report
from hdopt.lm.tasks import DataError, Task, TaskError, get_task, list_tasks, load_split, resolve_task
from hdopt.lm.tasks.readers import SUFFIX_FORMATS
from hdopt.lm.tasks.sampling import shared_prompts


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=["list", "check"], default="list",
                        help="list the built-in tasks (default), or check one task")  # fmt: skip
    parser.add_argument("task", nargs="?", help="check: a task file (.yaml/.json) or a built-in task name")
    parser.add_argument("--model", default="smollm2-135m", help="the tokenizer to show label words in")
    parser.add_argument("--data-dir", help="built-in tasks: folder with their files (else $HDOPT_DATA_DIR)")
    parser.add_argument("--cache-dir", help="converted-model folder")
    parser.add_argument("--prompts", type=int, default=3, help="rendered eval prompts to show")
    parser.add_argument(
        "--allow-outside-data", action="store_true",
        help="let a task file read data files outside its folder (also: HDOPT_ALLOW_OUTSIDE_DATA=1)",
    )  # fmt: skip


def _kind(task: Task) -> str:
    score = "summed" if task.option_score == "sum" else "mean per-token"
    if task.is_generation:
        stops = ", ".join(map(repr, task.stop)) or "EOS only"
        return f"generation (greedy, stop at {stops}; metric {task.metric})"
    if task.label_words:
        return f"classification: {len(task.label_words)} label words, {score} log-likelihood"
    return f"multiple choice with per-example options, {score} log-likelihood"


def _file_line(split: str, task: Task, size: int) -> str:
    spec = task.files[split]
    fmt = spec.format or SUFFIX_FORMATS.get("." + spec.path.rsplit(".", 1)[-1], "?")
    details = [fmt, spec.encoding]
    if spec.columns:
        details.append("columns " + ",".join(spec.columns))
    if spec.minus:
        details.append(f"minus the {spec.minus} rows")
    if spec.fold:
        details.append(f"rows {spec.fold[0]}, {spec.fold[0] + spec.fold[1]}, ... (one file, alternating)")
    return f"  {split:8s}{size:>7d} examples  {spec.path} ({'; '.join(details)})"


def _list() -> int:
    names = list_tasks()
    width = max(map(len, names))
    for name in names:
        task = get_task(name)
        print(f"{name:{width}s}  {task.description}")
    print("\nor a task file: hdopt eval --task my_task.yaml (check it first: hdopt tasks check my_task.yaml)")
    return 0


def check(args: argparse.Namespace) -> int:
    task = resolve_task(args.task, allow_outside=True if args.allow_outside_data else None)
    kind = "lm-eval task file" if task.doc is not None else "hdopt task"
    print(f"task {task.name!r} ({kind}, {task.source})")
    print(f"kind: {_kind(task)}")
    print("splits:")
    splits = {split: load_split(task, split, args.data_dir) for split in task.files}
    for split, examples in splits.items():
        print(_file_line(split, task, len(examples)))
    problems: list[str] = []
    if "train" in splits:
        shared = shared_prompts(splits["train"], splits["eval"])
        print(f"eval prompts also in train: {shared} of {len(splits['eval'])}")
        if shared:
            problems.append(f"{shared} eval prompts are also train prompts (a pool holding the test rows? "
                            "data: {train: {path: ..., minus: eval}})")  # fmt: skip
    errors: list[str] = []
    if task.label_words:
        tokenizer = load_tokenizer(args.model, args.cache_dir)
        print(f"label words ({args.model} tokenizer):")
        for w in label_word_report(task, tokenizer):
            count = f"{len(w.ids)} token{'s' if len(w.ids) != 1 else ' '}"
            print(f"  {w.word!r:16s} {count}  {' + '.join(map(repr, w.pieces))}  {list(w.ids)}")
        errors, warnings = label_word_problems(task, tokenizer, splits["eval"])
        problems += warnings
    shown = splits["eval"][: max(args.prompts, 0)]
    print(f"prompts ({len(shown)} of eval; prompt + gold continuation):")
    for example in shown:
        print(f"  {example.uid}: {example.prompt!r} + {example.target!r}")
    for message in problems:
        print(f"warning: {message}")
    for message in errors:
        print(f"error: {message}")
    return 2 if errors else 0


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list()
    if not args.task:
        print("hdopt tasks check: give a task file or task name", file=sys.stderr)
        return 2
    try:
        with task_warnings_to_stderr("hdopt tasks"):
            return check(args)
    except (TaskError, DataError, ModelLoadError) as error:
        print(f"hdopt tasks: {error}", file=sys.stderr)
        return 2
