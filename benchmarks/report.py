"""Keep a report's section results and print docs/report.md's measured table from them.

    PYTHONPATH=src python -m hdopt report --scale quick --out report --fresh
    PYTHONPATH=src python benchmarks/report.py keep report  # cache/*.json -> benchmarks/results/report_quick
    PYTHONPATH=src python benchmarks/report.py table        # the Markdown table of docs/report.md

Each cached section (``report/cache/SECTION.json``) holds every claim with its measured numbers, verdict,
rule and command; scripts/check_docs.py checks docs/report.md's table against these files.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from hdopt.report import SECTION_KEYS, Section

ROOT = Path(__file__).resolve().parents[1]
KEPT = ROOT / "benchmarks" / "results" / "report_quick"


def keep(report: Path) -> None:
    KEPT.mkdir(parents=True, exist_ok=True)
    for key in SECTION_KEYS:
        shutil.copyfile(report / "cache" / f"{key}.json", KEPT / f"{key}.json")
    print(f"kept {len(SECTION_KEYS)} sections in {KEPT}")


def sections() -> list[Section]:
    return [Section.from_json(json.loads((KEPT / f"{key}.json").read_text())) for key in SECTION_KEYS]


def table() -> str:
    lines = ["| claim | measured | verdict |", "|---|---|---|"]
    for section in sections():
        for claim in section.claims:
            cells = [claim.title, claim.measured, claim.verdict]
            lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    done = sections()
    verdicts = [c.verdict for s in done for c in s.claims]
    counts = ", ".join(f"{verdicts.count(v)} {v}" for v in dict.fromkeys(verdicts))
    seconds = ", ".join(f"{s.title} {s.seconds:.0f} s" for s in done)
    lines.append(f"\n{counts}. Section times: {seconds}; {sum(s.seconds for s in done):.0f} s in all.")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("keep").add_argument("report", type=Path, help="the report folder (--out of hdopt report)")
    sub.add_parser("table")
    args = parser.parse_args()
    if args.part == "keep":
        keep(args.report)
    else:
        print(table())


if __name__ == "__main__":
    main()
