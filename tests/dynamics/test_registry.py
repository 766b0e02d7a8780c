"""The experiment registry and the shared result/verdict pieces."""

import dataclasses

import pytest

from hdopt.dynamics import registry
from hdopt.dynamics.registry import SCALES, Experiment, get, names, register
from hdopt.dynamics.results import Check, LabResult, within


def test_every_lab_experiment_is_registered_with_every_scale():
    assert sorted(names()) == ["eos", "equilibrium", "explr", "localsgd", "mirror", "sde"]
    for name in names():
        experiment = get(name)
        assert set(experiment.presets) == set(SCALES)
        assert dataclasses.is_dataclass(experiment.config("smoke"))


def test_duplicates_and_unknown_names_are_rejected():
    existing = get("mirror")
    with pytest.raises(ValueError, match="already registered"):
        register(existing)
    with pytest.raises(ValueError, match="unknown experiment 'nope'; choose one of"):
        get("nope")
    with pytest.raises(ValueError, match="lacks presets"):
        register(Experiment("partial", "", object, {"smoke": None}, print))
    assert "partial" not in registry.EXPERIMENTS


def test_config_overrides_and_bad_scale():
    experiment = get("explr")
    assert experiment.config("smoke", seed=7).seed == 7
    with pytest.raises(TypeError):
        experiment.config("smoke", not_a_field=1)
    with pytest.raises(ValueError, match="unknown scale"):
        experiment.config("huge")


@dataclasses.dataclass
class _Cfg:
    x: int = 1


def test_verdict_is_pass_only_when_every_check_passes(tmp_path):
    ok = Check("a", 2.0, 2.01, True, "within 5%")
    bad = Check("b", "< 1", 3.0, False, "< 1")
    assert LabResult("t", _Cfg(), [ok]).verdict().startswith("t: PASS")
    result = LabResult("t", _Cfg(), [ok, bad])
    assert not result.passed
    assert result.verdict() == ("t: FAIL | a: predicted 2, measured 2.01 (ok); "
                                "b: predicted < 1, measured 3 (FAIL)")
    path = result.write(tmp_path)
    assert path.name == "results.json" and (tmp_path / "config.json").exists()
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left nothing behind


def test_within():
    assert within(1.05, 1.0, 0.1) and not within(1.2, 1.0, 0.1) and not within(float("nan"), 1.0, 1.0)


def test_lab_set_flag_parses_each_field_like_its_preset():
    import argparse

    from hdopt.dynamics import cli

    parser = argparse.ArgumentParser()
    cli.configure(parser)
    args = parser.parse_args(["eos", "--scale", "smoke", "--set", "width=64", "lrs=0.1,0.2", "rel_tol=0.3"])
    config = cli.build_config(args)
    assert (config.width, config.lrs, config.rel_tol) == (64, (0.1, 0.2), 0.3)
    assert isinstance(config.width, int) and config.steps == get("eos").presets["smoke"].steps
    for bad, message in ((["nope=1"], "expected FIELD=VALUE"), (["width"], "expected FIELD=VALUE"),
                         (["width=wide"], "expected a int")):  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            cli.build_config(parser.parse_args(["eos", "--set", *bad]))
