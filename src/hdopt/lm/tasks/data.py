"""Turn a task's data files (or its Hugging Face hub dataset) into :class:`Example` lists."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hdopt.lm.tasks.base import DataError, DataFile, Example, Task
from hdopt.lm.tasks.readers import Record, read_file
from hdopt.lm.tasks.rows import get_row_function

DATA_ENV = "HDOPT_DATA_DIR"


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path | None:
    """The data directory: the argument, else ``$HDOPT_DATA_DIR``, else None (use the hub)."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return None


def label_key(value: Any) -> str:
    """Raw labels compare as lower-case strings, so ``True``, ``"true"`` and ``"True"`` are the same."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value).strip().lower()


def _file_path(spec: DataFile, data_dir: Path) -> Path:
    path = Path(spec.path).expanduser()
    return path if path.is_absolute() else data_dir / path


def _read_split(task: Task, split: str, data_dir: Path) -> list[Record]:
    spec = task.files[split]
    path = _file_path(spec, data_dir)
    if not path.is_file():
        raise DataError(
            f"task {task.name!r}: {split} file {path} not found (data dir {data_dir}); put the file there, "
            f"or point --data-dir / ${DATA_ENV} at a folder with {spec.path}"
        )
    records = read_file(path, spec)
    _check_header(task, split, spec, path, records)
    if spec.fold is not None:
        i, n = spec.fold
        records = [r for r in records if r.group % n == i]
    if spec.minus is not None:  # a multiset difference: each row of the other split removes one copy
        removed = Counter(_identity(task, r) for r in _read_split(task, spec.minus, data_dir))
        kept = []
        for record in records:
            key = _identity(task, record)
            if removed[key] > 0:
                removed[key] -= 1
            else:
                kept.append(record)
        records = kept
    return records


def _check_header(task: Task, split: str, spec: DataFile, path: Path, records: list[Record]) -> None:
    """A CSV/TSV header that lacks the task's columns is probably a first data row: say ``columns:``."""
    fmt = spec.format or path.suffix.lstrip(".")
    if spec.columns or fmt not in ("csv", "tsv") or not records or task.prepare:
        return
    header = list(records[0].data)
    missing = sorted(task.columns - set(header))
    if missing:
        raise DataError(
            f"{path}:1: the first line was read as the header ({', '.join(header)}), but task {task.name!r} "
            f"reads the column(s) {', '.join(missing)}. If the file has no header line, name its columns "
            f"with `columns: [...]` (for this file only: data: {{{split}: {{path: ..., columns: [...]}}}})"
        )


def _identity(task: Task, record: Record) -> tuple:
    """What makes two rows the same example (for ``minus``): the template's columns, whitespace-stripped
    (the rendered prompt for a task with Jinja doc templates)."""
    if task.doc is not None:
        return (task.doc.prompt(record.data, record.where),)
    return tuple(str(record.data.get(col, "")).strip() for col in task.placeholders)


def _hub_records(task: Task, split: str) -> list[Record]:
    if task.hub is None:
        raise DataError(
            f"task {task.name!r} has no Hugging Face hub source; give --data-dir (or ${DATA_ENV}) with its "
            "files"
        )
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes"} or os.environ.get(
        "HF_DATASETS_OFFLINE", "0"
    ).lower() in {"1", "true", "yes"}:
        raise DataError(
            f"task {task.name!r}: no --data-dir / ${DATA_ENV} given and the hub is offline (HF_HUB_OFFLINE); "
            "point --data-dir at a folder with the task's files"
        )
    try:
        import datasets
    except ImportError as error:
        raise DataError(
            f"task {task.name!r}: no --data-dir / ${DATA_ENV} given, and reading the Hugging Face hub needs "
            "`pip install datasets`"
        ) from error
    hub_split = task.hub.splits[split]
    where = f"hub {task.hub.path}/{task.hub.name or ''}[{hub_split}]"
    try:
        rows = datasets.load_dataset(task.hub.path, task.hub.name, split=hub_split)
    except Exception as error:  # network, missing dataset, ...: say where we looked
        raise DataError(
            f"task {task.name!r}: cannot load {where} ({error}); offline, use --data-dir"
        ) from error
    rename = task.hub.rename
    return [
        Record(f"{where} row {i}", {rename.get(k, k): v for k, v in row.items()}, i)
        for i, row in enumerate(rows)
    ]


def to_example(task: Task, record: Record, uid: str, label_values: tuple[str, ...] = ()) -> Example:
    """Fill the template of ``task`` from one record, checking columns and label values."""
    if task.doc is not None:
        return task.doc.example(uid, record.data, record.where)
    row = record.data
    if task.prepare:
        try:
            row = get_row_function(task.prepare)(dict(row))
        except (KeyError, TypeError, ValueError, AttributeError) as error:
            raise DataError(
                f"{record.where}: task {task.name!r} cannot prepare this row ({error!r})"
            ) from error
    missing = [c for c in task.placeholders if c not in row]
    if missing:
        raise DataError(
            f"{record.where}: missing column(s) {', '.join(missing)} for task {task.name!r} "
            f"(row has: {', '.join(map(str, row))})"
        )
    for column in task.placeholders:
        if isinstance(row[column], Mapping | list | tuple):
            shown = repr(row[column])
            raise DataError(
                f"{record.where}: column {column!r} holds a {type(row[column]).__name__} "
                f"({shown if len(shown) <= 60 else shown[:57] + '...'}), not text; the template can only "
                "paste text: name a row function in `prepare`, or write the task file in the lm-eval "
                "format, whose Jinja templates can pick a part ({{ column.key }})"
            )
    prompt = task.template.format(**{c: row[c] for c in task.placeholders})
    if task.is_generation:
        answers = row.get(task.target_column)
        answers = (answers,) if isinstance(answers, str) else tuple(answers or ())
        if not answers:
            raise DataError(f"{record.where}: no gold answer in column {task.target_column!r}")
        target = task.target_template.format(answer=answers[0])
        return Example(uid, prompt, (), None, answers, target, row)
    options = tuple(task.label_words or row.get(task.options_column) or ())
    label = _label_index(task, record, row, options, label_values or task.label_values)
    return Example(uid, prompt, options, label, (), "" if label is None else options[label], row)


def _label_index(
    task: Task, record: Record, row: dict, options: tuple, values: tuple[str, ...]
) -> int | None:
    if task.label_column not in row:
        raise DataError(f"{record.where}: missing label column {task.label_column!r} for task {task.name!r}")
    raw = row[task.label_column]
    if raw is None and task.options_column:
        return None  # e.g. a ReCoRD query whose answer is not among the entities
    if task.label_words:
        keys = [label_key(v) for v in values]
        if label_key(raw) not in keys:
            raise DataError(
                f"{record.where}: label {raw!r} is not one of {list(values)} (task {task.name!r})"
            )
        return keys.index(label_key(raw))
    if not options:
        raise DataError(f"{record.where}: no options in column {task.options_column!r}")
    try:
        index = int(raw)
    except (TypeError, ValueError):
        index = -1
    if not 0 <= index < len(options):
        raise DataError(
            f"{record.where}: label {raw!r} is not an index into the {len(options)} options "
            f"(task {task.name!r})"
        )
    return index


def load_split(task: Task, split: str, data_dir: str | os.PathLike | None = None) -> list[Example]:
    """All examples of one split (``train`` or ``eval``), in file order.

    Args:
        task: the task.
        split: a key of ``task.files``.
        data_dir: folder with the standard files; None -> ``$HDOPT_DATA_DIR``, else the Hugging Face hub.
    """
    if split not in task.files:
        raise DataError(f"task {task.name!r} has no {split!r} split (splits: {', '.join(task.files)})")
    folder = resolve_data_dir(data_dir)
    from_hub = folder is None and not all(Path(spec.path).is_absolute() for spec in task.files.values())
    if from_hub:
        records = _hub_records(task, split)
        values = task.hub.label_values if task.hub and task.hub.label_values else task.label_values
    else:
        records = _read_split(task, split, folder or Path("."))
        values = task.label_values
    examples = [to_example(task, r, f"{task.name}/{split}/{i}", values) for i, r in enumerate(records)]
    # ReCoRD queries whose answer is not among the passage entities cannot be scored: drop them
    examples = [e for e in examples if task.is_generation or e.label is not None]
    if not examples:
        where = f"hub {task.hub.path}" if from_hub and task.hub else task.files[split].path
        raise DataError(f"task {task.name!r}: the {split} split ({where}) has no examples")
    return examples
