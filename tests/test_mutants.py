"""scripts/mutants.py: a mutant is applied to a temporary copy only, caught or escaped is read from the tests,
and a snippet that does not occur exactly once is refused. The real run (minutes) is not part of the suite."""

from __future__ import annotations

import importlib.util
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("mutants", ROOT / "scripts" / "mutants.py")
mutants = sys.modules["mutants"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mutants)

CALC = "def add(a, b):\n    return a + b\n\n\ndef twice(a):\n    return a + a\n"
TESTS = ("import time\n\nfrom pkg.calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n\n\n"
         "def test_hang():\n    time.sleep(60)\n")  # fmt: skip


def _tree(tmp_path: Path) -> Path:
    """A tiny repository: src/pkg/calc.py and tests/test_calc.py."""
    root = tmp_path / "repo"
    (root / "src" / "pkg").mkdir(parents=True)
    (root / "tests").mkdir()
    (root / "pytest.ini").write_text("[pytest]\n")
    (root / "src" / "pkg" / "__init__.py").write_text("")
    (root / "src" / "pkg" / "calc.py").write_text(CALC)
    (root / "tests" / "test_calc.py").write_text(TESTS)
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _mutant(original: str, replacement: str, tests=("tests/test_calc.py::test_add",), ident="unit") -> object:
    return mutants.Mutant(ident, "src/pkg/calc.py", original, replacement, "a bug", tuple(tests))


def _leftovers(ident: str) -> list[Path]:
    return list(Path(tempfile.gettempdir()).glob(f"hdopt-mutant-{ident}-*"))


def test_a_caught_and_an_escaped_mutant_leave_the_tree_as_it_was(tmp_path):
    root = _tree(tmp_path)
    before = _files(root)
    problems, baseline = mutants.run_baseline([_mutant("return a + b", "return a - b")], root, 60, "pkg")
    assert problems == [] and baseline.passed and baseline.tests == 1
    caught = _mutant("return a + b", "return a - b", ident="unit-caught")
    status, outcome = mutants.run_mutant(caught, root, 60)
    assert status == "caught" and outcome.failed == ["tests.test_calc::test_add"]
    escaped = _mutant("return a + b", "return b + a", ident="unit-escaped")
    status, outcome = mutants.run_mutant(escaped, root, 60)
    assert status == "escaped" and outcome.tests == 1 and not outcome.failed
    assert _files(root) == before
    assert not _leftovers("unit-caught") and not _leftovers("unit-escaped")


def test_a_failing_baseline_is_refused_and_a_hang_counts_as_caught(tmp_path):
    root = _tree(tmp_path)
    (root / "src" / "pkg" / "calc.py").write_text(CALC.replace("return a + b", "return a * b"))
    problems, _ = mutants.run_baseline([_mutant("return a * b", "return a - b")], root, 60, "pkg")
    assert problems == ["baseline: tests.test_calc::test_add failed"]
    outcome = mutants.run_tests(["tests/test_calc.py::test_hang"], root / "src", root, timeout=3)
    assert outcome.timed_out and outcome.seconds < 30 and mutants.outcome_status(outcome) == "caught"


@pytest.mark.parametrize("original,replacement,message", [
    ("return a * b", "return a - b", "occurs 0 times"),
    ("    return a + ", "    return a - ", "occurs 2 times"),
    ("return a + b", "return a + b", "equals the original"),
    ("return a + b", "return a +", "does not compile"),
])  # fmt: skip
def test_a_snippet_must_occur_exactly_once_and_the_mutant_must_compile(tmp_path, original, replacement,
                                                                       message):  # fmt: skip
    root = _tree(tmp_path)
    with pytest.raises(mutants.SnippetError, match=message):
        mutants.run_mutant(_mutant(original, replacement), root, 60)
    assert [message] == [message for p in mutants.check_mutants([_mutant(original, replacement)], root)
                         if message in p]  # fmt: skip
    assert (root / "src" / "pkg" / "calc.py").read_text() == CALC


def test_an_interrupt_removes_the_copy_and_leaves_the_tree_alone(tmp_path, monkeypatch):
    root = _tree(tmp_path)
    before = _files(root)

    def interrupted(tests, src, cwd, timeout, stop_at_first=True):
        assert "return a - b" in (src / "pkg" / "calc.py").read_text()  # the copy holds the mutant
        raise KeyboardInterrupt

    monkeypatch.setattr(mutants, "run_tests", interrupted)
    with pytest.raises(KeyboardInterrupt):
        mutants.run_mutant(_mutant("return a + b", "return a - b", ident="unit-interrupted"), root, 60)
    assert _files(root) == before and not _leftovers("unit-interrupted")


def test_every_mutant_applies_to_this_tree():
    """A mutant whose snippet moved fails here first: update its snippet in scripts/mutants.py."""
    assert mutants.check_mutants(mutants.MUTANTS) == []
    assert len(mutants.MUTANTS) >= 15
    assert all(t.startswith("tests/") and "::" in t for m in mutants.MUTANTS for t in m.tests)
