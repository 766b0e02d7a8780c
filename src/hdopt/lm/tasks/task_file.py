"""Reading a task file (YAML or JSON): the parsed mapping, the line of each key, and its data paths.

A task file's data paths are relative to the file and must stay inside its folder (after following
symbolic links), so a task file from elsewhere cannot make hdopt read, and echo in an error, a file
outside it. ``allow_outside=True`` (``--allow-outside-data``, or ``HDOPT_ALLOW_OUTSIDE_DATA=1`` for any
command) lifts that.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from hdopt.lm.tasks.base import TaskError

ALLOW_OUTSIDE_ENV = "HDOPT_ALLOW_OUTSIDE_DATA"


@dataclass(frozen=True)
class PythonCode:
    """A ``!function module.name`` value (the harness runs it; hdopt refuses it by name)."""

    name: str


class _Loader(yaml.SafeLoader):
    """Safe YAML that reads the harness's ``!function`` tag as a :class:`PythonCode` marker."""


_Loader.add_constructor("!function", lambda loader, node: PythonCode(loader.construct_scalar(node)))


@dataclass(frozen=True)
class TaskFile:
    """A parsed task file: its path, its top-level mapping, and the line of each top-level key."""

    path: Path
    doc: dict[str, Any]
    lines: dict[str, int]
    allow_outside: bool = False

    def where(self, key: str | None = None) -> str:
        """``path:line`` of ``key`` (the path alone when the line is unknown), for messages."""
        return f"{self.path}:{self.lines[key]}" if key in self.lines else str(self.path)

    def data_path(self, relative: Any, key: str) -> str:
        """The absolute path of a data file named in the file under ``key``; refuses leaving the folder."""
        if not isinstance(relative, str) or not relative.strip():
            raise TaskError(f"{self.where(key)}: {key}: a data file must be a path, not {relative!r}")
        folder = self.path.parent.resolve()
        path = (folder / Path(relative).expanduser()).resolve()
        if not self.allow_outside and not path.is_relative_to(folder):
            raise TaskError(
                f"{self.where(key)}: data file {relative!r} is outside the task file's folder {folder}; "
                f"move the data into that folder, or allow it with {ALLOW_OUTSIDE_ENV}=1 (hdopt eval, "
                "hdopt finetune and hdopt tasks check: --allow-outside-data)"
            )
        return str(path)


def allow_outside_default() -> bool:
    """True when ``$HDOPT_ALLOW_OUTSIDE_DATA`` says so (1/true/yes)."""
    return os.environ.get(ALLOW_OUTSIDE_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def _key_lines(text: str) -> dict[str, int]:
    """Line (1-based) of each top-level key of a YAML document, for error messages."""
    try:
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError:
        return {}
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {k.value: k.start_mark.line + 1 for k, _ in node.value if isinstance(k, yaml.ScalarNode)}


def read_task_file(path: str | Path, allow_outside: bool = False) -> TaskFile:
    """Parse a task file; errors name the file and, for YAML, the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise TaskError(f"task file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise TaskError(f"{path}: a task file must be UTF-8 text ({error})") from error
    except OSError as error:
        raise TaskError(f"{path}: cannot read the task file ({error.strerror or error})") from error
    try:
        doc = json.loads(text) if path.suffix == ".json" else yaml.load(text, Loader=_Loader)
    except json.JSONDecodeError as error:
        raise TaskError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise TaskError(f"{path}{line}: invalid YAML ({getattr(error, 'problem', error)})") from error
    if not isinstance(doc, dict):
        raise TaskError(f"{path}: a task file must hold a mapping of keys (name, data, template, ...)")
    return TaskFile(path, doc, {} if path.suffix == ".json" else _key_lines(text), allow_outside)
