"""What a report is made of: sections of claims, each with the paper's number, ours and a verdict.

Everything here is plain data that round-trips through JSON, so a section computed once is cached on disk
and re-rendered without running again.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from hdopt.dynamics.results import Check, finite

REPRODUCED, PARTLY, NOT_REPRODUCED = "reproduced", "partly reproduced", "not reproduced"
VERDICTS = (REPRODUCED, PARTLY, NOT_REPRODUCED)


@dataclass
class Table:
    """A small table: a header row and rows of already formatted cells."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(row) + " |" for row in self.rows]
        return "\n".join(lines)


@dataclass
class Claim:
    """One claim of the talk as checked on this machine.

    Attributes:
        title: a short name.
        claim: the statement, in one or two sentences.
        paper: the paper's number(s), with the setting they were measured in.
        measured: our number(s) at this scale.
        verdict: one of :data:`VERDICTS`.
        why: the rule the verdict applied (thresholds), so a reader can disagree with it.
        command: the exact command that reproduces the measurement.
        tables: supporting tables.
        plots: PNG files, relative to the report folder.
    """

    title: str
    claim: str
    paper: str
    measured: str
    verdict: str
    why: str
    command: str
    tables: list[Table] = field(default_factory=list)
    plots: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


@dataclass
class Section:
    """One part of the talk: its claims, how long it took, and the settings it ran with."""

    key: str
    title: str
    intro: str
    claims: list[Claim]
    scale: str
    settings: dict[str, Any]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Section:
        claims = [Claim(**{**c, "tables": [Table(**t) for t in c.get("tables", [])]}) for c in doc["claims"]]
        return cls(**{**doc, "claims": claims})


def verdict_from(ok: bool, partly: bool = False, numbers: Iterable[object] = ()) -> str:
    """``reproduced`` when ``ok``, else ``partly reproduced`` when ``partly``, else ``not reproduced``.

    ``numbers`` are the measurements the rule read: when any of them is NaN, infinite or missing, the verdict
    is ``not reproduced`` whatever ``ok`` and ``partly`` say (a comparison with NaN proves nothing).
    """
    if not all(finite(x) for x in numbers):
        return NOT_REPRODUCED
    return REPRODUCED if ok else PARTLY if partly else NOT_REPRODUCED


def verdict_of_checks(checks: Sequence[Check]) -> str:
    """The verdict of a list of predicted-vs-measured checks: ``reproduced`` when every check passed,
    ``partly reproduced`` when some did, ``not reproduced`` when none did, when there are none, or when a
    measured or predicted number is NaN/inf."""
    passed = [c.passed for c in checks]
    numbers = [c.measured for c in checks] + [c.predicted for c in checks if not isinstance(c.predicted, str)]
    return verdict_from(bool(passed) and all(passed), any(passed), numbers)


def fmt(x: float | None, digits: int = 3) -> str:
    """A number for a table cell: ``-`` for None, 3 significant digits, scientific when tiny or huge."""
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e5:
        return f"{x:.{digits}g}"
    return f"{x:.1e}"
