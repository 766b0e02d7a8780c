"""``hdopt compare RUN_DIR...``: a Markdown table of fine-tuning (and evaluation) runs.

Every run's files are verified first: results.json must be a JSON object, and the weight and trajectory files
must match their checksums; a damaged file is named and the exit status is 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdopt.finetune import rundir
from hdopt.finetune.checkpoint import verify

COLUMNS = ("run", "method", "model", "task", "metric", "dev", "test", "steps", "forwards", "wall time",
           "peak memory", "status")  # fmt: skip


def _fmt(value, digits: int = 2) -> str:
    if value is None or value == "":
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _duration(seconds) -> str:
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool):
        return "-"
    minutes, secs = divmod(int(round(seconds)), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def row(folder: Path) -> dict:
    """One table row from a run folder's results.json (finetune or eval runs)."""
    path = folder / rundir.RESULTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: {folder} is not a finished run (resume it first?)")
    r = rundir.read_json(path)
    verify_files(folder)
    metric = r.get("metric", "accuracy")
    test = r.get("test", r.get(metric))  # eval runs store the metric under its own name
    memory = r.get("peak_memory_mib")
    memory = memory if isinstance(memory, (int, float)) and not isinstance(memory, bool) else None
    method = str(r.get("method", "-")) + (" (LP init)" if r.get("lp_init") else "")
    return {
        "run": folder.name, "method": method, "model": r.get("model", "-"),
        "task": r.get("task", "-"), "metric": metric, "dev": _fmt(r.get("best_dev")), "test": _fmt(test),
        "steps": _fmt(r.get("steps")), "forwards": _fmt(r.get("forwards")),
        "wall time": _duration(r.get("wall_seconds", r.get("seconds"))),
        "peak memory": f"{memory:.0f} MiB" if memory else "-", "status": r.get("status", "completed"),
    }  # fmt: skip


def verify_files(folder: Path) -> None:
    """Check every weight file and the trajectory of a run folder against its checksum (names the damaged)."""
    for name in (rundir.CHECKPOINT, rundir.BEST, rundir.INITIAL, rundir.LP_HEAD):
        if (folder / name).is_file():
            verify(folder / name)
    if (folder / rundir.TRAJECTORY).is_file():
        rundir.load_trajectory(folder / rundir.TRAJECTORY)


def markdown_table(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(str(r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = "Print a Markdown table of runs: method, metric, steps, wall time, peak memory."
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (with results.json)")
    parser.add_argument("--sort", choices=("test", "dev", "method"), help="sort rows by this column")


def run(args: argparse.Namespace) -> int:
    try:
        rows = [row(Path(p)) for p in args.runs]
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    if args.sort:
        numeric = args.sort in ("test", "dev")
        missing = float("inf")
        if numeric:
            rows.sort(key=lambda r: -float(r[args.sort]) if r[args.sort] != "-" else missing)
        else:
            rows.sort(key=lambda r: str(r[args.sort]))
    print(markdown_table(rows))
    return 0
