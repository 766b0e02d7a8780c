"""scripts/check_docs.py: a documented number that its declared results file does not contain is reported."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("check_docs", ROOT / "scripts" / "check_docs.py")
check_docs = sys.modules["check_docs"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_docs)

RESULTS = {"checks": [{"name": "norm ratio (eta/lambda x16)", "predicted": 2.0, "measured": 1.9903,
                       "tolerance": "within 15%"}],
           "timing": {"step_s": 0.03712, "share": 0.9406, "bytes": 2678824}, "other": {"x": 7.77}}


def _doc(tmp_path: Path, table: str, name: str = "docs/zo.md") -> list[str]:
    (tmp_path / "docs").mkdir(exist_ok=True)
    (tmp_path / "r.json").write_text(json.dumps(RESULTS))
    (tmp_path / "t.md").write_text("| a | 1.25 | 3e-05 |\n")
    (tmp_path / name).write_text(f"# Title\n\nSome text 12345.\n\n{table}\n\nMore text.\n")
    return check_docs.check(tmp_path, [name])


GOOD = """<!-- source: r.json#checks,timing -->
| check | predicted | measured | tolerance |
|---|---|---|---|
| norm ratio (eta/lambda x16) | 2 | **1.99** | within 15% |
| step | 37.1 ms | 94.1% | 2.68 MB, 2,678.8 kB |"""


def test_numbers_from_the_source_pass_in_their_shown_precision_and_units(tmp_path):
    assert _doc(tmp_path, GOOD) == []


@pytest.mark.parametrize("wrong, right", [
    ("**1.99**", "**1.98**"),        # a measured value off by one in the last shown digit
    ("37.1 ms", "37.2 ms"),          # a unit-scaled value
    ("94.1%", "95%"),                # a percentage
    ("2.68 MB", "2.6 MB"),           # truncated instead of rounded
    ("within 15%", "within 16%"),    # a number inside a string of the source
])  # fmt: skip
def test_a_number_the_source_does_not_contain_fails(tmp_path, wrong, right):
    problems = _doc(tmp_path, GOOD.replace(wrong, right))
    line = 8 if wrong in GOOD.split("\n")[3] else 9
    assert len(problems) == 1 and problems[0].startswith(f"docs/zo.md:{line}: "), problems


def test_the_key_restricts_the_numbers(tmp_path):
    table = GOOD.replace("| 2 |", "| 7.77 |")
    assert len(_doc(tmp_path, table)) == 1  # 7.77 is in the file, but not under checks or timing
    assert _doc(tmp_path, table.replace("#checks,timing", "#checks,timing,other")) == []
    assert "has no key" in _doc(tmp_path, table.replace("#checks,timing", "#nope"))[0]


def test_names_are_not_numbers_and_given_numbers_are_allowed(tmp_path):
    table = """<!-- source: t.md given:42 -->
| model | value |
|---|---|
| SmolLM2 on SST-2, fp32, 2-core CPU, x16 | 1.25 (3e-05), paper 42 |"""
    assert _doc(tmp_path, table) == []
    assert len(_doc(tmp_path, table.replace("given:42", ""))) == 1


def test_rows_can_name_their_own_sources(tmp_path):
    table = """<!-- source:
step | r.json#timing
norm | r.json#checks
-->
| row | value |
|---|---|
| step time | 37.1 ms |
| norm ratio | 1.99 |
| other | 3 |"""
    problems = _doc(tmp_path, table)
    assert problems == ["docs/zo.md:13: row 'other' matches no source line"]
    wrong = _doc(tmp_path, table.replace("37.1 ms", "1.99"))  # 1.99 is a checks number, not a timing one
    assert wrong[0] == "docs/zo.md:11: 1.99 (in '1.99') is not in its source"


def test_covered_files_need_a_declaration_and_others_do_not(tmp_path):
    table = "| a | b |\n|---|---|\n| 1 | 2 |"
    assert _doc(tmp_path, "```markdown\n" + table + "\n```") == []  # an example in a code block
    assert "without a <!-- source" in _doc(tmp_path, table)[0]
    assert _doc(tmp_path, table, "docs/other.md") == []
    assert _doc(tmp_path, "<!-- source: none (an API table) -->\n" + table) == []
    assert "does not exist" in _doc(tmp_path, "<!-- source: missing.json -->\n" + table)[0]


def test_the_repository_docs_pass():
    assert check_docs.check(ROOT) == []
