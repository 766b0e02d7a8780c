"""The decisions benchmarks/zo_convergence.py takes from its runs: which run a grid chooses, which choices get
the other seeds, which get a dense start, and when a dense start may join its grid run's curve; and what every
task's plan holds (MeZO and each successor tuned on all weights and on the top block)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from hdopt.finetune.budget_goals import SUCCESSORS

ROOT = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("zo_convergence", ROOT / "benchmarks" / "zo_convergence.py")
zc = sys.modules["zo_convergence"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(zc)


def _read_run(name, group, best_dev, best_step, task="sst2", curve=(), marks=None, **flags):
    """A finished run as the report reads it (:func:`zo_convergence._read`)."""
    flags = {"method": "mezo", "optimizer": "zosgd", "lr": 1e-4, **flags}
    results = {"best_dev": best_dev, "best_step": best_step, "steps": 100, "forwards": 200}
    return {**zc._run(name, group, group, task, **flags), "results": results, "curve": list(curve),
            "marks": marks or {}, "minutes": 1.0}  # fmt: skip


def test_choose_takes_the_best_dev_and_breaks_ties_by_the_earlier_step():
    runs = [
        _read_run("a-lr1e-05", "A", 70.0, 50, lr=1e-5),
        _read_run("a-lr0.0001", "A", 74.0, 90),
        _read_run("a-lr0.001", "A", 74.0, 40, lr=1e-3),
        _read_run("a-lr0.01", "A", 74.0, 40, lr=1e-2),
        _read_run("b-lr0.0001", "B", None, None),
    ]
    chosen = zc.choose(runs)
    # 74 at step 40 beats 74 at step 90; a full tie goes to the first in grid order (the smaller lr)
    assert chosen["A"]["name"] == "a-lr0.001"
    assert chosen["B"]["name"] == "b-lr0.0001"  # a group of one run is that run, even without a dev point
    assert zc._score(chosen["B"]) < zc._score(runs[0])


def test_every_zo_choice_gets_the_other_seeds_but_not_ft_or_a_long_run():
    chosen = {
        "MeZO": _read_run("mezo-lr0.0001", "MeZO", 76.0, 50),
        "HiZOO, top block": _read_run("top1-hizoo-lr0.001", "HiZOO, top block", 71.0, 10, optimizer="hizoo",
                                      lr=1e-3, zo_blocks=1),  # fmt: skip
        "long": _read_run("top1-mezo-long", "long", 82.0, 10000, lr=3e-4, zo_blocks=1),
        "FT": _read_run("mr-ft", "FT", 85.0, 50, method="ft", optimizer="adamw", lr=1e-5),
    }
    finals = zc.finals("sst2", chosen)
    names = [f"{prefix}-seed{s}" for prefix in ("mezo-lr0.0001", "top1-hizoo-lr0.001") for s in (1, 2)]
    assert [r["name"] for r in finals] == names
    hizoo = chosen["HiZOO, top block"]
    for run, seed in zip(finals[2:], zc.FINAL_SEEDS, strict=True):
        assert (run["flags"], run["group"], run["task"]) == (hizoo["flags"], hizoo["group"], "sst2")
        assert run["seed"] == seed


def test_dense_starts_cover_the_whole_model_choices_of_both_tasks():
    chosen = {
        "MeZO": _read_run("mr-mezo-lr0.0001", "MeZO", 70.0, 75, task="mr"),
        "LOZO, top block": _read_run("mr-top1-lozo-lr0.0003", "LOZO, top block", 68.0, 250, task="mr",
                                     optimizer="lozo", lr=3e-4, zo_blocks=1),  # fmt: skip
        "FT": _read_run("mr-ft", "FT", 85.0, 50, task="mr", method="ft", optimizer="adamw", lr=1e-5),
    }
    (run,) = zc.dense("mr", chosen)  # top-block runs and FT get none
    assert run["name"] == "mr-mezo-lr0.0001-dense" and run["task"] == "mr"
    per_step = 2  # 200 forwards over 100 steps
    assert run["flags"]["steps"] == zc.DENSE_MEZO_FORWARDS // per_step
    assert run["flags"]["eval_every"] == zc.DENSE_EVERY // per_step
    rest = {k: v for k, v in run["flags"].items() if k not in ("steps", "eval_every")}
    assert rest == chosen["MeZO"]["flags"]
    assert zc.dense("other-task", chosen) == []


def test_a_dense_start_joins_its_run_only_where_both_agree():
    run = _read_run("mezo-lr0.0001", "MeZO", 76.0, 50, curve=[(0.0, 0.0, 51.0, 0), (100.0, 3.0, 76.0, 50)],
                    marks={3: 12.0, 6: 30.0, 50: 180.0})  # fmt: skip
    dense_curve = [(0.0, 0.1, 51.0, 0), (6.0, 0.2, 58.0, 3), (12.0, 0.4, 71.0, 6), (100.0, 3.1, 76.0, 50)]
    agreeing = {"name": "mezo-lr0.0001-dense", "curve": dense_curve}
    joined = zc.with_dense(run, agreeing)
    # the dense points between, timed by the run's own clock (marks in seconds)
    assert joined["curve"] == [(0.0, 0.0, 51.0, 0), (6.0, 0.2, 58.0, 3), (12.0, 0.5, 71.0, 6),
                               (100.0, 3.0, 76.0, 50)]  # fmt: skip
    assert zc._first_reaching(joined["curve"], 71.0) == (12.0, 0.5)
    assert zc._first_reaching(run["curve"], 71.0) == (100.0, 3.0)
    assert zc._first_reaching(run["curve"], 77.0) is None
    disagreeing = {**agreeing, "curve": [*agreeing["curve"][:3], (100.0, 3.1, 75.0, 50)]}
    with pytest.raises(ValueError, match="not the same run"):
        zc.with_dense(run, disagreeing)
    assert zc.with_dense(run, None) is run


@pytest.mark.parametrize("plan", sorted(zc.PLANS))
def test_every_task_tunes_mezo_and_each_successor_on_all_weights_and_on_the_top_block(plan):
    runs = zc.PLANS[plan]
    assert len({r["name"] for r in runs}) == len(runs)  # a run folder per planned run
    assert {r["task"] for r in runs} == {plan}
    grids: dict[tuple[str, bool], set[float]] = {}
    for r in runs:
        if zc._final(r):  # a forward-only grid's run (not FT, not a long run)
            rule = r["flags"].get("optimizer", r["flags"]["method"])  # node perturbation: its own method
            grids.setdefault((rule, zc._on_top(r)), set()).add(r["flags"]["lr"])
    wanted = {(optimizer, on_top) for optimizer in ("zosgd", *SUCCESSORS) for on_top in (False, True)}
    wanted.add(("node-perturbation", True))  # the last block only
    wanted.add(("read-adapters", False))  # every block, at the last token
    wanted.add(("read-adapters-exact", False))  # the same adapters, their exact gradient
    assert set(grids) == wanted
    assert all(len(lrs) >= 3 for lrs in grids.values())  # a grid with room on both sides of its middle
