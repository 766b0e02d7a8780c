"""Batch-size scaling rules against their formulas."""

import dataclasses
import math

import pytest

from hdopt.dynamics.hparams import scale_hparams, steps_for_batch


def test_linear_rule_scales_only_lr():
    config = {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    assert scale_hparams(config, 4, "linear") == {"lr": 0.4, "momentum": 0.9, "weight_decay": 5e-4}
    assert config["lr"] == 0.1  # input untouched


def test_sqrt_rule_for_adam():
    new = scale_hparams({"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}, 4, "sqrt")
    assert new["lr"] == pytest.approx(2e-3)
    assert new["betas"] == pytest.approx((0.6, 0.996))  # 1 - beta -> 4 (1 - beta)
    assert new["eps"] == pytest.approx(5e-9)


def test_sqrt_rule_for_rmsprop_and_dataclasses():
    @dataclasses.dataclass
    class RMSprop:
        lr: float = 0.01
        alpha: float = 0.99
        eps: float = 1e-8

    new = scale_hparams(RMSprop(), 9, "sqrt")
    assert isinstance(new, RMSprop)
    assert (new.lr, new.alpha, new.eps) == pytest.approx((0.03, 0.91, 1e-8 / 3))


def test_sqrt_rule_round_trip_with_kappa_and_its_inverse():
    base = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8}
    back = scale_hparams(scale_hparams(base, 4, "sqrt"), 0.25, "sqrt")
    assert back["lr"] == pytest.approx(1e-3) and back["eps"] == pytest.approx(1e-8)
    assert back["betas"] == pytest.approx((0.9, 0.999))


@pytest.mark.parametrize("bad", [{"lr": 1.0, "betas": (0.5, 0.9)}, {"momentum": 0.9}])
def test_errors_name_the_problem(bad):
    with pytest.raises(ValueError, match="kappa|lr"):
        scale_hparams(bad, 4, "sqrt")
    with pytest.raises(ValueError, match="unknown scaling rule"):
        scale_hparams({"lr": 1.0}, 2, "cube")
    with pytest.raises(ValueError, match="positive"):
        scale_hparams({"lr": 1.0}, 0, "linear")


def test_steps_for_batch():
    assert steps_for_batch(4000, 4) == 1000
    assert steps_for_batch(3, 16) == 1
    assert math.isclose(steps_for_batch(1000, 0.5), 2000)
