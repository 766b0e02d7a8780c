"""lm-evaluation-harness style doc templates: Jinja2 fields that turn a data row into an example.

Each field follows the harness's rules (its task guide, ``docs/task_guide.md``):

- ``doc_to_text``: a column name (its value is the prompt) or a Jinja template rendered with the row;
- ``doc_to_choice``: a list of choices, a column holding a list, or a template that renders a Python
  list literal (``"{{choices.text}}"``);
- ``doc_to_target``: an int (a fixed choice index), a column name, or a template; a rendered target
  made of digits is an index into the choices, one that renders ``[...]`` a list of answers.

A multiple-choice example scores ``target_delimiter + choice`` after the prompt; a generation example's
teacher-forced continuation (and ICL demonstration) is ``target_delimiter + answer``. Templates run in
Jinja's sandbox with undefined names as errors, the trailing newline kept, and the harness's
``regex_replace`` filter. A dict or list pasted into the prompt is an error, never its Python repr.
"""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jinja2
from jinja2 import meta
from jinja2.sandbox import SandboxedEnvironment

from hdopt.lm.tasks.base import DataError, Example, TaskError


class _NotText(Exception):
    """Raised inside a ``doc_to_text`` render when a field holds a mapping or list."""

    def __init__(self, value: Any):
        super().__init__(value)
        self.value = value


def _regex_replace(text: str, pattern: str, repl: str, count: int = 0) -> str:
    return re.sub(pattern, repl, text, count=count)


def _text_only(value: Any) -> Any:
    if isinstance(value, Mapping | list | tuple):
        raise _NotText(value)
    return value


def _environment(text: bool) -> SandboxedEnvironment:
    env = SandboxedEnvironment(
        undefined=jinja2.StrictUndefined, keep_trailing_newline=True, finalize=_text_only if text else None
    )
    env.filters["regex_replace"] = _regex_replace
    return env


TEXT_ENV, VALUE_ENV = _environment(text=True), _environment(text=False)


@functools.lru_cache(maxsize=256)
def _compiled(source: str, text: bool) -> jinja2.Template:
    return (TEXT_ENV if text else VALUE_ENV).from_string(source)


def compile_check(field: str, source: Any, where: str) -> None:
    """Raise :class:`TaskError` (naming ``where`` and the field) if ``source`` is not a valid template."""
    if not isinstance(source, str):
        return
    try:
        _compiled(source, field == "doc_to_text")
    except jinja2.TemplateSyntaxError as error:
        raise TaskError(
            f"{where}: {field}: bad Jinja template ({error.message}, template line {error.lineno})"
        ) from error
    except jinja2.TemplateError as error:
        raise TaskError(f"{where}: {field}: bad Jinja template ({error})") from error


def template_columns(source: Any, bare_name_is_column: bool = True) -> frozenset[str]:
    """The names a template reads from the row (a bare name is a column, unless it is meant as text)."""
    if not isinstance(source, str):
        return frozenset()
    if source.isidentifier():
        return frozenset({source}) if bare_name_is_column else frozenset()
    return frozenset(meta.find_undeclared_variables(VALUE_ENV.parse(source)))


@dataclass(frozen=True)
class DocTemplates:
    """The harness's doc_to_text / doc_to_choice / doc_to_target fields of one task.

    Args:
        text: ``doc_to_text``.
        target: ``doc_to_target`` (an int index, a column name or a template).
        choice: ``doc_to_choice`` (a tuple of choices, a column name or a template); None: no choices.
        target_delimiter: put between the prompt and a choice or answer (the harness's default " ").
        generation: ``output_type: generate_until`` (else ``multiple_choice``).
    """

    text: str
    target: str | int
    choice: str | tuple[str, ...] | None = None
    target_delimiter: str = " "
    generation: bool = False

    @property
    def columns(self) -> frozenset[str]:
        """Row columns the templates read (a bare word as doc_to_text may be literal text: not counted)."""
        text = template_columns(self.text, bare_name_is_column=False)
        return text | template_columns(self.target) | template_columns(self.choice)

    @property
    def fixed_choices(self) -> tuple[str, ...]:
        """The choices when they are the same for every row (a list in the file), else ()."""
        return self.choice if isinstance(self.choice, tuple) else ()

    def example(self, uid: str, row: Mapping, where: str) -> Example:
        """The example of one row: prompt, options (delimiter + choice) and gold index, or gold answers."""
        prompt = self.prompt(row, where)
        choices = self.choices(row, where)
        gold = self.gold(row, where, choices)
        if self.generation:
            answers = self.answers(gold, choices, where)
            return Example(uid, prompt, (), None, answers, self.target_delimiter + answers[0], dict(row))
        options = tuple(self.target_delimiter + c for c in choices)
        label = self.label(gold, choices, where)
        return Example(uid, prompt, options, label, (), options[label], dict(row))

    def _render(self, field: str, source: str, row: Mapping, where: str) -> str:
        try:
            return _compiled(source, field == "doc_to_text").render(**row)
        except _NotText as bad:
            shown = repr(bad.value)
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise DataError(
                f"{where}: {field}: a field holds a {type(bad.value).__name__} ({shown}), not text; "
                "pick the part the prompt needs (e.g. {{ column.key }} or {{ column[0] }})"
            ) from None
        except jinja2.TemplateError as error:
            raise DataError(f"{where}: {field}: {error} (row has: {', '.join(map(str, row))})") from error

    def prompt(self, row: Mapping, where: str) -> str:
        if self.text in row:
            value = row[self.text]
            if not isinstance(value, str):
                raise DataError(f"{where}: doc_to_text: column {self.text!r} holds {value!r}, not text")
            return value
        return self._render("doc_to_text", self.text, row, where)

    def choices(self, row: Mapping, where: str) -> tuple[str, ...]:
        if self.choice is None:
            return ()
        if isinstance(self.choice, tuple):
            value: Any = self.choice
        elif self.choice in row:
            value = row[self.choice]
        else:
            rendered = self._render("doc_to_choice", self.choice, row, where)
            try:
                value = ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                raise DataError(
                    f"{where}: doc_to_choice rendered {rendered[:80]!r}, not a Python list of choices"
                ) from None
        if isinstance(value, Mapping):
            value = list(value.values())
        if not isinstance(value, list | tuple) or not value:
            raise DataError(f"{where}: doc_to_choice gave {value!r}; it must be a non-empty list of choices")
        if any(isinstance(v, Mapping | list | tuple) or v is None for v in value):
            raise DataError(f"{where}: doc_to_choice gave {value!r}; every choice must be text")
        return tuple(str(v) for v in value)

    def gold(self, row: Mapping, where: str, choices: tuple[str, ...]) -> Any:
        """The raw target: an int index, a string, or a list (several gold answers)."""
        if isinstance(self.target, int):
            return self.target
        if self.target in row:
            return row[self.target]
        rendered = self._render("doc_to_target", self.target, row, where)
        if rendered.isdigit() and choices:
            return int(rendered)
        if len(rendered) >= 2 and rendered[0] == "[" and rendered[-1] == "]":
            try:
                return ast.literal_eval(rendered)
            except (SyntaxError, ValueError):
                return rendered
        return rendered

    def label(self, gold: Any, choices: tuple[str, ...], where: str) -> int:
        """The gold choice's index (an int target is an index, a string target a choice's text)."""
        if isinstance(gold, bool | int):
            if 0 <= int(gold) < len(choices):
                return int(gold)
            raise DataError(
                f"{where}: doc_to_target {gold!r} is not an index into the {len(choices)} choices"
            )
        if isinstance(gold, str):
            if gold in choices:
                return choices.index(gold)
            raise DataError(f"{where}: doc_to_target {gold!r} is not one of the choices {list(choices)}")
        raise DataError(
            f"{where}: doc_to_target gave {gold!r}; a multiple-choice target must be one index or one choice "
            "(several gold choices are not supported)"
        )

    def answers(self, gold: Any, choices: tuple[str, ...], where: str) -> tuple[str, ...]:
        """A generation task's gold answers."""
        if choices:
            return (choices[self.label(gold, choices, where)],)
        if isinstance(gold, list | tuple):
            answers = tuple(str(a) for a in gold)
        else:
            answers = () if gold is None else (str(gold),)
        if not answers:
            raise DataError(f"{where}: doc_to_target gave no gold answer")
        return answers
