"""Every claim of the report, fed measurements that pass and measurements that fail.

Each lab experiment's predictions (its ``judge``) and each fine-tuning rule get a passing measurement
(``reproduced``), one that meets part of the rule (``partly reproduced``), one that meets none (``not
reproduced``), and the passing one with a NaN in it (``not reproduced``). No experiment runs here: the
measurements are the numbers the experiments would have produced.
"""

from __future__ import annotations

import math

import pytest

from hdopt.dynamics.experiments import eos, equilibrium, explr, localsgd, mirror, sde
from hdopt.dynamics.registry import get
from hdopt.dynamics.results import Check, LabResult
from hdopt.report import Context, lab
from hdopt.report.claims import NOT_REPRODUCED, PARTLY, REPRODUCED, verdict_from, verdict_of_checks
from hdopt.report.finetune import accuracy_claim, cost_claim, memory_claim, top_block_claim

NAN = float("nan")
LN8 = math.log(8)

# experiment -> (judge, passing, partly, failing, the passing measurement with a NaN) at the default preset
LAB_CASES = {
    "equilibrium": (
        equilibrium.judge,
        {"angle": 0.0283, "norm_ratio": 2.0, "time_a": 2.0, "time_c": 2.0 + LN8},
        {"angle": 0.0283, "norm_ratio": 1.0, "time_a": 2.0, "time_c": 2.0 + LN8},
        {"angle": 0.06, "norm_ratio": 1.0, "time_a": 10.0, "time_c": 10.0},
        {"angle": 0.0283, "norm_ratio": NAN, "time_a": 2.0, "time_c": 2.0 + LN8},
    ),
    "explr": (
        explr.judge,
        {m: {"diff": 1e-12, "scale_error": 1e-13, "control": 5.0} for m in (0.0, 0.9)},
        {0.0: {"diff": 1e-12, "scale_error": 1e-13, "control": 5.0},
         0.9: {"diff": 1e-3, "scale_error": 1e-13, "control": 5.0}},
        {m: {"diff": 1e-3, "scale_error": 1e-3, "control": 1e-6} for m in (0.0, 0.9)},
        {0.0: {"diff": 1e-12, "scale_error": NAN, "control": 5.0},
         0.9: {"diff": 1e-12, "scale_error": 1e-13, "control": 5.0}},
    ),
    "sde": (
        sde.judge,
        {"svag": {2: 0.05, 4: 0.05}, "control": 0.3,
         "adam": {"sqrt rule": 0.07, "linear rule": 0.27, "no scaling": 0.88}},
        {"svag": {2: 0.05, 4: 0.05}, "control": 0.3,
         "adam": {"sqrt rule": 0.3, "linear rule": 0.27, "no scaling": 0.88}},
        {"svag": {2: 0.5, 4: 0.5}, "control": 0.1,
         "adam": {"sqrt rule": 0.5, "linear rule": 0.01, "no scaling": 0.01}},
        {"svag": {2: 0.05, 4: 0.05}, "control": NAN,
         "adam": {"sqrt rule": 0.07, "linear rule": 0.27, "no scaling": 0.88}},
    ),
    "eos": (
        eos.judge,
        {"gd": {0.2: {"initial": 2.4, "settled": 10.1}, 0.4: {"initial": 2.4, "settled": 5.1}},
         "ngd_ratio": 2.0, "sqrt_ratio": 2.1, "sqrt_drop": 0.5, "sqrt_peak_before_end": True},
        {"gd": {0.2: {"initial": 2.4, "settled": 10.1}, 0.4: {"initial": 2.4, "settled": 5.1}},
         "ngd_ratio": 2.0, "sqrt_ratio": 2.1, "sqrt_drop": 0.5, "sqrt_peak_before_end": False},
        {"gd": {0.2: {"initial": 20.0, "settled": 3.0}, 0.4: {"initial": 20.0, "settled": 3.0}},
         "ngd_ratio": 1.0, "sqrt_ratio": 1.0, "sqrt_drop": 1.0, "sqrt_peak_before_end": False},
        {"gd": {0.2: {"initial": 2.4, "settled": NAN}, 0.4: {"initial": 2.4, "settled": 5.1}},
         "ngd_ratio": 2.0, "sqrt_ratio": 2.1, "sqrt_drop": 0.5, "sqrt_peak_before_end": True},
    ),
    "mirror": (
        mirror.judge,
        {"worst_gap": 0.02, "halving": 2.0, "l1_ratio": 1.02, "l2_dist": 1e-6},
        {"worst_gap": 0.02, "halving": 1.0, "l1_ratio": 1.02, "l2_dist": 1e-6},
        {"worst_gap": 0.5, "halving": 1.0, "l1_ratio": 1.5, "l2_dist": 0.5},
        {"worst_gap": 0.02, "halving": 2.0, "l1_ratio": 1.02, "l2_dist": NAN},
    ),
    "localsgd": (
        localsgd.judge,
        {"traces": [15.6, 13.6, 12.7], "matched_period": 5, "constant": {"syncs": 512, "test_acc": 0.92},
         "qsr": {"syncs": 382, "test_acc": 0.925}, "matched": {"syncs": 409, "test_acc": 0.91}},
        {"traces": [15.6, 13.6, 12.7], "matched_period": 5, "constant": {"syncs": 512, "test_acc": 0.92},
         "qsr": {"syncs": 382, "test_acc": 0.925}, "matched": {"syncs": 409, "test_acc": 0.93}},
        {"traces": [12.0, 13.0, 14.0], "matched_period": 5, "constant": {"syncs": 512, "test_acc": 0.95},
         "qsr": {"syncs": 512, "test_acc": 0.90}, "matched": {"syncs": 409, "test_acc": 0.93}},
        {"traces": [15.6, NAN, 12.7], "matched_period": 5, "constant": {"syncs": 512, "test_acc": 0.92},
         "qsr": {"syncs": 382, "test_acc": 0.925}, "matched": {"syncs": 409, "test_acc": 0.91}},
    ),
}  # fmt: skip


def _claim(ctx, name: str, checks: list[Check]):
    result = LabResult(name, get(name).config("default"), checks)
    return lab.claim_from(ctx, result, "t", "paper")


@pytest.mark.parametrize("name", list(LAB_CASES))
def test_lab_claims_follow_their_measurements(name, tmp_path):
    ctx = Context("quick", tmp_path)
    judge, passing, partly, failing, with_nan = LAB_CASES[name]
    config = get(name).config("default")
    checks = {key: judge(config, m) for key, m in
              (("pass", passing), ("partly", partly), ("fail", failing), ("nan", with_nan))}  # fmt: skip
    assert all(c.passed for c in checks["pass"]), [c.line() for c in checks["pass"]]
    assert _claim(ctx, name, checks["pass"]).verdict == REPRODUCED
    assert _claim(ctx, name, checks["partly"]).verdict == PARTLY
    assert not any(c.passed for c in checks["fail"]), [c.line() for c in checks["fail"] if c.passed]
    assert _claim(ctx, name, checks["fail"]).verdict == NOT_REPRODUCED
    assert _claim(ctx, name, checks["nan"]).verdict == NOT_REPRODUCED
    assert not LabResult(name, config, checks["nan"]).passed


def test_every_registered_experiment_has_a_case():
    from hdopt.dynamics.registry import names

    assert sorted(names()) == sorted(LAB_CASES)


def test_no_checks_is_never_reproduced(tmp_path):
    assert verdict_of_checks([]) == NOT_REPRODUCED
    assert _claim(Context("quick", tmp_path), "mirror", []).verdict == NOT_REPRODUCED
    assert not LabResult("mirror", get("mirror").config("default"), []).passed


def test_a_nan_decides_whatever_the_rule_says():
    assert verdict_from(True, True, [1.0, NAN]) == NOT_REPRODUCED
    assert verdict_from(True, True, [1.0, math.inf]) == NOT_REPRODUCED
    assert verdict_from(True, True, [1.0, None]) == NOT_REPRODUCED
    assert verdict_from(True, True, [1.0, 2]) == REPRODUCED
    # a rule written so that NaN slips through ("not above the tolerance") still fails
    check = Check("gap", "< 0.1", NAN, not NAN > 0.1, "< 0.1")
    assert not check.passed and verdict_of_checks([check]) == NOT_REPRODUCED
    assert not Check("x", NAN, 1.0, True, "within 10%").passed  # a NaN prediction too


def test_qsr_needs_fewer_synchronizations_and_more_accuracy():
    """Each condition of the two QSR checks fails on its own: as accurate as constant H = H_base but with as
    many syncs, or fewer syncs but less accurate; more accurate than the matched constant H that syncs less
    often than QSR, or less accurate than one that syncs at least as often."""
    config = get("localsgd").config("default")
    passing = LAB_CASES["localsgd"][1]  # constant H: 512 syncs, 0.92; QSR: 382, 0.925; matched: 409, 0.91

    def qsr_checks(**changed) -> list[bool]:
        return [c.passed for c in localsgd.judge(config, {**passing, **changed})[1:]]

    assert qsr_checks() == [True, True]
    assert not qsr_checks(qsr={"syncs": 512, "test_acc": 0.925})[0]
    assert not qsr_checks(qsr={"syncs": 382, "test_acc": 0.90})[0]
    assert qsr_checks(matched={"syncs": 300, "test_acc": 0.91}) == [True, False]
    assert qsr_checks(matched={"syncs": 409, "test_acc": 0.93}) == [True, False]


def _report_section(monkeypatch, tmp_path, section, measured: dict):
    """A report section built from synthetic lab results: run_experiment returns judge(measurement)."""

    def fake_run(ctx, name):
        config = get(name).config("default")
        return LabResult(name, config, LAB_CASES[name][0](config, measured[name]))

    monkeypatch.setattr(lab, "run_experiment", fake_run)
    return section(Context("quick", tmp_path))


def test_the_lab_sections_split_the_checks_into_their_claims(monkeypatch, tmp_path):
    passing = {name: case[1] for name, case in LAB_CASES.items()}
    section = _report_section(monkeypatch, tmp_path, lab.implicit_bias, passing)
    assert [c.verdict for c in section.claims] == [REPRODUCED] * 5
    section = _report_section(monkeypatch, tmp_path, lab.local_sgd, passing)
    assert [c.verdict for c in section.claims] == [REPRODUCED, REPRODUCED]
    # the trace falls but QSR loses to the constant H with QSR's synchronizations: Local SGD reproduced,
    # QSR partly (equal accuracy with fewer syncs still holds)
    section = _report_section(monkeypatch, tmp_path, lab.local_sgd, {"localsgd": LAB_CASES["localsgd"][2]})
    assert [c.verdict for c in section.claims] == [REPRODUCED, PARTLY]
    section = _report_section(monkeypatch, tmp_path, lab.local_sgd, {"localsgd": LAB_CASES["localsgd"][3]})
    assert [c.verdict for c in section.claims] == [NOT_REPRODUCED, NOT_REPRODUCED]


# -- forward-only fine-tuning ---------------------------------------------------------------------------
def _runs(zero_shot: float, icl: float, ft: float, mezo: float) -> dict:
    row = {"steps": 10, "forwards": 20, "backwards": 0, "best_dev": None, "command": "hdopt ..."}
    return {m: {**row, "test": acc} for m, acc in
            (("zero-shot", zero_shot), ("icl", icl), ("ft", ft), ("mezo", mezo))}  # fmt: skip


@pytest.mark.parametrize("accuracies, verdict", [
    ((55.0, 60.0, 90.0, 88.0), REPRODUCED),       # >= 60 + 5 and >= 90 - 5
    ((55.0, 60.0, 90.0, 70.0), PARTLY),           # well above prompting, not close to FT
    ((55.0, 60.0, 90.0, 62.0), NOT_REPRODUCED),   # close to ICL
    ((55.0, 60.0, 64.0, 62.0), NOT_REPRODUCED),   # close to FT but not above prompting
    ((55.0, NAN, 90.0, 88.0), NOT_REPRODUCED),
    ((55.0, 60.0, 90.0, NAN), NOT_REPRODUCED),
])  # fmt: skip
def test_mezo_accuracy_claim(accuracies, verdict, tmp_path):
    claim = accuracy_claim(Context("quick", tmp_path), _runs(*accuracies), "dev.png")
    assert claim.verdict == verdict


@pytest.mark.parametrize("accuracies, verdict", [
    ((55.0, 60.0, 90.0, 88.0), REPRODUCED),       # top block >= 60 + 5 and >= 90 - 5
    ((55.0, 60.0, 90.0, 84.0), PARTLY),           # well above prompting, 6 points below FT
    ((55.0, 60.0, 90.0, 64.0), NOT_REPRODUCED),   # close to ICL
    ((55.0, 60.0, 64.0, 63.0), NOT_REPRODUCED),   # close to FT but not above prompting
    ((55.0, 60.0, NAN, 88.0), NOT_REPRODUCED),
    ((55.0, 60.0, 90.0, NAN), NOT_REPRODUCED),
])  # fmt: skip
def test_best_forward_only_claim(accuracies, verdict, tmp_path):
    zero_shot, icl, ft, top = accuracies
    runs = _runs(zero_shot, icl, ft, 50.0)
    runs["top"] = {**runs["mezo"], "test": top, "cache_mib": 12.0, "seconds": 60.0}
    claim = top_block_claim(Context("quick", tmp_path), runs)
    assert claim.verdict == verdict
    # the verdict's number is reported
    assert f"exact read-path gradient, read-position adapters {top:.1f}" in claim.measured


def _peaks(inference: float, mezo: float, ft: float) -> dict:
    return {m: {"peak_mib": v, "seconds_per_step": 0.1} for m, v in
            (("inference", inference), ("mezo", mezo), ("ft", ft))}  # fmt: skip


@pytest.mark.parametrize("peaks, verdict", [
    ((1000.0, 1040.0, 2500.0), REPRODUCED),       # MeZO 1.04x inference, FT 2.4x MeZO
    ((1000.0, 1100.0, 2500.0), PARTLY),           # MeZO 1.1x
    ((1000.0, 1040.0, 1200.0), PARTLY),           # FT only 1.15x MeZO
    ((1000.0, 1300.0, 2500.0), NOT_REPRODUCED),   # MeZO 1.3x
    ((1000.0, NAN, 2500.0), NOT_REPRODUCED),
    ((NAN, 1040.0, 2500.0), NOT_REPRODUCED),
])  # fmt: skip
def test_memory_claim(peaks, verdict, tmp_path):
    assert memory_claim(Context("quick", tmp_path), _peaks(*peaks), "memory.png").verdict == verdict


@pytest.mark.parametrize("rademacher, gaussian, verdict", [
    (2.3, 3.4, REPRODUCED),
    (2.6, 3.4, PARTLY),
    (2.3, 3.6, PARTLY),
    (2.6, 3.6, NOT_REPRODUCED),
    (NAN, 3.4, NOT_REPRODUCED),
    (2.3, NAN, NOT_REPRODUCED),
])  # fmt: skip
def test_zo_step_cost_claim(rademacher, gaussian, verdict, tmp_path):
    cost = {"rademacher": rademacher, "gaussian": gaussian, "forward_seconds": 1.0}
    assert cost_claim(Context("quick", tmp_path), cost).verdict == verdict
