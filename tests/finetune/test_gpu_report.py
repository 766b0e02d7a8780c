"""The successor goal that ``benchmarks/finetune.py report --tag T`` decides from the run folders it finds
(the GPU plan's runs, stopped ones included): which folders pair up, the verdict, and the steps it names."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("finetune_benchmark", ROOT / "benchmarks" / "finetune.py")
fb = sys.modules["finetune_benchmark"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fb)


def _run(runs: Path, name: str, curve, planned: int = 400, last_step: int | None = None) -> None:
    """A run folder as hdopt finetune leaves it: config.json and metrics.jsonl (dev rows every 100 steps)."""
    folder = runs / name
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"train": {"steps": planned}}))
    rows = [{"step": 100 * i, "forwards": forwards, "backwards": 0, "dev_accuracy": dev}
            for i, (forwards, dev) in enumerate(curve)]  # fmt: skip
    if last_step is not None:
        rows.append({"step": last_step, "loss": 0.5, "lr": 1e-5, "elapsed": 1.0})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


MEZO = [(0, 51.0), (200, 60.0), (400, 71.0), (600, 70.0), (800, 71.0)]  # final 71, first after 400 forwards


@pytest.fixture
def runs(tmp_path, monkeypatch):
    monkeypatch.setattr(fb, "RUNS", tmp_path)
    return tmp_path


def test_a_successor_within_a_third_of_mezos_forwards_meets_the_goal(runs):
    _run(runs, "h100-sst2-mezo", MEZO)
    _run(runs, "h100-sst2-mezo+hizoo", [(0, 51.0), (133, 71.0)])  # a third of 400 is 133.3
    _run(runs, "h100-sst2-mezo+lozo", [(0, 51.0), (300, 72.0)])
    _run(runs, "h100-sst2-ft", [(0, 51.0), (100, 85.0)])  # not a ZO pair: ignored
    _run(runs, "sst2-mezo+fzoo", [(0, 51.0), (1, 90.0)])  # another tag's (here: no tag's) run: ignored
    [line] = fb.successor_goals("h100", "sst2")
    assert line.startswith("- mezo: ") and "**met**" in line
    assert "after 400 forwards" in line and "a third is 133.3" in line and "mezo+hizoo: 133" in line
    assert "mezo+fzoo" not in line and "mezo 400 of 400 steps, mezo+hizoo 100 of 400 steps" in line


def test_a_successor_past_a_third_or_a_stopped_one_that_never_reached_it_does_not(runs):
    _run(runs, "h100-sst2-mezo", MEZO)
    _run(runs, "h100-sst2-mezo+hizoo", [(0, 51.0), (134, 71.0)])
    _run(runs, "h100-sst2-mezo+lozo", [(0, 51.0), (100, 65.0)], last_step=150)  # a deadline stopped it
    [line] = fb.successor_goals("h100", "sst2")
    assert "**not met**" in line and "mezo+hizoo: 134" in line and "mezo+lozo 150 of 400 steps" in line


def test_no_pair_no_line_and_a_flat_mezo_run_gets_no_verdict(runs):
    _run(runs, "h100-sst2-mezo", MEZO)
    assert fb.successor_goals("h100", "sst2") == []  # MeZO alone: nothing to race
    _run(runs, "h100-sst2-mezo-prefix+lozo", [(0, 51.0), (10, 80.0)])  # pairs with mezo-prefix, absent
    assert fb.successor_goals("h100", "sst2") == []
    _run(runs, "h100-mr-mezo", [(0, 55.0), (400, 55.0)])
    _run(runs, "h100-mr-mezo+hizoo", [(0, 55.0), (100, 60.0)])
    [line] = fb.successor_goals("h100", "mr")
    assert "no verdict" in line and "no higher than its starting one" in line
