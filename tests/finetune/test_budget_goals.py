"""The forward-pass budget benchmark's goals, each with a table that meets it and tables that must not."""

from __future__ import annotations

import pytest

from hdopt.finetune.budget_goals import accuracy_goal, forward_goal, forwards_to_reach, rows_from_curves


def _row(method, optimizer, test=70.0, minutes=10.0, backwards=0, reach=None):
    return {"task": "sst2", "method": method, "optimizer": optimizer, "test_at_best_dev": test,
            "minutes": minutes, "backwards": backwards, "forwards_to_mezo_final": reach}  # fmt: skip


MEZO = _row("MeZO", "zosgd", test=64.5, minutes=17.1, reach=200)


def test_the_accuracy_goal_is_met_by_a_forward_only_run_at_the_target_within_the_minutes():
    goal = accuracy_goal([MEZO, _row("MeZO, top block", "zosgd", test=87.0, minutes=30.0)])
    assert goal["met"] and goal["best"] == {"task": "sst2", "method": "MeZO, top block", "test": 87.0,
                                            "minutes": 30.0}  # fmt: skip


@pytest.mark.parametrize("row,best", [
    (_row("MeZO, top block", "zosgd", test=86.5, minutes=12.0), "MeZO, top block"),  # below the target
    (_row("MeZO, top block, 20k steps", "zosgd", test=90.0, minutes=30.5), "MeZO"),  # too late
    (_row("FT", "adamw", test=89.5, minutes=20.0, backwards=250), "MeZO"),  # not forward-only
])  # fmt: skip
def test_the_accuracy_goal_is_not_met_below_the_target_too_late_or_with_backprop(row, best):
    goal = accuracy_goal([MEZO, row])
    assert not goal["met"] and goal["best"]["method"] == best


def test_the_accuracy_goal_without_any_timely_forward_only_run_is_not_met():
    assert accuracy_goal([_row("MeZO", "zosgd", minutes=40.0)]) == {
        "goal": "a forward-only run reaches 87 test accuracy within 30 minutes", "met": False, "best": None}


def test_the_forward_goal_is_met_by_a_successor_within_a_third_of_mezos_forwards():
    goal = forward_goal([MEZO, _row("FZOO", "fzoo", reach=66.6), _row("LOZO", "lozo", reach=100.0)])
    assert goal["met"] and goal["budget"] == pytest.approx(66.7, abs=0.05) and goal["mezo_forwards"] == 200
    assert goal["fastest"] == {"task": "sst2", "method": "FZOO", "forwards": 66.6}


@pytest.mark.parametrize("row,fastest", [
    (_row("FZOO", "fzoo", reach=66.8), {"task": "sst2", "method": "FZOO", "forwards": 66.8}),  # above a third
    (_row("FZOO", "fzoo", reach=None), None),  # never reached it
    (_row("MeZO, top block", "zosgd", reach=10.0), None),  # MeZO's own rule on fewer blocks: no successor
])  # fmt: skip
def test_the_forward_goal_is_not_met_above_a_third_by_no_successor_or_by_mezo_itself(row, fastest):
    goal = forward_goal([MEZO, row])
    assert not goal["met"] and goal["fastest"] == fastest


def test_the_forward_goal_needs_a_tuned_mezo_row():
    with pytest.raises(ValueError, match="no tuned whole-model MeZO row"):
        forward_goal([_row("FZOO", "fzoo", reach=10.0)])


def test_the_forward_goal_refuses_a_mezo_run_that_never_rose_above_its_start():
    with pytest.raises(ValueError, match="no higher than its starting one"):
        forward_goal([_row("MeZO", "zosgd", reach=0), _row("FZOO", "fzoo", reach=0)])


MEZO_CURVE = [(0, 51.0), (1000, 60.0), (2000, 72.0), (3000, 70.0), (4000, 71.0)]  # final 71, first at 2000


def test_forwards_to_reach_is_the_first_evaluation_at_or_above_the_target():
    assert forwards_to_reach(MEZO_CURVE, 71.0) == 2000
    assert forwards_to_reach(MEZO_CURVE, 72.0) == 2000 and forwards_to_reach(MEZO_CURVE, 60.0) == 1000
    assert forwards_to_reach(MEZO_CURVE, 72.5) is None


def test_curves_decide_the_forward_goal_against_mezos_last_evaluation():
    fast = [(0, 51.0), (300, 65.0), (666, 71.0)]  # 71 after 666 forwards: a third of 2000 is 666.7
    slow = [(0, 51.0), (700, 71.0)]
    goal = forward_goal(rows_from_curves(MEZO_CURVE, {"mezo+hizoo": ("hizoo", fast)}, task="sst2"))
    assert goal["met"] and goal["mezo_forwards"] == 2000
    assert goal["fastest"] == {"task": "sst2", "method": "mezo+hizoo", "forwards": 666}
    goal = forward_goal(rows_from_curves(MEZO_CURVE, {"mezo+hizoo": ("hizoo", slow)}))
    assert not goal["met"] and goal["fastest"]["forwards"] == 700
    never = [(0, 51.0), (5000, 70.9)]
    assert forward_goal(rows_from_curves(MEZO_CURVE, {"mezo+lozo": ("lozo", never)}))["fastest"] is None


def test_curves_need_a_mezo_evaluation():
    with pytest.raises(ValueError, match="no dev evaluation yet"):
        rows_from_curves([], {"mezo+hizoo": ("hizoo", [(0, 51.0)])})
