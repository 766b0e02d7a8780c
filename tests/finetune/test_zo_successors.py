"""``hdopt finetune --optimizer fzoo|hizoo|lozo|sparse-mezo``: the post-MeZO rules run through the CLI and
replay bitwise (run folders without weights: replay rebuilds them from the trajectory)."""

from __future__ import annotations

import json

import pytest

from hdopt.finetune import cli, cli_replay, rundir

from .test_cli import _toy_flags, parse

FLAGS = {
    "fzoo": ["--q", "4", "--lr", "1e-3"],  # one-sided Rademacher: its paper_defaults
    "hizoo": ["--lr", "1e-3"],
    "lozo": ["--lr", "1e-3"],
    "sparse-mezo": ["--lr", "1e-3"],
}


@pytest.mark.parametrize("name", FLAGS)
def test_the_cli_trains_with_the_optimizer_and_replays_its_run(name, task_file, model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    flags = ["--method", "mezo", "--steps", "3", "--eval-every", "0", "--optimizer", name, *FLAGS[name]]
    assert cli.run(parse(cli, [*flags, *_toy_flags(task_file, model_dir, out)])) == 0
    assert json.loads((out / rundir.CONFIG).read_text())["method"]["optimizer"] == name
    capsys.readouterr()
    assert cli_replay.run(parse(cli_replay, [str(out), "--output", str(tmp_path / "w.safetensors")])) == 0
    assert "bitwise identical" in capsys.readouterr().out


def test_an_estimator_the_rule_cannot_use_exits_2_naming_it(task_file, model_dir, tmp_path, capsys):
    flags = ["--method", "mezo", "--steps", "1", "--optimizer", "fzoo", "--q", "4", "--estimator", "central"]
    assert cli.run(parse(cli, [*flags, *_toy_flags(task_file, model_dir, tmp_path)])) == 2
    assert "use estimator='one-sided'" in capsys.readouterr().err
