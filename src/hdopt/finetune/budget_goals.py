"""The two accuracy goals of the forward-pass budget benchmark (benchmarks/zo_convergence.py), from its table.

A table row is one method on one task: ``optimizer`` (``zosgd``, a successor's name, or a backprop optimizer),
``backwards`` (backward passes; 0 for a forward-only method), ``test_at_best_dev``, ``minutes`` (the whole
run, loading and evaluations included), ``forwards_to_mezo_final`` (forward passes, the cache included, to
the first dev evaluation at or above tuned MeZO's final dev accuracy; None if never).

* :func:`accuracy_goal`: a forward-only run reaches ``target`` test accuracy within ``minutes`` (a run counts
  only if the whole of it took no longer: its test accuracy is measured once, at its end).
* :func:`forward_goal`: a successor (:data:`SUCCESSORS`) reaches tuned MeZO's final dev accuracy with at most
  ``fraction`` of the forward passes MeZO took to reach it.
* :func:`rows_from_curves`: that goal's rows from dev curves alone (a MeZO run and successor runs of one
  protocol, e.g. the GPU runs of benchmarks/finetune.py), MeZO's last dev evaluation being the target.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

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
    if mezo["forwards_to_mezo_final"] <= 0:
        raise ValueError("MeZO's final dev accuracy is no higher than its starting one, so there is nothing "
                         "to race to: run MeZO longer or with another learning rate")  # fmt: skip
    budget = fraction * mezo["forwards_to_mezo_final"]
    reached = [r for r in rows if r.get("optimizer") in SUCCESSORS and r.get("forwards_to_mezo_final")]
    fastest = min(reached, key=lambda r: r["forwards_to_mezo_final"], default=None)
    named = None if fastest is None else {**_named(fastest), "forwards": fastest["forwards_to_mezo_final"]}
    return {"goal": f"a successor reaches tuned MeZO's final dev accuracy with <= {fraction:.3g} of its "
                    "forward passes",
            "met": fastest is not None and fastest["forwards_to_mezo_final"] <= budget,
            "mezo_forwards": mezo["forwards_to_mezo_final"], "budget": round(budget, 1),
            "fastest": named}  # fmt: skip


Curve = Sequence[tuple[float, float]]  # (forward passes, dev accuracy) at each dev evaluation, in order


def forwards_to_reach(curve: Curve, target: float) -> float | None:
    """The forward passes of the first evaluation of ``curve`` at or above ``target`` (None if none is)."""
    return next((forwards for forwards, dev in curve if dev >= target), None)


def rows_from_curves(mezo: Curve, successors: Mapping[str, tuple[str, Curve]], task: str | None = None,
                     ) -> list[dict]:  # fmt: skip
    """:func:`forward_goal`'s rows from dev curves: MeZO's (``mezo``; its last evaluation is its final dev
    accuracy, the target) and each successor's, ``{name: (optimizer, curve)}``."""
    if not mezo:
        raise ValueError("MeZO's run has no dev evaluation yet: its final dev accuracy is the target")
    target = mezo[-1][1]
    rows = [{"task": task, "method": "MeZO", "optimizer": "zosgd",
             "forwards_to_mezo_final": forwards_to_reach(mezo, target)}]  # fmt: skip
    rows += [{"task": task, "method": name, "optimizer": optimizer,
              "forwards_to_mezo_final": forwards_to_reach(curve, target)}
             for name, (optimizer, curve) in successors.items()]  # fmt: skip
    return rows
