"""The two accuracy goals of the forward-pass budget benchmark (benchmarks/zo_convergence.py), from its table.

A table row is one method on one task: ``optimizer`` (``zosgd``, a successor's name, or a backprop optimizer),
``backwards`` (backward passes; 0 for a forward-only method), ``test_at_best_dev``, ``minutes`` (the whole
run, loading and evaluations included), ``forwards_to_mezo_final`` (forward passes, the cache included, to
the first dev evaluation at or above tuned MeZO's final dev accuracy; None if never).

* :func:`accuracy_goal`: a forward-only run reaches ``target`` test accuracy within ``minutes`` (a run counts
  only if the whole of it took no longer: its test accuracy is measured once, at its end).
* :func:`forward_goal`: a successor (:data:`SUCCESSORS`) reaches tuned MeZO's final dev accuracy with at most
  ``fraction`` of the forward passes MeZO took to reach it.
"""

from __future__ import annotations

from collections.abc import Iterable

SUCCESSORS = ("fzoo", "hizoo", "lozo", "sparse-mezo")
ACCURACY_TARGET = 87.0
ACCURACY_MINUTES = 30.0
FORWARD_FRACTION = 1 / 3


def _named(row: dict) -> dict:
    return {"task": row.get("task"), "method": row["method"]}


def accuracy_goal(rows: Iterable[dict], target: float = ACCURACY_TARGET,
                  minutes: float = ACCURACY_MINUTES) -> dict:  # fmt: skip
    """``met``, and the best forward-only run within ``minutes`` (``best``: None when there is none)."""
    timely = [r for r in rows if not r.get("backwards") and r.get("test_at_best_dev") is not None
              and r["minutes"] <= minutes]  # fmt: skip
    best = max(timely, key=lambda r: r["test_at_best_dev"], default=None)
    return {"goal": f"a forward-only run reaches {target:g} test accuracy within {minutes:g} minutes",
            "met": best is not None and best["test_at_best_dev"] >= target,
            "best": None if best is None else {**_named(best), "test": best["test_at_best_dev"],
                                               "minutes": best["minutes"]}}  # fmt: skip


def forward_goal(rows: Iterable[dict], fraction: float = FORWARD_FRACTION) -> dict:
    """``met``, MeZO's forward passes to its own final dev accuracy, the budget (``fraction`` of them) and the
    successor that reached that accuracy with the fewest (``fastest``: None when none did)."""
    rows = list(rows)
    mezo = next((r for r in rows if r["method"] == "MeZO"), None)
    if mezo is None or mezo.get("forwards_to_mezo_final") is None:
        raise ValueError("the table has no tuned whole-model MeZO row (method 'MeZO') that reached its own "
                         "final dev accuracy: run its grid first")  # fmt: skip
    budget = fraction * mezo["forwards_to_mezo_final"]
    reached = [r for r in rows if r.get("optimizer") in SUCCESSORS and r.get("forwards_to_mezo_final")]
    fastest = min(reached, key=lambda r: r["forwards_to_mezo_final"], default=None)
    named = None if fastest is None else {**_named(fastest), "forwards": fastest["forwards_to_mezo_final"]}
    return {"goal": f"a successor reaches tuned MeZO's final dev accuracy with <= {fraction:.3g} of its "
                    "forward passes",
            "met": fastest is not None and fastest["forwards_to_mezo_final"] <= budget,
            "mezo_forwards": mezo["forwards_to_mezo_final"], "budget": round(budget, 1),
            "fastest": named}  # fmt: skip
