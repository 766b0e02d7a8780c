"""The measurement functions the verdicts are built on, on synthetic curves with known answers."""

import math

import numpy as np
import pytest

from hdopt.dynamics.experiments import eos, equilibrium, explr, localsgd
from hdopt.dynamics.experiments.common import moving_average, thin
from hdopt.dynamics.experiments.eos import tail_values
from hdopt.dynamics.experiments.equilibrium import equilibrium_time, tail_rms
from hdopt.dynamics.experiments.sde import curve_gap, eval_points
from hdopt.dynamics.registry import get


def relaxing_norms(x0_sq, steps, lam_e):
    """x = ||w||^2 with x^2 - 1 = (x0^2 - 1) exp(-4 lam_e t): the equilibrium model's solution."""
    t = np.arange(steps)
    return np.sqrt(np.sqrt(1 + (x0_sq**2 - 1) * np.exp(-4 * lam_e * t)))


def test_equilibrium_time_and_log_delay_on_the_model_solution():
    lam_e, steps = 1e-3, 8000
    a = equilibrium_time(relaxing_norms(9.0, steps, lam_e), band=0.1)
    c = equilibrium_time(relaxing_norms(9.0 * 64, steps, lam_e), band=0.1)  # norm 8x -> ||w||^2 64x
    # crossing x^2 = (1.1)^2: t = ln((x0^2 - 1) / 0.21) / (4 lam_e), smoothed over 1% of the run
    assert a * lam_e == pytest.approx(math.log(80 / 0.21) / 4, abs=0.05)
    assert (c - a) * lam_e == pytest.approx(math.log(8), rel=0.02)
    assert equilibrium_time(np.linspace(10, 20, 100), band=0.01) > 70  # a growing series settles late


def test_tail_statistics_and_curve_gap():
    assert tail_rms(np.array([100.0, 3.0, -3.0, 3.0]), fraction=0.75) == pytest.approx(3.0)
    assert tail_values([1, 2, 3, 4, 5], 0.4).tolist() == [4, 5]
    assert curve_gap([1.1, 2.2], [1.0, 2.0]) == pytest.approx(0.1)
    assert eval_points(100, 4) == {25, 50, 75, 100}
    assert moving_average([0, 2, 4, 6], 2).tolist() == [0, 1, 3, 5]
    assert thin(range(1001), 11) == [float(v) for v in range(0, 1001, 100)]


def test_equilibrium_summary_compares_the_right_runs():
    """The four figures come from the runs they name: angle of A, norm of A over B, times of A and C."""
    config = get("equilibrium").config("default")
    lam_e, steps = config.lr * config.weight_decay, config.steps
    norm_a = relaxing_norms(9.0, steps, lam_e)
    runs = {
        "A": {"angle": np.full(steps, 0.03), "norm": norm_a},
        "B": {"angle": np.full(steps, 0.5), "norm": norm_a / 2},  # the same curve, half as large
        "C": {"angle": np.full(steps, 0.9), "norm": relaxing_norms(9.0 * 64, steps, lam_e)},
    }
    m = equilibrium.summarize(config, runs)
    assert m["angle"] == pytest.approx(0.03)
    assert m["norm_ratio"] == pytest.approx(2.0)
    assert m["time_a"] == pytest.approx(math.log(80 / 0.21) / 4, abs=0.05)
    assert m["time_c"] - m["time_a"] == pytest.approx(math.log(8), rel=0.02)
    assert all(c.passed for c in equilibrium.judge(config, m))


def test_localsgd_summary_reads_each_run():
    config = get("localsgd").config("default")
    part1 = {h: {"final": {"trace": 20.0 - h / 10}} for h in config.periods}
    cosine = {key: {"syncs": syncs, "final": {"test_acc": acc, "trace": 1.0}}
              for key, syncs, acc in (("constant", 512, 0.9), ("qsr", 382, 0.91), ("matched", 409, 0.8))}
    m = localsgd.summarize(config, part1, cosine, 5)
    assert m["traces"] == [20.0 - h / 10 for h in config.periods]
    assert m["qsr"] == {"syncs": 382, "test_acc": 0.91} and m["matched"]["test_acc"] == 0.8
    checks = localsgd.judge(config, m)
    assert [c.passed for c in checks] == [True, True, True]
    drops = [a - b for a, b in zip(m["traces"], m["traces"][1:], strict=False)]
    assert checks[0].measured == pytest.approx(min(drops))


def test_eos_and_explr_summaries():
    config = get("eos").config("default")
    gd = {0.2: {"sharpness": [2.0] + [9.0] * 6 + [10.0] * 3}}
    m = eos.summarize(config, gd, [5.0] * 7 + [2.0] * 3, [1.0] * 7 + [2.2] * 3, [1.0, 3.0, 2.0])
    assert m["gd"][0.2] == {"initial": 2.0, "settled": 10.0}
    assert m["ngd_ratio"] == 2.0 and m["sqrt_ratio"] == pytest.approx(2.2)
    assert m["sqrt_drop"] == pytest.approx(2 / 3) and m["sqrt_peak_before_end"]
    assert not eos.summarize(config, gd, [2.0], [2.0], [1.0, 2.0, 3.0])["sqrt_peak_before_end"]
    logs = {0.0: {"diff": [1e-9, 3e-9], "scale_error": [2e-12, 1e-12], "control_diff": [1.0, 4.0]}}
    assert explr.summarize(logs) == {0.0: {"diff": 3e-9, "scale_error": 2e-12, "control": 4.0}}
