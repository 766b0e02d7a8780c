"""The measurement functions the verdicts are built on, on synthetic curves with known answers."""

import math

import numpy as np
import pytest

from hdopt.dynamics.experiments.common import moving_average, thin
from hdopt.dynamics.experiments.eos import tail_values
from hdopt.dynamics.experiments.equilibrium import equilibrium_time, tail_rms
from hdopt.dynamics.experiments.sde import curve_gap, eval_points


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
