"""The few data files the TinT experiments read (SST-2, MR, CR, SQuAD paragraphs), from a local folder.

Splits: SST-2 reports on GLUE dev (dev.tsv) and draws demonstrations and the lr-selection split from
train.tsv; MR and CR report on the LM-BFF test split (test.csv) and draw the rest from all.txt minus test.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

DATA_ENV = "HDOPT_DATA_DIR"
DEFAULT_DATA = Path("..") / "shared" / "data"  # the project's data folder, next to a checkout
TASKS = ("sst2", "mr", "cr")

Example = tuple[str, int]  # (sentence, label 0 = negative / 1 = positive)


def data_root(root: str | os.PathLike | None = None) -> Path:
    path = Path(root or os.environ.get(DATA_ENV) or DEFAULT_DATA)
    if not path.is_dir():
        raise FileNotFoundError(
            f"data folder {path.resolve()} not found: pass --data-dir or set ${DATA_ENV} to a folder holding "
            f"{', '.join(TASKS)} (LM-BFF / GLUE files) and squad/dev.json"
        )
    return path


def _need(path: Path) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"missing data file {path}")
    return path


def _read_tsv(path: Path) -> list[Example]:
    with open(_need(path), encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [(s.strip(), int(y)) for s, y in rows[1:]]


def _read_label_first(path: Path) -> list[Example]:
    with open(_need(path), encoding="latin-1") as f:
        return [(line[2:].strip(), int(line[0])) for line in f if line.strip()]


def _read_csv(path: Path) -> list[Example]:
    with open(_need(path), encoding="utf-8", newline="") as f:
        return [(s.strip(), int(y)) for y, s in csv.reader(f)]


def load_sentiment(task: str, root: str | os.PathLike | None = None) -> tuple[list[Example], list[Example]]:
    """(pool, reported) examples of a binary sentiment task; the pool never overlaps the reported split."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {TASKS}")
    folder = data_root(root) / task
    if task == "sst2":
        return _read_tsv(folder / "train.tsv"), _read_tsv(folder / "dev.tsv")
    test = _read_csv(folder / "test.csv")
    seen = {s for s, _ in test}
    return [e for e in _read_label_first(folder / "all.txt") if e[0] not in seen], test


def squad_paragraphs(root: str | os.PathLike | None = None) -> list[str]:
    """Unique SQuAD v1.1 dev paragraphs, in file order."""
    with open(_need(data_root(root) / "squad" / "dev.json"), encoding="utf-8") as f:
        data = json.load(f)["data"]
    out, seen = [], set()
    for article in data:
        for para in article["paragraphs"]:
            if para["context"] not in seen:
                seen.add(para["context"])
                out.append(para["context"])
    return out
