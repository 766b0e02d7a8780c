"""The implicit-bias lab at its documented scale: run the experiments, keep their results, print the tables.

    PYTHONPATH=src python benchmarks/lab.py run [NAME ...] [--scale default]
    PYTHONPATH=src python benchmarks/lab.py tables [NAME ...]
    PYTHONPATH=src python benchmarks/lab.py environments

``run`` runs ``hdopt lab NAME`` on one thread (what the CLI and the report use) for equilibrium, explr, sde,
eos and mirror (default: all five), writes benchmarks/results/lab/NAME/{results,config}.json and moves the
plot to docs/img/dynamics_NAME.png. ``tables`` prints each experiment's predicted-vs-measured table as
docs/dynamics.md shows it; scripts/check_docs.py checks that every number of those tables is in the results
file. Local SGD has its own benchmark (benchmarks/distributed.py lab).

The figures are bitwise repeatable for one seed, one torch version, one thread count and one CPU vector
instruction set (results.json records all three under ``environment``); change one and the long trainings
drift apart like runs with another seed. ``environments`` shows it: the report's quick equilibrium run
(3,750 steps) in fresh processes, twice on one thread, on two threads, and with ATen's kernels held to AVX2
(``ATEN_CPU_CAPABILITY=avx2``), saved to benchmarks/results/lab/equilibrium_environments.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from hdopt.dynamics.registry import get
from hdopt.report.lab import QUICK_OVERRIDES

ROOT = Path(__file__).resolve().parents[1]
LAB = ROOT / "benchmarks" / "results" / "lab"
IMG = ROOT / "docs" / "img"
NAMES = ("equilibrium", "explr", "sde", "eos", "mirror")


def run(names: list[str], scale: str) -> None:
    torch.set_num_threads(1)
    for name in names:
        experiment = get(name)
        result = experiment.run(experiment.config(scale), LAB / name)
        IMG.mkdir(parents=True, exist_ok=True)
        shutil.move(result.plot, IMG / f"dynamics_{name}.png")
        print(result.verdict())
        print(f"{name}: {result.runtime_s:.0f} s wall, {result.cpu_s:.0f} s CPU -> {LAB / name}", flush=True)


ENVIRONMENTS = (("1 thread", 1, None), ("1 thread, again", 1, None), ("2 threads", 2, None),
                ("1 thread, AVX2 kernels", 1, "avx2"))


def environments() -> None:
    """The report's quick equilibrium run in a fresh process per environment; figures and whether they are
    bitwise those of the first run."""
    overrides = [f"{k}={v}" for k, v in QUICK_OVERRIDES["equilibrium"].items()]
    runs = []
    for label, threads, isa in ENVIRONMENTS:
        # passive waiting: on a shared machine spinning OpenMP threads only burn the other thread's time
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_WAIT_POLICY": "PASSIVE",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        env.pop("ATEN_CPU_CAPABILITY", None)
        if isa:
            env["ATEN_CPU_CAPABILITY"] = isa
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "hdopt", "lab", "equilibrium", "--scale", "default",
                   "--set", *overrides, "--threads", str(threads), "--out", out]
            subprocess.run(cmd, env=env, check=False, capture_output=True, timeout=3600)
            saved = json.loads((Path(out) / "results.json").read_text())
        figures = {"checks": saved["checks"], "curves": saved["curves"]}
        runs.append({"label": label, "environment": saved["environment"], "passed": saved["passed"],
                     "measured": {c["name"]: c["measured"] for c in saved["checks"]},
                     "bitwise_as_first": figures == runs[0]["figures"] if runs else True, "figures": figures})
        print(label, saved["environment"], runs[-1]["measured"], runs[-1]["bitwise_as_first"], flush=True)
    for r in runs:
        del r["figures"]
    command = "hdopt lab equilibrium --scale default --set " + " ".join(overrides)
    path = LAB / "equilibrium_environments.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"command": command, "runs": runs}, indent=2) + "\n")
    os.replace(tmp, path)


def number(x: float | str) -> str:
    """A table cell: strings as they are, numbers with 4 significant digits."""
    return x if isinstance(x, str) else f"{x:.4g}"


def table(results: dict) -> str:
    """The docs' predicted-vs-measured table of one results.json."""
    lines = ["| check | predicted | measured | tolerance | ok |", "|---|---|---|---|---|"]
    for c in results["checks"]:
        cells = [c["name"], number(c["predicted"]), number(c["measured"]), c["tolerance"],
                 "yes" if c["passed"] else "no"]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    env = results.get("environment", {})
    verdict = "PASS" if results["passed"] else "FAIL"
    lines.append(f"\n**{verdict}**; runtime {results['runtime_s']:.0f} s wall, {results['cpu_s']:.0f} s CPU "
                 f"(torch {env.get('torch')}, {env.get('threads')} thread, {env.get('cpu_capability')})")
    return "\n".join(lines)


def tables(names: list[str]) -> None:
    for name in names:
        path = LAB / name / "results.json"
        print(f"### {name} ({path.relative_to(ROOT)})\n")
        print(table(json.loads(path.read_text())) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    sub.add_parser("environments")
    for part in ("run", "tables"):
        p = sub.add_parser(part)
        p.add_argument("names", nargs="*", metavar="NAME", help=f"any of {', '.join(NAMES)} (default: all)")
        if part == "run":
            p.add_argument("--scale", default="default", choices=("smoke", "default", "full"))
    args = parser.parse_args()
    if args.part == "environments":
        environments()
        return
    names = args.names or list(NAMES)
    unknown = sorted(set(names) - set(NAMES))
    if unknown:
        parser.error(f"unknown experiment(s) {unknown}; choose from {', '.join(NAMES)}")
    if args.part == "run":
        run(names, args.scale)
    else:
        tables(names)


if __name__ == "__main__":
    main()
