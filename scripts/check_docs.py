"""Every number in a documented results table must be in the results file the table names.

A table declares its source in an HTML comment right above it (blank lines may separate them)::

    <!-- source: benchmarks/results/lab/eos/results.json#checks -->
    | check | predicted | measured | ... |

or, when rows come from different files, one line per row (the row's first cell starts with ROW)::

    <!-- source:
    a ZO step costs | benchmarks/results/zo_step.json#timing,memory
    exact restore | benchmarks/results/zo_restore.json
    * | benchmarks/results/other.json
    -->

A source is a space-separated list of

* ``PATH`` or ``PATH#KEY[,KEY...]``: a results file (relative to the repository root; a ``*`` in PATH takes
  every file it matches). JSON files give every number under the dotted keys (``*`` matches every list item
  or dict value; no key: the whole file), numbers inside strings and dict keys included; other files
  (Markdown tables written by a benchmark) give every number in their text;
* ``given:N[,N...]``: numbers the text states rather than measures (a paper's figure, a setting);
* ``none``: the rows are not measurements (an API table, formulas); say why after it.

A documented number matches when the source number, rounded to the digits the document shows, is the
documented number; a unit after the number scales it (``%``: x100 or as is, ``ms``: x1000,
``kB``/``MB``/``GB``/``k``/``M``: /1e3../1e6, ``KiB``/``MiB``/``GiB``: /1024.. or as is, ``min``/``h``:
seconds /60, /3600 or as is; in a range ``a-b%`` the unit applies to both ends). Signs are ignored. Digits
inside names (SmolLM2, fp32, SST-2, 2-core) are not numbers. In the files of ``COVERED`` every table needs a
declaration; elsewhere only declared tables are checked.

    python scripts/check_docs.py            # exit 1 and one line per unmatched number (file:line)
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COVERED = ("README.md", "docs/dynamics.md", "docs/report.md", "docs/distributed.md", "docs/zo.md")
COMMENT = re.compile(r"<!--\s*source:(.*?)-->", re.S)
NUMBER = re.compile(r"\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?")
UNIT = re.compile(r"\s?(%|ms|kB|MB|GB|KiB|MiB|GiB|B|x|k|M|s|min|h)(?![A-Za-z])")
RANGE_END = re.compile(r"[-–]\d[\d,]*(?:\.\d+)?(%|x|ms|kB|MB|GB|MiB)")
SCALES = {"%": (100.0, 1.0), "ms": (1e3, 1.0), "kB": (1e-3,), "MB": (1e-6,), "GB": (1e-9,), "k": (1e-3,),
          "M": (1e-6,), "KiB": (2**-10, 1.0), "MiB": (2**-20, 1.0), "GiB": (2**-30, 1.0),
          "min": (1 / 60, 1.0), "h": (1 / 3600, 1.0)}


@dataclass(frozen=True)
class Number:
    """A number as written: its value, the size of its last shown digit, and the unit after it."""

    value: float
    unit_of_last_digit: float
    unit: str = ""


def numbers_in(text: str) -> list[Number]:
    """The numbers in ``text``, skipping digits that are part of a name (SmolLM2, fp32, SST-2, x16)."""
    found = []
    for match in NUMBER.finditer(text):
        start, end = match.span()
        before = text[start - 1] if start else " "
        if before.isalpha() or before in "_." or (before == "-" and start > 1 and text[start - 2].isalnum()):
            continue
        after = text[end:]
        unit = UNIT.match(after)
        rest = after[unit.end():] if unit else after
        if (not unit and rest[:1].isalpha()) or rest[:1] == "_" or (rest[:1] == "-" and rest[1:2].isalpha()):
            continue  # 2-core, 135M-parameter words, 3rd
        range_end = None if unit else RANGE_END.match(after)  # 94.1-94.3%: the unit is written once
        raw = match.group().replace(",", "")
        mantissa, _, exponent = raw.lower().partition("e")
        decimals = len(mantissa.partition(".")[2])
        try:
            value = float(raw)
        except ValueError:  # "1,2" left over from a list without spaces
            continue
        shown_unit = unit.group(1) if unit else range_end.group(1) if range_end else ""
        found.append(Number(value, 10.0 ** (int(exponent or 0) - decimals), shown_unit))
    return found


def _select(doc, keys: list[str]):
    """The parts of a JSON document at the dotted ``keys`` (``*``: every item)."""
    if not keys:
        yield doc
        return
    head, rest = keys[0], keys[1:]
    if head == "*":
        items = doc.values() if isinstance(doc, dict) else doc if isinstance(doc, list) else []
        for item in items:
            yield from _select(item, rest)
    elif isinstance(doc, dict) and head in doc:
        yield from _select(doc[head], rest)
    elif isinstance(doc, list) and head.isdigit() and int(head) < len(doc):
        yield from _select(doc[int(head)], rest)
    else:
        raise KeyError(head)


def _leaves(doc) -> list[float]:
    if isinstance(doc, bool) or doc is None:
        return []
    if isinstance(doc, (int, float)):
        return [float(doc)] if math.isfinite(doc) else []
    if isinstance(doc, str):
        return [n.value for n in numbers_in(doc)]
    if isinstance(doc, dict):
        return [v for k, item in doc.items() for v in _leaves(str(k)) + _leaves(item)]
    if isinstance(doc, list):
        return [v for item in doc for v in _leaves(item)]
    return []


class SourceError(ValueError):
    """A declaration names a file or key that is not there, or is malformed."""


def source_values(spec: str, root: Path) -> list[float] | None:
    """The numbers a source spec provides (None for ``none``)."""
    values: list[float] = []
    for item in spec.split():
        if item == "none":
            return None
        if item.startswith("given:"):
            values += [float(x) for x in item[len("given:"):].split(",") if x]
            continue
        if item.startswith("("):
            break  # a reason in parentheses ends the list
        path_text, _, keys = item.partition("#")
        paths = sorted(root.glob(path_text)) if "*" in path_text else [root / path_text]
        if not paths or not all(p.is_file() for p in paths):
            raise SourceError(f"source {path_text} does not exist")
        for path in paths:
            values += _file_values(path, keys, path_text)
    return values


def _file_values(path: Path, keys: str, shown: str) -> list[float]:
    if path.suffix != ".json":
        return [n.value for n in numbers_in(path.read_text(encoding="utf-8"))]
    doc, values = json.loads(path.read_text(encoding="utf-8")), []
    for key in keys.split(",") if keys else [""]:
        try:
            parts = list(_select(doc, [k for k in key.split(".") if k]))
        except KeyError as err:
            raise SourceError(f"{shown} has no key {key!r} (missing {err})") from None
        values += [v for part in parts for v in _leaves(part)]
    return values


def matches(number: Number, values: list[float]) -> bool:
    """Whether some source value, rounded to the number's last digit (after its unit's scale), is it."""
    target = abs(number.value)
    slack = number.unit_of_last_digit * (0.5 + 1e-9) + 1e-12 * target
    factors = SCALES.get(number.unit, (1.0,))
    return any(abs(abs(v) * f - target) <= slack for v in values for f in factors)


@dataclass
class Table:
    """A Markdown table: its first line number, its rows (cells), and the declaration above it."""

    line: int
    rows: list[tuple[int, list[str]]]
    declaration: str | None


def tables_in(text: str) -> list[Table]:
    """The tables of a Markdown file with the ``source`` comment right above each (or None)."""
    lines = text.split("\n")
    out, i, fenced = [], 0, False
    while i < len(lines):
        if lines[i].lstrip().startswith("```"):
            fenced = not fenced
        if fenced or not lines[i].lstrip().startswith("|"):
            i += 1
            continue
        start = i
        while i < len(lines) and lines[i].lstrip().startswith("|"):
            i += 1
        above = "\n".join(lines[:start]).rstrip()
        declared = COMMENT.search(above[above.rfind("<!--"):]) if above.endswith("-->") else None
        rows = [(n + 1, _cells(lines[n])) for n in range(start + 2, i)]  # header and separator skipped
        out.append(Table(start + 1, rows, declared.group(1).strip() if declared else None))
    return out


def _cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip().strip("|"))
    return [c.strip() for c in cells]


def row_specs(declaration: str) -> list[tuple[str, str]]:
    """``[(row prefix, spec)]``; prefix ``*`` for every row."""
    lines = [ln.strip() for ln in declaration.split("\n") if ln.strip()]
    if len(lines) == 1 and "|" not in lines[0]:
        return [("*", lines[0])]
    specs = []
    for ln in lines:
        prefix, bar, spec = ln.rpartition("|")
        if not bar:
            raise SourceError(f"expected 'ROW PREFIX | SPEC' in a multi-line source, got {ln!r}")
        specs.append((prefix.strip(), spec.strip()))
    return specs


def check_file(path: Path, root: Path, covered: bool) -> list[str]:
    """Problems in one Markdown file, as ``file:line: message`` strings."""
    rel = path.relative_to(root).as_posix()
    problems = []
    for table in tables_in(path.read_text(encoding="utf-8")):
        if table.declaration is None:
            if covered:
                problems.append(f"{rel}:{table.line}: table without a <!-- source: ... --> declaration")
            continue
        try:
            specs = [(prefix, source_values(spec, root)) for prefix, spec in row_specs(table.declaration)]
        except (SourceError, json.JSONDecodeError, ValueError) as err:
            problems.append(f"{rel}:{table.line}: {err}")
            continue
        for line, cells in table.rows:
            label = re.sub(r"[*`]", "", cells[0])
            chosen = [v for prefix, v in specs if prefix == "*" or label.startswith(prefix)]
            if not chosen:
                problems.append(f"{rel}:{line}: row {label!r} matches no source line")
                continue
            if any(v is None for v in chosen):
                continue
            values = [x for v in chosen for x in v]
            for cell in cells:
                for number in numbers_in(cell):
                    if not matches(number, values):
                        shown = f"{number.value:g}{number.unit}"
                        problems.append(f"{rel}:{line}: {shown} (in {cell[:60]!r}) is not in its source")
    return problems


def check(root: Path, files: list[str] | None = None) -> list[str]:
    """Problems in README.md and docs/*.md (or ``files``) under ``root``."""
    docs = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    paths = [root / f for f in files] if files else docs
    problems = []
    for path in paths:
        if path.is_file():
            problems += check_file(path, root, path.relative_to(root).as_posix() in COVERED)
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="*", help="Markdown files relative to --root (default: README, docs)")
    parser.add_argument("--root", type=Path, default=ROOT)
    args = parser.parse_args(argv)
    problems = check(args.root.resolve(), args.files)
    for problem in problems:
        print(problem)
    if problems:
        print(f"{len(problems)} problem(s): each documented number must be in the results file its table "
              "declares (scripts/check_docs.py says how)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
