"""lm-evaluation-harness task files (``task:``, ``dataset_path``, ``doc_to_text``, ...) as hdopt tasks.

The supported fields and their meaning follow the harness's task guide; local data only
(``dataset_path: json`` or ``csv`` with ``dataset_kwargs.data_files``). A field hdopt does not support
is refused by name, never ignored. Mapping onto hdopt's protocol:

- ``training_split`` -> train; ``test_split`` (else ``validation_split``) -> the evaluated split;
  ``fewshot_split`` (else the train split; with no train split, the validation split when a test split
  is evaluated) -> where ICL demonstrations come from; ``num_fewshot`` -> the default ``--num-demos``.
- ``multiple_choice`` with ``acc``: argmax of the summed log-likelihood of ``target_delimiter + choice``
  (the harness's ``acc``); ``generate_until`` with ``exact_match`` / ``f1``: greedy decoding up to
  ``generation_kwargs.until`` (default: the fewshot delimiter) and ``max_gen_toks`` (default 256),
  scored with SQuAD-normalised exact match / token F1 (hdopt's metrics: case, punctuation and articles
  ignored, unlike the harness's plain string ``exact_match``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hdopt.lm.tasks.base import DataFile, Task, TaskError
from hdopt.lm.tasks.jinja import DocTemplates, compile_check
from hdopt.lm.tasks.task_file import PythonCode, TaskFile

SUPPORTED = (
    "task", "dataset_path", "dataset_kwargs", "training_split", "validation_split", "test_split",
    "fewshot_split", "doc_to_text", "doc_to_target", "doc_to_choice", "target_delimiter",
    "fewshot_delimiter", "num_fewshot", "output_type", "generation_kwargs", "metric_list",
    "tag", "task_alias", "metadata",  # informational, as in the harness: no effect on the numbers
)  # fmt: skip
WHY_NOT = {
    "description": "a prompt prefix before the demonstrations; put its text at the start of doc_to_text",
    "process_docs": "Python code; hdopt runs none: reshape the data file, or use Jinja in doc_to_text",
    "include": "copy the included file's fields into this one",
    "dataset_name": "a Hugging Face dataset configuration; hdopt reads local files (dataset_kwargs)",
    "filter_list": "post-processing of generations; hdopt scores the greedy answer as generated",
    "repeats": "hdopt decodes greedily, once",
    "use_prompt": "promptsource prompts; write doc_to_text / doc_to_target / doc_to_choice",
}
DATASET_KWARGS = ("data_files", "delimiter", "sep", "column_names", "encoding")
GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature")
METRICS = {"multiple_choice": {"acc": "accuracy"}, "generate_until": {"exact_match": "em", "f1": "f1"}}
METRIC_KEYS = {"metric": None, "aggregation": "mean", "higher_is_better": True}  # key -> the only value
DEFAULT_MAX_GEN_TOKS = 256  # the harness's default


def is_lm_eval_file(doc: dict) -> bool:
    """A task file is in the harness's format when it has a top-level ``task`` key."""
    return "task" in doc


def _refuse_code(file: TaskFile) -> None:
    for key, value in file.doc.items():
        if isinstance(value, PythonCode):
            raise TaskError(
                f"{file.where(key)}: {key}: !function {value.name} is Python code, which hdopt does not run "
                "from task files; write it as a Jinja template"
            )


def _check_fields(file: TaskFile) -> None:
    unsupported = [k for k in file.doc if k not in SUPPORTED]
    if unsupported:
        key = unsupported[0]
        why = f" ({WHY_NOT[key]})" if key in WHY_NOT else ""
        raise TaskError(
            f"{file.where(key)}: field {key!r} is not supported by hdopt{why}; supported fields: "
            f"{', '.join(SUPPORTED)}"
        )
    _refuse_code(file)
    for key in ("task", "dataset_path", "doc_to_text", "doc_to_target"):
        if key not in file.doc:
            raise TaskError(f"{file.path}: missing required field {key!r}")


def _data_files(file: TaskFile) -> dict[str, str]:
    """``dataset_kwargs.data_files`` as split name -> path (one file per split)."""
    kwargs = file.doc.get("dataset_kwargs")
    where = file.where("dataset_kwargs")
    if not isinstance(kwargs, dict) or "data_files" not in kwargs:
        raise TaskError(f"{where}: give local files as dataset_kwargs: {{data_files: {{test: PATH, ...}}}}")
    unknown = [k for k in kwargs if k not in DATASET_KWARGS]
    if unknown:
        raise TaskError(
            f"{where}: dataset_kwargs.{unknown[0]} is not supported by hdopt; supported: "
            f"{', '.join(DATASET_KWARGS)}"
        )
    files = kwargs["data_files"]
    if isinstance(files, str | list):
        files = {"train": files}  # one file (or list): the hub's loader calls its split "train"
    if not isinstance(files, dict) or not files:
        raise TaskError(f"{where}: data_files must be a path or a mapping split -> path")
    out = {}
    for split, value in files.items():
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise TaskError(f"{where}: data_files.{split} must be one file path, not {value!r}")
        out[str(split)] = value
    return out


def _file_settings(file: TaskFile, path: str) -> dict[str, Any]:
    """DataFile settings from ``dataset_path`` and the csv options."""
    kind, kwargs = file.doc["dataset_path"], file.doc.get("dataset_kwargs", {})
    settings: dict[str, Any] = {}
    if "encoding" in kwargs:
        settings["encoding"] = str(kwargs["encoding"])
    if kind == "json":
        if any(k in kwargs for k in ("delimiter", "sep", "column_names")):
            raise TaskError(f"{file.where('dataset_kwargs')}: delimiter / column_names are csv options")
        return {**settings, "format": "jsonl" if path.endswith(".jsonl") else "json"}
    delimiter = kwargs.get("delimiter", kwargs.get("sep", ","))
    if delimiter not in (",", "\t"):
        raise TaskError(f"{file.where('dataset_kwargs')}: delimiter must be ',' or '\\t', not {delimiter!r}")
    if delimiter == "," and path.endswith(".tsv"):
        raise TaskError(
            f"{file.where('dataset_kwargs')}: {Path(path).name} would be read with ',' between columns: "
            'give dataset_kwargs.delimiter: "\\t" for a TSV file'
        )
    if "column_names" in kwargs:
        names = kwargs["column_names"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TaskError(f"{file.where('dataset_kwargs')}: column_names must be a list of names")
        settings["columns"] = tuple(names)
    return {**settings, "format": "tsv" if delimiter == "\t" else "csv", "typed": True}


def _splits(file: TaskFile) -> dict[str, DataFile]:
    doc = file.doc
    if doc["dataset_path"] not in ("json", "csv"):
        raise TaskError(
            f"{file.where('dataset_path')}: dataset_path {doc['dataset_path']!r}: hdopt reads lm-eval tasks "
            "from local files: dataset_path: json (JSON / JSON Lines) or csv (CSV / TSV) with "
            "dataset_kwargs.data_files"
        )
    files = _data_files(file)
    names = {key: doc[key] for key in ("training_split", "validation_split", "test_split", "fewshot_split")
             if doc.get(key) is not None}  # fmt: skip
    for key, name in names.items():
        if name not in files:
            raise TaskError(
                f"{file.where(key)}: {key} {name!r} is not a key of dataset_kwargs.data_files "
                f"({', '.join(files)})"
            )
    evaluated = names.get("test_split", names.get("validation_split"))
    if evaluated is None:
        raise TaskError(f"{file.path}: give test_split or validation_split: the split to evaluate")
    roles = {"eval": evaluated}
    if "training_split" in names:
        roles["train"] = names["training_split"]
    if names.get("fewshot_split", roles.get("train")) != roles.get("train"):
        roles["fewshot"] = names["fewshot_split"]
    elif "train" not in roles and "test_split" in names and "validation_split" in names:
        roles["fewshot"] = names["validation_split"]  # the harness's fallback for demonstrations
    paths = {name: file.data_path(files[name], "dataset_kwargs") for name in set(roles.values())}
    return {role: DataFile(paths[name], **_file_settings(file, paths[name])) for role, name in roles.items()}


def _metric(file: TaskFile, output_type: str) -> str:
    known = METRICS[output_type]
    entries = file.doc.get("metric_list") or [{"metric": next(iter(known))}]
    where = file.where("metric_list")
    if not isinstance(entries, list) or not all(isinstance(e, dict) and "metric" in e for e in entries):
        raise TaskError(f"{where}: metric_list must be a list of {{metric: NAME, ...}} entries")
    for entry in entries:
        if entry["metric"] not in known:
            raise TaskError(
                f"{where}: metric {entry['metric']!r} is not supported by hdopt for {output_type}; "
                f"supported: {', '.join(known)}"
            )
        for key, value in entry.items():
            if key not in METRIC_KEYS or (METRIC_KEYS[key] is not None and value != METRIC_KEYS[key]):
                raise TaskError(
                    f"{where}: metric {entry['metric']!r}: {key}: {value!r} is not supported by hdopt "
                    "(only aggregation: mean and higher_is_better: true)"
                )
    return known[entries[0]["metric"]]


def _generation(file: TaskFile, output_type: str, fewshot_delimiter: str) -> dict[str, Any]:
    kwargs = file.doc.get("generation_kwargs")
    where = file.where("generation_kwargs")
    if output_type != "generate_until":
        if kwargs is not None:
            raise TaskError(f"{where}: generation_kwargs apply to output_type: generate_until only")
        return {}
    if kwargs is None:  # the harness then stops at the fewshot delimiter
        return {"stop": (fewshot_delimiter,), "max_new_tokens": DEFAULT_MAX_GEN_TOKS}
    if not isinstance(kwargs, dict):
        raise TaskError(f"{where}: generation_kwargs must be a mapping (until, max_gen_toks, ...)")
    unknown = [k for k in kwargs if k not in GENERATION_KWARGS]
    if unknown:
        raise TaskError(
            f"{where}: generation_kwargs.{unknown[0]} is not supported by hdopt (greedy decoding); "
            f"supported: {', '.join(GENERATION_KWARGS)}"
        )
    if kwargs.get("do_sample", False) or kwargs.get("temperature", 0) != 0:
        raise TaskError(f"{where}: hdopt decodes greedily: do_sample must be false and temperature 0")
    until = kwargs.get("until", [])
    until = [until] if isinstance(until, str) else until
    if not isinstance(until, list) or not all(isinstance(u, str) and u for u in until):
        raise TaskError(f"{where}: generation_kwargs.until must be a list of non-empty strings")
    tokens = kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)
    if not isinstance(tokens, int) or tokens < 1:
        raise TaskError(f"{where}: generation_kwargs.max_gen_toks must be a positive integer")
    return {"stop": tuple(until), "max_new_tokens": tokens}


def _string(file: TaskFile, key: str, default: str) -> str:
    value = file.doc.get(key, default)
    if not isinstance(value, str):
        raise TaskError(f"{file.where(key)}: {key} must be a string, not {value!r}")
    return value


def _doc_templates(file: TaskFile, output_type: str) -> DocTemplates:
    doc = file.doc
    choice = doc.get("doc_to_choice")
    if isinstance(choice, dict):
        choice = list(choice.values())
    if isinstance(choice, list):
        if not choice or any(isinstance(c, dict | list) or c is None for c in choice):
            raise TaskError(f"{file.where('doc_to_choice')}: doc_to_choice must be a non-empty list of text")
        choice = tuple(str(c) for c in choice)
    elif choice is not None and not isinstance(choice, str):
        raise TaskError(f"{file.where('doc_to_choice')}: doc_to_choice must be a list, column or template")
    if output_type == "multiple_choice" and choice is None:
        raise TaskError(f"{file.path}: output_type multiple_choice needs doc_to_choice")
    target = doc["doc_to_target"]
    if isinstance(target, bool) or not isinstance(target, str | int):
        raise TaskError(f"{file.where('doc_to_target')}: doc_to_target must be a column, template or index")
    if not isinstance(doc["doc_to_text"], str):
        raise TaskError(f"{file.where('doc_to_text')}: doc_to_text must be a column name or a template")
    for key in ("doc_to_text", "doc_to_target", "doc_to_choice"):
        compile_check(key, doc.get(key), file.where(key))
    return DocTemplates(
        text=doc["doc_to_text"], target=target, choice=choice,
        target_delimiter=_string(file, "target_delimiter", " "), generation=output_type == "generate_until",
    )  # fmt: skip


def task_from_lm_eval(file: TaskFile) -> Task:
    """The :class:`Task` of a parsed lm-eval task file (data paths checked, templates compiled)."""
    _check_fields(file)
    doc = file.doc
    output_type = doc.get("output_type", "generate_until")  # the harness's default
    if output_type not in METRICS:
        raise TaskError(
            f"{file.where('output_type')}: output_type {output_type!r} is not supported by hdopt; supported: "
            f"{', '.join(METRICS)}"
        )
    num_fewshot = doc.get("num_fewshot")
    if num_fewshot is not None and (not isinstance(num_fewshot, int) or num_fewshot < 0):
        raise TaskError(f"{file.where('num_fewshot')}: num_fewshot must be an integer >= 0")
    fewshot_delimiter = _string(file, "fewshot_delimiter", "\n\n")
    templates = _doc_templates(file, output_type)
    choices = () if templates.generation else templates.fixed_choices
    label_words = tuple(templates.target_delimiter + c for c in choices)
    return Task(
        name=str(doc["task"]), template="", files=_splits(file), label_words=label_words,
        metric=_metric(file, output_type), description=str(doc.get("task_alias", "lm-eval task file")),
        source=str(file.path), doc=templates, demo_separator=fewshot_delimiter, num_fewshot=num_fewshot,
        option_score="sum", **_generation(file, output_type, fewshot_delimiter),
    )  # fmt: skip
