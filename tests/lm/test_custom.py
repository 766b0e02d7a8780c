"""Custom tasks from YAML/JSON files: loading, errors naming file and line, and a full `hdopt eval` run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hdopt.cli import main
from hdopt.lm.evaluation import EvalConfig, run_eval
from hdopt.lm.tasks import TaskError, load_split, load_task_file, resolve_task
from tests.lm.conftest import byte_tokenizer, tiny_model

REVIEWS = [("5", "loved it, would buy again"), ("1", "broke after a day"), ("5", "great value"),
           ("1", 'awful, "cheap" plastic'), ("5", "works as described"), ("1", "never arrived")]  # fmt: skip
TASK_YAML = """\
name: Reviews
description: product reviews, stars 1 or 5
data: {train: train.csv, eval: test.csv}
template: "Review: {text}\\nSentiment:"
label_column: stars
label_words: {"1": " bad", "5": " good"}
"""


@pytest.fixture
def reviews_task(tmp_path: Path) -> Path:
    for name, rows in (("train.csv", REVIEWS), ("test.csv", REVIEWS[::-1])):
        lines = ["stars,text"] + [f'{stars},"{text.replace(chr(34), chr(34) * 2)}"' for stars, text in rows]
        (tmp_path / name).write_text("\n".join(lines) + "\n")
    (tmp_path / "reviews.yaml").write_text(TASK_YAML)
    return tmp_path / "reviews.yaml"


def test_yaml_task_loads_like_a_builtin(reviews_task):
    task = load_task_file(reviews_task)
    assert (task.name, task.label_words, task.label_values) == ("reviews", (" bad", " good"), ("1", "5"))
    examples = load_split(task, "eval")  # paths are relative to the task file, no data dir needed
    assert [e.label for e in examples] == [0, 1, 0, 1, 0, 1]
    assert examples[2].prompt == 'Review: awful, "cheap" plastic\nSentiment:'
    assert examples[2].options == (" bad", " good")
    assert resolve_task(str(reviews_task)) == task


def test_json_generation_task_and_single_file_split(tmp_path):
    rows = [{"q": f"what is {i}+{i}?", "a": str(2 * i)} for i in range(10)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "sums",
        "data": "sums.jsonl",
        "template": "Q: {q}\nA:",
        "target_column": "a",
        "metric": "f1",
    }
    (tmp_path / "sums.json").write_text(json.dumps(spec))
    task = load_task_file(tmp_path / "sums.json")
    train, test = load_split(task, "train"), load_split(task, "eval")
    assert [e.answers for e in train] == [(str(2 * i),) for i in range(0, 10, 2)]  # one file: alternate rows
    assert [e.target for e in test] == [f" {2 * i}\n" for i in range(1, 10, 2)]
    assert test[0].prompt == "Q: what is 1+1?\nA:"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: t\ndata: x.csv\ntemplate: '{a}'\nlabel_words: [' a']\nlables: y\n",
         r"reviews\.yaml:5: unknown key\(s\) lables; valid: columns, data, description,"),
        ("name: t\ndata: x.csv\ntemplate: '{a}'\n  bad: indent\n", r"reviews\.yaml:4: invalid YAML"),
        ("name: t\ntemplate: '{a}'\ntarget_column: y\n", r"reviews\.yaml: missing required key 'data'"),
        ("name: t\ndata: x.csv\ntemplate: '{a}'\nlabel_column: y\nlabel_words: [' a', ' b']\n",
         r"reviews\.yaml:5: label_words must map raw label -> word, or be a list with label_values"),
        ("name: t\ndata: x.csv\ntemplate: '{a}'\ntarget_column: y\nprepare: nope\n",
         r"reviews\.yaml:5: unknown row function 'nope'; known: boolq, copa,"),
        ("name: t\ndata: x.csv\ntemplate: '{a}'\nlabel_column: y\n",
         r"task 't' \(.*reviews\.yaml\): give exactly one of label_words, options_column or target_column"),
    ],
)  # fmt: skip
def test_bad_task_files_name_file_and_line(tmp_path, text, message):
    path = tmp_path / "reviews.yaml"
    path.write_text(text)
    with pytest.raises(TaskError, match=message):
        load_task_file(path)


def test_custom_task_through_run_eval(reviews_task, tmp_path):
    model, tokenizer = tiny_model("llama"), byte_tokenizer(add_bos=True)
    cfg = EvalConfig(task=str(reviews_task), method="icl", num_demos=2, num_train=6, num_dev=0,
                     output_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    results, out = run_eval(cfg, model, tokenizer)
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == results["num_eval"] == 6 and results["num_demos"] == 2
    assert results["accuracy"] == pytest.approx(100 * sum(p["correct"] for p in predictions) / 6, abs=0.01)
    assert json.loads((out / "config.json").read_text())["task"] == str(reviews_task)
    assert json.loads((out / "results.json").read_text()) == results
    assert results["prefix_tokens"] > 0 and not results["prefix_truncated"]


def test_cli_eval_custom_task_with_local_model(reviews_task, tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer(add_bos=True).save_pretrained(folder)
    code = main(["eval", "--model", str(folder), "--task", str(reviews_task), "--num-eval", "4",
                 "--output-dir", str(tmp_path / "run"), "--no-progress"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert (
        out.splitlines()[0]
        == "| task | model | method | num_eval | num_demos | accuracy | tokens_per_second | seconds |"
    )
    assert f"| reviews | {folder} | zero-shot | 4 | 0 |" in out
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "predictions.jsonl",
        "results.json",
    ]


def test_cli_eval_errors(capsys, tmp_path):
    assert main(["eval", "--task", "sst-3"]) == 2
    assert "hdopt eval: unknown task 'sst-3'; built-in tasks: boolq, cb, copa," in capsys.readouterr().err
    assert main(["eval", "--task", "cb", "--data-dir", str(tmp_path)]) == 2
    assert (
        f"hdopt eval: task 'cb': eval file {tmp_path / 'cb/val.jsonl'} not found" in capsys.readouterr().err
    )


def test_generation_task_through_run_eval(tmp_path):
    rows = [{"q": f"what is {i}+{i}?", "a": str(2 * i)} for i in range(12)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = {
        "name": "sums",
        "data": "sums.jsonl",
        "template": "Q: {q}\nA:",
        "target_column": "a",
        "metric": "f1",
    }
    (tmp_path / "sums.json").write_text(json.dumps(spec))
    cfg = EvalConfig(task=str(tmp_path / "sums.json"), method="icl", num_demos=1, num_dev=0, max_new_tokens=6,
                     batch_size=4, output_dir=str(tmp_path / "run"), progress=False)  # fmt: skip
    results, out = run_eval(cfg, tiny_model("gpt2"), byte_tokenizer(add_bos=False))
    predictions = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(p["uid"] for p in predictions) == [f"sums/eval/{i}" for i in range(6)]
    for p in predictions:  # eval row k is file row 2k+1 (one file: alternate rows), whose answer is 2(2k+1)
        assert p["answers"] == [str(2 * (2 * int(p["uid"].rsplit("/", 1)[1]) + 1))]
    assert results["f1"] == pytest.approx(100 * sum(p["f1"] for p in predictions) / 6, abs=0.01)
    assert results["metric"] == "f1" and "em" in results
