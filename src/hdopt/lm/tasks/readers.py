"""Readers for the standard data file formats; every record remembers its file and line for error messages.

Nested formats are flattened into the column names the Hugging Face ``datasets`` hub uses for the same
task, so one row function serves both sources.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hdopt.lm.tasks.base import DataError, DataFile

csv.field_size_limit(1 << 24)  # SQuAD-size passages in CSV files


@dataclass(frozen=True)
class Record:
    """One row of a data file: ``where`` is ``path:line`` (or a JSON path); ``group`` an article id."""

    where: str
    data: dict[str, Any]
    group: int


def _lines(path: Path, encoding: str) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding=encoding, newline="") as handle:
            yield from enumerate(handle, start=1)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: cannot decode as {encoding} ({error}); set the file's encoding") from error


def read_jsonl(path: Path, spec: DataFile) -> list[Record]:
    records = []
    for line_no, line in _lines(path, spec.encoding):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{line_no}: invalid JSON ({error.msg})") from error
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected a JSON object per line, got {type(row).__name__}")
        records.append(Record(f"{path}:{line_no}", row, len(records)))
    return records


def _read_delimited(path: Path, spec: DataFile, delimiter: str) -> list[Record]:
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL  # GLUE TSVs contain bare quotes
    with open(path, encoding=spec.encoding, newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        columns = list(spec.columns)
        records = []
        try:
            for row in reader:
                if not columns:
                    columns = _header(path, [c.strip() for c in row])
                    continue
                if not records and [c.strip() for c in row] == columns:
                    raise DataError(
                        f"{path}:{reader.line_num}: this line repeats the column names {columns}: the file "
                        "has a header line, so drop `columns:` for this file"
                    )
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) != len(columns):
                    raise DataError(
                        f"{path}:{reader.line_num}: expected {len(columns)} columns ({', '.join(columns)}), "
                        f"found {len(row)}"
                    )
                records.append(
                    Record(f"{path}:{reader.line_num}", dict(zip(columns, row, strict=True)), len(records))
                )
        except (csv.Error, UnicodeDecodeError) as error:
            raise DataError(f"{path}:{reader.line_num}: unreadable row ({error})") from error
    return _typed(records) if spec.typed else records


def _header(path: Path, names: list[str]) -> list[str]:
    """The first line as column names; empty or repeated names mean it is probably data."""
    repeated = sorted({n for n in names if names.count(n) > 1})
    if "" in names or repeated:
        problem = "an empty column name" if "" in names else f"the repeated name(s) {', '.join(repeated)}"
        raise DataError(
            f"{path}:1: the first line is read as the header but has {problem}; if the file has no header "
            "line, name its columns with `columns: [...]`"
        )
    return names


def _typed(records: list[Record]) -> list[Record]:
    """Columns whose cells are all integers become ints, all numbers floats (as the hub's csv loader)."""
    if not records:
        return records
    converted: dict[str, Any] = {}
    for column in records[0].data:
        cells = [r.data[column] for r in records]
        for kind in (int, float):
            try:
                converted[column] = [kind(c) for c in cells]
                break
            except ValueError:
                continue
    return [
        Record(r.where, {k: converted[k][i] if k in converted else v for k, v in r.data.items()}, r.group)
        for i, r in enumerate(records)
    ]


def read_tsv(path: Path, spec: DataFile) -> list[Record]:
    return _read_delimited(path, spec, "\t")


def read_csv(path: Path, spec: DataFile) -> list[Record]:
    return _read_delimited(path, spec, ",")


def read_label_text(path: Path, spec: DataFile) -> list[Record]:
    """``label sentence`` per line (the raw SST/MR/CR files)."""
    label_col, text_col = spec.columns or ("label", "sentence")
    records = []
    for line_no, line in _lines(path, spec.encoding):
        if not line.strip():
            continue
        label, _, text = line.strip().partition(" ")  # a bare label is an empty text (CR has one)
        records.append(Record(f"{path}:{line_no}", {label_col: label, text_col: text}, len(records)))
    return records


def _load_json(path: Path, spec: DataFile) -> Any:
    try:
        return json.loads(path.read_text(encoding=spec.encoding))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}:{error.lineno}: invalid JSON ({error.msg})") from error


def read_json(path: Path, spec: DataFile) -> list[Record]:
    """A JSON array of objects (one record each), or JSON Lines (as the hub's ``json`` loader reads both)."""
    try:
        doc = json.loads(path.read_text(encoding=spec.encoding))
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: cannot decode as {spec.encoding} ({error}); set its encoding") from error
    except json.JSONDecodeError:
        return read_jsonl(path, spec)  # several documents: JSON Lines
    if isinstance(doc, dict):
        return [Record(f"{path}:1", doc, 0)]  # JSON Lines with one line
    if not isinstance(doc, list) or not all(isinstance(row, dict) for row in doc):
        raise DataError(f"{path}: expected a JSON array of objects (or one object per line)")
    return [Record(f"{path}: [{i}]", row, i) for i, row in enumerate(doc)]


def read_squad(path: Path, spec: DataFile) -> list[Record]:
    """SQuAD v1.1 JSON -> one record per question (id, title, context, question, answers); group = article."""
    doc = _load_json(path, spec)
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise DataError(f"{path}: not SQuAD JSON (expected a top-level object with a 'data' list)")
    records = []
    for a, article in enumerate(doc["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            for q, qa in enumerate(paragraph.get("qas", [])):
                where = f"{path}: data[{a}].paragraphs[{p}].qas[{q}]"
                answers = [ans["text"] for ans in qa.get("answers", [])]
                if "question" not in qa or not answers:
                    raise DataError(f"{where}: a question needs 'question' and at least one answer")
                row = {
                    "id": qa.get("id", ""),
                    "title": article.get("title", ""),
                    "context": paragraph["context"],
                    "question": qa["question"],
                    "answers": answers,
                }
                records.append(Record(where, row, a))
    return records


def read_multirc(path: Path, spec: DataFile) -> list[Record]:
    """SuperGLUE MultiRC JSONL (one paragraph per line) -> one record per (question, answer)."""
    records = []
    for par in read_jsonl(path, spec):
        try:
            text, questions = par.data["passage"]["text"], par.data["passage"]["questions"]
            for question in questions:
                for answer in question["answers"]:
                    row = {
                        "paragraph": text,
                        "question": question["question"],
                        "answer": answer["text"],
                        "label": answer.get("label"),
                    }
                    records.append(Record(par.where, row, par.group))
        except (KeyError, TypeError) as error:
            raise DataError(f"{par.where}: not SuperGLUE MultiRC (missing {error})") from error
    return records


def read_record(path: Path, spec: DataFile) -> list[Record]:
    """SuperGLUE ReCoRD JSONL -> one record per query (passage, query, entities, answers)."""
    records = []
    for item in read_jsonl(path, spec):
        try:
            text = item.data["passage"]["text"]
            spans = item.data["passage"]["entities"]
            entities = list(dict.fromkeys(text[e["start"] : e["end"] + 1] for e in spans))
            for qa in item.data["qas"]:
                answers = [a["text"] for a in qa.get("answers", [])]
                row = {"passage": text, "query": qa["query"], "entities": entities, "answers": answers}
                records.append(Record(item.where, row, item.group))
        except (KeyError, TypeError) as error:
            raise DataError(f"{item.where}: not SuperGLUE ReCoRD (missing {error})") from error
    return records


READERS: dict[str, Callable[[Path, DataFile], list[Record]]] = {
    "jsonl": read_jsonl,
    "json": read_json,
    "tsv": read_tsv,
    "csv": read_csv,
    "label_text": read_label_text,
    "squad": read_squad,
    "multirc": read_multirc,
    "record": read_record,
}
SUFFIX_FORMATS = {".jsonl": "jsonl", ".tsv": "tsv", ".csv": "csv", ".txt": "label_text", ".json": "squad"}


def read_file(path: Path, spec: DataFile) -> list[Record]:
    """Read ``path`` with the reader named by ``spec.format`` (or guessed from the suffix)."""
    fmt = spec.format or SUFFIX_FORMATS.get(path.suffix, "")
    if fmt not in READERS:
        raise DataError(
            f"{path}: unknown data format {fmt or path.suffix!r}; give `format:` one of {', '.join(READERS)}"
        )
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    try:
        return READERS[fmt](path, spec)
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: cannot decode as {spec.encoding} ({error}); set its encoding") from error
    except OSError as error:
        raise DataError(f"{path}: cannot read the file ({error.strerror or error})") from error
