"""Named row functions: the small pieces of logic a task needs before its template is filled.

A task names one of these in ``Task.prepare``; each takes a row (a dict of columns) and returns a new dict
with the fields the template uses. They are registered by name so task files can refer to them too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from hdopt.lm.tasks.base import TaskError
from hdopt.registry import Registry

Row = dict[str, Any]
ROW_FUNCTIONS: Registry[Callable[[Row], Row]] = Registry("row function", error=TaskError, listing="known:")


def row_function(fn: Callable[[Row], Row]) -> Callable[[Row], Row]:
    """Register ``fn`` under its name; names are unique."""
    return ROW_FUNCTIONS.register(fn.__name__, fn)


def get_row_function(name: str) -> Callable[[Row], Row]:
    """The row function called ``name``; an unknown name raises :class:`TaskError` listing the known ones."""
    return ROW_FUNCTIONS.get(name)


def lower_first_word(text: str) -> str:
    """Lower-case the first word unless it is "I" (COPA candidates continue a sentence)."""
    first, sep, rest = text.partition(" ")
    return (first if first == "I" else first.lower()) + sep + rest


@row_function
def strip_text(row: Row) -> Row:
    """Strip surrounding whitespace from every string column (GLUE sentences end with a space)."""
    return {k: v.strip() if isinstance(v, str) else v for k, v in row.items()}


@row_function
def ptb_brackets(row: Row) -> Row:
    """Strip strings and turn the PTB tokens ``-lrb-``/``-rrb-`` into brackets (LM-BFF's SST-5 text)."""
    out = strip_text(row)
    for k, v in out.items():
        if isinstance(v, str):
            out[k] = v.replace("-lrb-", "(").replace("-rrb-", ")")
    return out


@row_function
def boolq(row: Row) -> Row:
    """Capitalise the question and end it with "?" (MeZO's BoolQ format)."""
    question = row["question"].strip()
    question = question[:1].upper() + question[1:]
    if not question.endswith("?"):
        question += "?"
    return {**row, "question": question}


@row_function
def wsc(row: Row) -> Row:
    """Expose the spans as ``span1`` and lower-cased ``span2`` (JSONL nests them under ``target``)."""
    spans = row.get("target", row)
    return {**row, "span1": spans["span1_text"], "span2": spans["span2_text"].lower()}


@row_function
def copa(row: Row) -> Row:
    """Premise without its final period, the connector ("so" for effect, "because" for cause) and the
    two choices as continuations (a leading space, first word lower-cased unless "I")."""
    premise = row["premise"].rstrip()
    if premise.endswith("."):
        premise = premise[:-1]
    connectors = {"effect": "so", "cause": "because"}
    if row["question"] not in connectors:
        raise ValueError(f"question must be 'effect' or 'cause', not {row['question']!r}")
    options = [" " + lower_first_word(row["choice1"]), " " + lower_first_word(row["choice2"])]
    return {**row, "premise": premise, "connector": connectors[row["question"]], "options": options}


@row_function
def record(row: Row) -> Row:
    """``@highlight`` lines become ``- `` bullets; each entity fills the query's ``@placeholder``."""
    passage = row["passage"].replace("@highlight\n", "- ")
    entities = list(row["entities"])
    options = [" " + row["query"].replace("@placeholder", entity) for entity in entities]
    gold = [i for i, entity in enumerate(entities) if entity in row["answers"]]
    return {**row, "passage": passage, "options": options, "label": gold[0] if gold else None}


@row_function
def squad(row: Row) -> Row:
    """Strip the question; answers as a list of strings (the hub nests them as ``{"text": [...]}``)."""
    answers = row["answers"]["text"] if isinstance(row["answers"], dict) else row["answers"]
    return {**row, "question": row["question"].strip(), "answers": list(answers)}


@row_function
def drop(row: Row) -> Row:
    """DROP from the hub: the gold answers are ``answers_spans["spans"]``."""
    answers = row.get("answers") or row["answers_spans"]["spans"]
    return {**row, "question": row["question"].strip(), "answers": list(answers)}
