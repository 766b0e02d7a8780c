"""``hdopt finetune`` / ``compare`` / ``replay`` through their configure/run entry points."""

from __future__ import annotations

import argparse
import json

from hdopt.finetune import cli, cli_compare, cli_replay, rundir


def parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.configure(parser)
    return parser.parse_args(argv)


def _toy_flags(task_file, model_dir, out) -> list[str]:
    return ["--model", str(model_dir), "--task", str(task_file), "--num-train", "16", "--num-dev", "8",
            "--num-eval", "8", "--max-length", "32", "--batch-size", "8", "--output-dir", str(out),
            "--no-progress"]  # fmt: skip


def test_flags_cover_every_config_field():
    args = parse(cli, ["--lr", "1e-6", "--lora-targets", "q_proj", "k_proj", "--no-keep-best", "--q", "2"])
    expected = {"lr": 1e-6, "lora_targets": ["q_proj", "k_proj"], "keep_best": False, "q": 2}
    assert cli.config_overrides(args) == expected


def test_config_file_then_flags(task_file, model_dir, tmp_path, capsys):
    yaml_path = tmp_path / "run.yaml"
    yaml_path.write_text("method: {method: mezo}\noptim: {lr: 0.01}\ntrain: {steps: 5, eval_every: 2}\n")
    out = tmp_path / "run"
    argv = ["--config", str(yaml_path), "--steps", "3", *_toy_flags(task_file, model_dir, out)]
    assert cli.run(parse(cli, argv)) == 0
    saved = json.loads((out / rundir.CONFIG).read_text())
    assert saved["train"]["steps"] == 3 and saved["optim"]["lr"] == 0.01 and saved["train"]["eval_every"] == 2
    assert "test accuracy" in capsys.readouterr().out
    assert cli.run(parse(cli, ["--resume", str(out), "--lr", "1.0"])) == 2
    assert "keeps its config" in capsys.readouterr().err

    assert cli_replay.run(parse(cli_replay, [str(out), "--output", str(tmp_path / "w.safetensors")])) == 0
    assert "bitwise identical" in capsys.readouterr().out and (tmp_path / "w.safetensors").is_file()

    ft = tmp_path / "ft"
    assert cli.run(parse(cli, ["--method", "ft", "--steps", "2", *_toy_flags(task_file, model_dir, ft)])) == 0
    capsys.readouterr()
    assert cli_compare.run(parse(cli_compare, [str(out), str(ft), "--sort", "method"])) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| run | method") and len(table) == 4
    assert "| ft |" in table[2] and "| mezo |" in table[3] and "MiB" in table[2]


def test_user_errors_exit_2_with_a_message(task_file, model_dir, tmp_path, capsys):
    assert cli.run(parse(cli, ["--method", "meso", *_toy_flags(task_file, model_dir, tmp_path)])) == 2
    assert "unknown method 'meso'" in capsys.readouterr().err
    assert cli_compare.run(parse(cli_compare, [str(tmp_path / "nothing")])) == 2
    assert cli_replay.run(parse(cli_replay, [str(tmp_path / "nothing")])) == 2
