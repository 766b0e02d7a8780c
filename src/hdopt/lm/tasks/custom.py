"""Custom tasks from a YAML or JSON file, without code: hdopt's own format, or an lm-eval task file.

hdopt's format (``reviews.yaml``; paths are relative to the task file and stay inside its folder)::

    name: reviews
    data: {train: train.csv, eval: test.csv}     # or one file: every other row is train / eval
    template: "Review: {text}\\nSentiment:"
    label_column: stars
    label_words: {"1": " bad", "5": " good"}     # raw label -> word (or a list plus label_values)

A split may be a mapping with its own settings (``{path: all.txt, format: label_text, encoding: latin-1,
minus: eval}``; ``minus: eval`` = this file without the eval split's rows). A generation task gives
``target_column`` (and optionally ``target_template``, default ``" {answer}\\n"``) instead of label words;
``metric: f1`` scores it with SQuAD-style F1. A file with a top-level ``task:`` key is read as an
lm-evaluation-harness task file (:mod:`hdopt.lm.tasks.lm_eval`).
"""

from __future__ import annotations

import codecs
import dataclasses
from pathlib import Path
from typing import Any

from hdopt.lm.tasks.base import DataFile, Task, TaskError, get_task
from hdopt.lm.tasks.lm_eval import is_lm_eval_file, task_from_lm_eval
from hdopt.lm.tasks.readers import READERS
from hdopt.lm.tasks.rows import get_row_function
from hdopt.lm.tasks.task_file import TaskFile, allow_outside_default, read_task_file

TASK_KEYS = {
    "name", "description", "data", "format", "columns", "encoding", "template", "label_column", "label_words",
    "label_values", "options_column", "target_column", "target_template", "prepare", "metric", "num_dev",
}  # fmt: skip
FILE_KEYS = ("path", "format", "encoding", "columns", "minus")  # per-file settings of a split
TASK_FIELDS = ("template", "label_column", "options_column", "target_column", "target_template", "prepare")
TASK_FIELDS += ("metric", "num_dev", "description")  # copied as they are onto the Task record
TASK_SUFFIXES = (".yaml", ".yml", ".json")


def _settings(values: dict, where: str) -> dict[str, Any]:
    """Validated DataFile settings (format, encoding, columns, minus) from a mapping."""
    out: dict[str, Any] = {}
    if "format" in values:
        if values["format"] not in READERS:
            raise TaskError(f"{where}: unknown format {values['format']!r}; formats: {', '.join(READERS)}")
        out["format"] = values["format"]
    if "encoding" in values:
        try:
            codecs.lookup(str(values["encoding"]))
        except LookupError:
            raise TaskError(f"{where}: unknown encoding {values['encoding']!r} (utf-8, latin-1...)") from None
        out["encoding"] = str(values["encoding"])
    if "columns" in values:
        columns = values["columns"]
        if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
            raise TaskError(f"{where}: columns must be a list of column names, e.g. [label, text]")
        out["columns"] = tuple(columns)
    if "minus" in values:
        out["minus"] = str(values["minus"])
    return out


def _file_spec(file: TaskFile, split: str, value: Any, common: dict[str, Any]) -> DataFile:
    where = file.where("data")
    if isinstance(value, str):
        value = {"path": value}
    if not isinstance(value, dict) or "path" not in value:
        raise TaskError(
            f"{where}: data.{split} must be a file path or a mapping with 'path' (and optionally "
            f"{', '.join(FILE_KEYS[1:])}), not {value!r}"
        )
    unknown = sorted(set(value) - set(FILE_KEYS))
    if unknown:
        raise TaskError(
            f"{where}: data.{split}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(FILE_KEYS)}"
        )
    settings = {**common, **_settings(value, f"{where}: data.{split}")}
    return DataFile(file.data_path(value["path"], "data"), **settings)


def _data_files(file: TaskFile) -> dict[str, DataFile]:
    common = _settings(file.doc, file.where("data"))
    data = file.doc.get("data")
    if isinstance(data, str):
        path = file.data_path(data, "data")
        return {"train": DataFile(path, fold=(0, 2), **common), "eval": DataFile(path, fold=(1, 2), **common)}
    if isinstance(data, dict) and "eval" in data and set(data) <= {"train", "eval"}:
        files = {split: _file_spec(file, split, value, common) for split, value in data.items()}
        for split, spec in files.items():
            if spec.minus is not None and (spec.minus not in files or spec.minus == split):
                raise TaskError(
                    f"{file.where('data')}: data.{split}: minus must name the other split (e.g. minus: eval "
                    f"for train = this file without the eval rows), not {spec.minus!r}"
                )
        return files
    raise TaskError(
        f"{file.where('data')}: 'data' must be a file path or a mapping {{train: PATH, eval: PATH}} (a split "
        "may be a mapping {path: PATH, format: ..., encoding: ..., columns: [...], minus: eval})"
    )


def _label_fields(doc: dict, where) -> dict[str, Any]:
    words = doc.get("label_words")
    if words is None:
        return {}
    if isinstance(words, dict):
        return {"label_values": tuple(str(k) for k in words), "label_words": tuple(map(str, words.values()))}
    if isinstance(words, list) and "label_values" in doc:
        return {
            "label_words": tuple(map(str, words)),
            "label_values": tuple(str(v) for v in doc["label_values"]),
        }
    raise TaskError(
        f"{where('label_words')}: label_words must map raw label -> word, or be a list with label_values"
    )


def _native_task(file: TaskFile) -> Task:
    doc, where = file.doc, file.where
    unknown = sorted(set(doc) - TASK_KEYS)
    if unknown:
        raise TaskError(
            f"{where(unknown[0])}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TASK_KEYS))}"
        )
    for key in ("name", "data", "template"):
        if key not in doc:
            raise TaskError(f"{file.path}: missing required key {key!r}")
    if doc.get("prepare"):
        try:
            get_row_function(doc["prepare"])
        except TaskError as error:
            raise TaskError(f"{where('prepare')}: {error}") from error
    fields = {k: doc[k] for k in TASK_FIELDS if k in doc}
    try:
        return Task(
            name=str(doc["name"]).lower(),
            files=_data_files(file),
            source=str(file.path),
            **fields,
            **_label_fields(doc, where),
        )
    except TypeError as error:
        raise TaskError(f"{file.path}: {error}") from error


def load_task_file(path: str | Path, allow_outside: bool | None = None) -> Task:
    """Read a task definition (hdopt's YAML/JSON format, or an lm-eval YAML with a ``task:`` key).

    Args:
        path: the task file; its data paths are relative to it.
        allow_outside: let data paths leave the task file's folder (None: ``$HDOPT_ALLOW_OUTSIDE_DATA``).

    Errors name the file and, for YAML, the line.
    """
    allow = allow_outside_default() if allow_outside is None else allow_outside
    file = read_task_file(path, allow)
    return task_from_lm_eval(file) if is_lm_eval_file(file.doc) else _native_task(file)


def resolve_task(name_or_path: str, allow_outside: bool | None = None) -> Task:
    """A registered task by name, or a task file (``.yaml``/``.yml``/``.json``)."""
    if name_or_path.lower().endswith(TASK_SUFFIXES) or Path(name_or_path).is_file():
        return load_task_file(name_or_path, allow_outside)
    return get_task(name_or_path)


def with_overrides(task: Task, **changes: Any) -> Task:
    """A copy of ``task`` with some fields replaced (e.g. another template), validated again."""
    return dataclasses.replace(task, **changes)
