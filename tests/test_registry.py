"""hdopt.registry.Registry, and that each registry built on it keeps its names and messages."""

from __future__ import annotations

import pytest

from hdopt.registry import Registry


class ThingError(ValueError):
    pass


def test_register_get_names_and_membership():
    things = Registry[int]("thing")
    assert things.register("b", 2) == 2 and things.register("a", 1) == 1
    assert things.get("a") == 1 and "a" in things and "c" not in things and 3 not in things
    assert things.names() == ["b", "a"] == list(things) and things.values() == [2, 1] and len(things) == 2
    things.unregister("b")
    things.unregister("never-registered")  # no error
    assert things.names() == ["a"]


def test_duplicates_are_refused_and_the_first_entry_kept():
    things = Registry[int]("thing", error=ThingError, origin=lambda n: f"source {n}")
    things.register("a", 1)
    with pytest.raises(ThingError) as info:
        things.register("a", 2)
    assert str(info.value) == "thing 'a' is already registered (by source 1)"
    assert things.get("a") == 1


def test_unknown_names_list_the_known_ones():
    things = Registry[int]("thing", error=ThingError)
    things.register("b", 2)
    things.register("a", 1)
    with pytest.raises(ThingError) as info:
        things.get("c")
    assert str(info.value) == "unknown thing 'c'; choose one of a, b"
    ordered = Registry[int]("experiment", listing="known:", hint=" (or a file)", sort=False)
    ordered.register("z", 0)
    ordered.register("y", 0)
    with pytest.raises(ValueError) as info:
        ordered.get("x")
    assert str(info.value) == "unknown experiment 'x'; known: z, y (or a file)"


def test_case_insensitive_names():
    tasks = Registry[str]("task", case_sensitive=False)
    tasks.register("SST2", "x")
    assert tasks.get("sst2") == "x" and "Sst2" in tasks and tasks.names() == ["sst2"]
    with pytest.raises(ValueError, match="already registered"):
        tasks.register("sst2", "y")


def test_the_registries_built_on_it():
    from hdopt.dynamics.registry import EXPERIMENTS
    from hdopt.dynamics.registry import names as experiment_names
    from hdopt.finetune.methods import METHODS, MethodError, get_method
    from hdopt.lm.models import PACKAGED, ModelLoadError
    from hdopt.lm.tasks import get_task
    from hdopt.lm.tasks.base import TASKS, TaskError
    from hdopt.lm.tasks.rows import ROW_FUNCTIONS, get_row_function

    assert "mezo" in METHODS and get_method("mezo").trainer == "zo"
    with pytest.raises(MethodError, match="unknown method 'meso'; choose one of .*mezo"):
        get_method("meso")
    assert "sst2" in TASKS and get_task("SST2") is get_task("sst2")
    with pytest.raises(TaskError, match=r"\(or pass a task file"):
        get_task("sst-3")
    assert "strip_text" in ROW_FUNCTIONS and get_row_function("strip_text")({"a": " x "}) == {"a": "x"}
    with pytest.raises(ModelLoadError, match="is already registered"):
        PACKAGED.register("smollm2-135m", PACKAGED.get("smollm2-135m"))
    assert experiment_names() == EXPERIMENTS.names() and "eos" in EXPERIMENTS
