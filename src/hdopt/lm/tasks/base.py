"""Task records and the task registry.

A task is data: where its rows come from, how a row becomes template fields (an optional named row
function), the prompt template, and either the candidates (label words, or a per-example list of options)
or a generation target. The model sees ``prompt + option`` for every option and picks the option with
the highest mean per-token log-likelihood; a generation task is scored by greedy decoding.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from hdopt.registry import Registry

if TYPE_CHECKING:
    from hdopt.lm.tasks.jinja import DocTemplates

METRICS = ("accuracy", "f1", "em")
OPTION_SCORES = ("mean", "sum")
SPLITS = ("train", "eval", "fewshot")


class TaskError(ValueError):
    """A task name or definition is wrong; the message says what is valid."""


class DataError(ValueError):
    """A data file is missing or malformed; the message names the file and line."""


class TaskWarning(UserWarning):
    """Something about a task or its data that is allowed but probably not meant (shared prompts, ...)."""


@dataclass(frozen=True)
class DataFile:
    """One split's file, relative to the data directory.

    Args:
        path: e.g. ``"sst2/dev.tsv"``.
        format: ``jsonl``, ``tsv``, ``csv``, ``label_text`` (``label sentence`` per line), ``squad``
            (SQuAD v1.1 JSON) or ``multirc``/``record`` (SuperGLUE nested JSONL); default: from the suffix.
        columns: column names for header-less CSV/TSV/label_text files.
        encoding: text encoding of the file.
        minus: another split whose rows are removed from this one (MR/CR train = all minus test).
        fold: ``(i, n)`` keeps the rows of every n-th group starting at i (a disjoint split of one file;
            a group is an article for SQuAD, else a row).
        typed: CSV/TSV cells of a column that are all integers (or all numbers) become ints (floats), as
            the Hugging Face ``csv`` loader reads them (lm-eval task files).
    """

    path: str
    format: str = ""
    columns: tuple[str, ...] = ()
    encoding: str = "utf-8"
    minus: str | None = None
    fold: tuple[int, int] | None = None
    typed: bool = False


@dataclass(frozen=True)
class HubSource:
    """Where the Hugging Face ``datasets`` hub has the task (used when no data directory is given)."""

    path: str
    name: str | None = None
    splits: Mapping[str, str] = field(default_factory=lambda: {"train": "train", "eval": "validation"})
    label_values: tuple[str, ...] = ()  # hub label values in the order of the task's label words
    rename: Mapping[str, str] = field(default_factory=dict)  # hub column -> the task's column


@dataclass(frozen=True)
class Task:
    """A prompt-based task.

    Args:
        name: registry key (lower case).
        template: prompt text with ``{field}`` placeholders filled from the (prepared) row.
        files: split name (``train``/``eval``) -> :class:`DataFile`.
        label_words: the same options for every example, appended to the prompt as is (mind the spaces).
        label_column / label_values: the row column holding the gold label, and its raw values in the
            order of ``label_words`` (or of ``options_column``'s list when it is an index).
        options_column: a column holding a per-example list of options (COPA, ReCoRD).
        target_column: generation tasks: a column holding the gold answers (a string or a list).
        target_template: the teacher-forced continuation built from ``{answer}`` (the first gold answer).
        prepare: name of a registered row function (see :mod:`hdopt.lm.tasks.rows`) run before the template.
        metric: ``accuracy`` or ``f1`` (SQuAD-style token F1, with exact match reported too).
        num_dev: dev examples of the sampling protocol (100 for CB and COPA, else 500).
        hub: the Hugging Face ``datasets`` source, if any.
        source: where the task was defined (``builtin`` or a file path), for messages.
        doc: lm-eval style Jinja fields (doc_to_text / doc_to_choice / doc_to_target) that build the
            examples instead of ``template`` and the label fields (see :mod:`hdopt.lm.tasks.jinja`);
            ``label_words`` then holds the fixed choices, if any, for reporting and probes.
        demo_separator: text between ICL demonstrations and before the test prompt.
        num_fewshot: ICL demonstrations when the run does not say (None: the evaluation's default).
        option_score: ``mean`` (per-token mean log-likelihood, MeZO) or ``sum`` (lm-eval's ``acc``).
        stop: generation ends at the first of these strings (and at EOS).
        max_new_tokens: generation length when the run does not say (None: the evaluation's default).
    """

    name: str
    template: str
    files: Mapping[str, DataFile]
    label_words: tuple[str, ...] = ()
    label_column: str | None = None
    label_values: tuple[str, ...] = ()
    options_column: str | None = None
    target_column: str | None = None
    target_template: str = " {answer}\n"
    prepare: str | None = None
    metric: str = "accuracy"
    num_dev: int = 500
    hub: HubSource | None = None
    description: str = ""
    source: str = "builtin"
    doc: DocTemplates | None = None
    demo_separator: str = "\n\n"
    num_fewshot: int | None = None
    option_score: str = "mean"
    stop: tuple[str, ...] = ("\n",)
    max_new_tokens: int | None = None

    def __post_init__(self) -> None:
        where = f"task {self.name!r} ({self.source})"
        if self.doc is None:
            self._check_label_fields(where)
        repeated = sorted({w for w in self.label_words if self.label_words.count(w) > 1})
        if repeated:
            raise TaskError(
                f"{where}: two classes share the label word(s) {', '.join(map(repr, repeated))}; the model "
                "could not tell them apart: give every class its own word"
            )
        if self.metric not in METRICS:
            raise TaskError(f"{where}: unknown metric {self.metric!r}; choose one of {', '.join(METRICS)}")
        if self.option_score not in OPTION_SCORES:
            raise TaskError(f"{where}: option_score must be one of {', '.join(OPTION_SCORES)}")
        if "eval" not in self.files:
            raise TaskError(f"{where}: files must name an 'eval' split (and usually 'train')")
        for name, spec in self.files.items():
            if name not in SPLITS:
                raise TaskError(f"{where}: unknown split {name!r}; splits: {', '.join(SPLITS)}")
            if spec.minus is not None and (spec.minus not in self.files or spec.minus == name):
                raise TaskError(f"{where}: split {name!r} subtracts unknown split {spec.minus!r}")
        try:
            placeholders = [f for _, f, _, _ in string.Formatter().parse(self.template) if f is not None]
        except ValueError as error:
            raise TaskError(f"{where}: bad template {self.template!r}: {error}") from error
        if any(not p.isidentifier() for p in placeholders):
            raise TaskError(f"{where}: template placeholders must be plain column names: {self.template!r}")

    def _check_label_fields(self, where: str) -> None:
        kinds = [bool(self.label_words), self.options_column is not None, self.target_column is not None]
        if sum(kinds) != 1:
            raise TaskError(f"{where}: give exactly one of label_words, options_column or target_column")
        if self.label_words and len(self.label_values) != len(self.label_words):
            raise TaskError(
                f"{where}: label_values {list(self.label_values)} must list one raw label per label word "
                f"{list(self.label_words)}"
            )
        if (self.label_words or self.options_column) and not self.label_column:
            raise TaskError(f"{where}: a classification task needs label_column")

    @property
    def is_generation(self) -> bool:
        if self.doc is not None:
            return self.doc.generation
        return self.target_column is not None

    @property
    def placeholders(self) -> tuple[str, ...]:
        return tuple(f for _, f, _, _ in string.Formatter().parse(self.template) if f)

    @property
    def columns(self) -> frozenset[str]:
        """The row columns the task reads (before ``prepare``, which may create some of them)."""
        if self.doc is not None:
            return self.doc.columns
        named = (self.label_column, self.options_column, self.target_column)
        return frozenset(self.placeholders) | {c for c in named if c}


@dataclass(frozen=True)
class Example:
    """One rendered-ready example.

    ``prompt`` is the text before the candidate; ``options`` the candidates (empty for generation);
    ``label`` the index of the gold option; ``answers`` the gold answers of a generation task;
    ``target`` the teacher-forced continuation (gold option text, or the rendered target template).
    """

    uid: str
    prompt: str
    options: tuple[str, ...]
    label: int | None
    answers: tuple[str, ...] = ()
    target: str = ""
    fields: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def demonstration(self) -> str:
        """The example as an in-context demonstration: prompt followed by its gold continuation."""
        return self.prompt + self.target


TASKS: Registry[Task] = Registry("task", error=TaskError, listing="built-in tasks:", case_sensitive=False,
                                 hint=" (or pass a task file: path/to/task.yaml or .json)",
                                 origin=lambda task: task.source)  # fmt: skip


def register_task(task: Task) -> Task:
    """Add a task to the registry; a name (case-insensitive) can be registered only once."""
    return TASKS.register(task.name, task)


def unregister_task(name: str) -> None:
    """Remove a task (tests and interactive use)."""
    TASKS.unregister(name)


def get_task(name: str) -> Task:
    """The registered task called ``name`` (case-insensitive)."""
    return TASKS.get(name)


def list_tasks() -> list[str]:
    """Names of the registered tasks, sorted."""
    return sorted(TASKS)
