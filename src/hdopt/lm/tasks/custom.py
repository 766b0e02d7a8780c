"""Custom tasks from a YAML or JSON file, without code.

Example (``reviews.yaml``; paths are relative to the task file)::

    name: reviews
    data: {train: train.csv, eval: test.csv}     # or one file: every other row is train / eval
    template: "Review: {text}\\nSentiment:"
    label_column: stars
    label_words: {"1": " bad", "5": " good"}     # raw label -> word (or a list plus label_values)

A generation task gives ``target_column`` (and optionally ``target_template``, default ``" {answer}\\n"``)
instead of label words; ``metric: f1`` scores it with SQuAD-style F1.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from hdopt.lm.tasks.base import DataFile, Task, TaskError, get_task
from hdopt.lm.tasks.rows import get_row_function

TASK_KEYS = {
    "name", "description", "data", "format", "columns", "encoding", "template", "label_column", "label_words",
    "label_values", "options_column", "target_column", "target_template", "prepare", "metric", "num_dev",
}  # fmt: skip
TASK_FIELDS = ("template", "label_column", "options_column", "target_column", "target_template", "prepare")
TASK_FIELDS += ("metric", "num_dev", "description")  # copied as they are onto the Task record
TASK_SUFFIXES = (".yaml", ".yml", ".json")


def _key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key of a YAML document, for error messages."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def _parse(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    text = path.read_text(encoding="utf-8")
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except json.JSONDecodeError as error:
        raise TaskError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TaskError(f"{path}{line}: invalid YAML ({getattr(error, 'problem', error)})") from error
    if not isinstance(doc, dict):
        raise TaskError(f"{path}: a task file must hold a mapping of keys (name, data, template, ...)")
    return doc, ({} if path.suffix == ".json" else _key_lines(text))


def _data_files(doc: dict, folder: Path, where) -> dict[str, DataFile]:
    common = {k: doc[k] for k in ("format", "encoding") if k in doc}
    if "columns" in doc:
        common["columns"] = tuple(doc["columns"])
    data = doc.get("data")
    if isinstance(data, str):
        path = str((folder / data).resolve())
        return {"train": DataFile(path, fold=(0, 2), **common), "eval": DataFile(path, fold=(1, 2), **common)}
    if isinstance(data, dict) and "eval" in data and set(data) <= {"train", "eval"}:
        return {split: DataFile(str((folder / p).resolve()), **common) for split, p in data.items()}
    raise TaskError(f"{where('data')}: 'data' must be a file path or a mapping {{train: PATH, eval: PATH}}")


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


def load_task_file(path: str | Path) -> Task:
    """Read a task definition (YAML or JSON); errors name the file and, for YAML, the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    doc, lines = _parse(path)

    def where(key: str) -> str:
        return f"{path}:{lines[key]}" if key in lines else str(path)

    unknown = sorted(set(doc) - TASK_KEYS)
    if unknown:
        raise TaskError(
            f"{where(unknown[0])}: unknown key(s) {', '.join(unknown)}; valid: {', '.join(sorted(TASK_KEYS))}"
        )
    for key in ("name", "data", "template"):
        if key not in doc:
            raise TaskError(f"{path}: missing required key {key!r}")
    if doc.get("prepare"):
        try:
            get_row_function(doc["prepare"])
        except TaskError as error:
            raise TaskError(f"{where('prepare')}: {error}") from error
    fields = {k: doc[k] for k in TASK_FIELDS if k in doc}
    try:
        return Task(
            name=str(doc["name"]).lower(),
            files=_data_files(doc, path.parent, where),
            source=str(path),
            **fields,
            **_label_fields(doc, where),
        )
    except TypeError as error:
        raise TaskError(f"{path}: {error}") from error


def resolve_task(name_or_path: str) -> Task:
    """A registered task by name, or a task file (``.yaml``/``.yml``/``.json``)."""
    if name_or_path.lower().endswith(TASK_SUFFIXES) or Path(name_or_path).is_file():
        return load_task_file(name_or_path)
    return get_task(name_or_path)


def with_overrides(task: Task, **changes: Any) -> Task:
    """A copy of ``task`` with some fields replaced (e.g. another template), validated again."""
    return dataclasses.replace(task, **changes)
