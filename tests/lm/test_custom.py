"""Custom tasks from YAML/JSON files: loading, errors naming file and line, and a full `hdopt eval` run."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from hdopt.cli import main
from hdopt.lm.evaluation import EvalConfig, run_eval
from hdopt.lm.tasks import (
    DataError,
    TaskError,
    TaskWarning,
    load_split,
    load_task_file,
    resolve_task,
    sample_protocol,
)
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


# --- data paths, per-file settings, pools minus test rows, header-less files, nested fields ---------------

BASIC = "template: '{text} It was'\nlabel_column: label\nlabel_words: {'0': ' bad', '1': ' good'}\n"


def _csv(path: Path, rows, header: bool = True, encoding: str = "utf-8") -> None:
    lines = (["label,text"] if header else []) + [f"{label},{text}" for label, text in rows]
    path.write_text("\n".join(lines) + "\n", encoding=encoding)


def test_data_paths_stay_inside_the_task_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("HDOPT_ALLOW_OUTSIDE_DATA", raising=False)
    secret = tmp_path / "secret.csv"
    secret.write_text("SECRET-FIRST-LINE\n")
    folder = tmp_path / "task"
    folder.mkdir()
    _csv(folder / "test.csv", [("0", "dull"), ("1", "fun")])
    (folder / "link.csv").symlink_to(secret)
    for data in ("../secret.csv", str(secret), "link.csv"):
        (folder / "t.yaml").write_text(f"name: t\ndata: {{train: '{data}', eval: test.csv}}\n{BASIC}")
        with pytest.raises(
            TaskError, match=r"t\.yaml:2: data file .* is outside the task file's folder"
        ) as info:
            load_task_file(folder / "t.yaml")
        assert "SECRET" not in str(info.value) and "--allow-outside-data" in str(info.value)
    allowed = load_task_file(folder / "t.yaml", allow_outside=True)  # the symlink, followed
    assert allowed.files["train"].path == str(secret.resolve())
    monkeypatch.setenv("HDOPT_ALLOW_OUTSIDE_DATA", "1")
    assert resolve_task(str(folder / "t.yaml")) == allowed


def test_a_dict_valued_field_is_not_pasted_into_the_prompt(tmp_path):
    (tmp_path / "d.jsonl").write_text(
        '{"text": {"a": [1, 2]}, "label": "1"}\n{"text": "fine", "label": "0"}\n'
    )
    (tmp_path / "d.yaml").write_text(f"name: d\ndata: {{train: d.jsonl, eval: d.jsonl}}\n{BASIC}")
    with pytest.raises(
        DataError, match=r"d\.jsonl:1: column 'text' holds a dict \(\{'a': \[1, 2\]\}\), not text"
    ):
        load_split(load_task_file(tmp_path / "d.yaml"), "eval")


def test_per_file_settings_and_a_pool_minus_the_test_rows(tmp_path):
    # an LM-BFF-style layout: all.txt (Latin-1, "label sentence" lines) holds every row; test.csv (UTF-8,
    # no header) holds the test rows; train = all minus test
    pool = [("1", "un film très réussi"), ("0", "plat et long"), ("1", "drôle"), ("0", "ennuyeux à mourir")]
    test = pool[1:3]
    (tmp_path / "all.txt").write_text(
        "".join(f"{label} {text}\n" for label, text in pool), encoding="latin-1"
    )
    _csv(tmp_path / "test.csv", test, header=False)
    spec = (
        "name: fr\ndata:\n  train: {path: all.txt, format: label_text, encoding: latin-1, minus: eval}\n"
        "  eval: {path: test.csv, columns: [label, sentence]}\n"
        "template: '{sentence} It was'\nlabel_column: label\nlabel_words: {'0': ' bad', '1': ' good'}\n"
    )
    (tmp_path / "fr.yaml").write_text(spec)
    task = load_task_file(tmp_path / "fr.yaml")
    assert task.files["train"].encoding == "latin-1" and task.files["eval"].encoding == "utf-8"
    train, evaluation = load_split(task, "train"), load_split(task, "eval")
    assert [e.prompt for e in evaluation] == ["plat et long It was", "drôle It was"]  # UTF-8 read right
    assert [e.prompt for e in train] == ["un film très réussi It was", "ennuyeux à mourir It was"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", TaskWarning)
        sample_protocol(train, evaluation, seed=0, num_train=4, num_dev=0)  # disjoint: no warning
    # the same pool without `minus` leaks the test rows into training, and says so
    (tmp_path / "fr.yaml").write_text(spec.replace(", minus: eval", ""))
    leaky = load_task_file(tmp_path / "fr.yaml")
    with pytest.warns(
        TaskWarning, match=r"task 'fr': 2 of the 2 eval prompts also appear in the train split"
    ):
        sample_protocol(load_split(leaky, "train"), load_split(leaky, "eval"), seed=0, num_train=4, num_dev=0)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ("{train: {path: a.csv, encodng: latin-1}, eval: a.csv}",
         r"data\.train: unknown key\(s\) encodng; valid: path, format, encoding, columns, minus"),
        ("{train: {format: csv}, eval: a.csv}", r"data\.train must be a file path or a mapping with 'path'"),
        ("{train: {path: a.csv, minus: test}, eval: a.csv}", r"data\.train: minus must name the other split"),
        ("{train: {path: a.csv, format: xlsx}, eval: a.csv}",
         r"data\.train: unknown format 'xlsx'; formats: jsonl, json, tsv, csv, label_text, squad, multirc"),
        ("{train: {path: a.csv, encoding: latin-9x}, eval: a.csv}", r"unknown encoding 'latin-9x'"),
        ("{train: a.csv, eval: {path: a.csv, columns: label}}", r"columns must be a list of column names"),
    ],
)  # fmt: skip
def test_per_file_mapping_errors(tmp_path, data, message):
    (tmp_path / "t.yaml").write_text(f"name: t\ndata: {data}\n{BASIC}")
    with pytest.raises(TaskError, match=message):
        load_task_file(tmp_path / "t.yaml")


def test_header_problems_name_columns(tmp_path):
    _csv(tmp_path / "train.csv", [("0", "dull"), ("1", "fun")])
    _csv(tmp_path / "test.csv", [("0", "slow"), ("1", "bright")], header=False)
    (tmp_path / "t.yaml").write_text(f"name: t\ndata: {{train: train.csv, eval: test.csv}}\n{BASIC}")
    task = load_task_file(tmp_path / "t.yaml")
    expected = (
        r"test\.csv:1: the first line was read as the header \(0, slow\), but task 't' reads the "
        r"column\(s\) label, text\. If the file has no header line, name its columns with `columns: \[...\]`"
    )
    with pytest.raises(DataError, match=expected):
        load_split(task, "eval")
    # the other way round: `columns:` given for a file that has a header
    (tmp_path / "t.yaml").write_text(
        f"name: t\ndata: {{train: train.csv, eval: test.csv}}\ncolumns: [label, text]\n{BASIC}"
    )
    with pytest.raises(
        DataError, match=r"train\.csv:1: this line repeats the column names \['label', 'text'\]"
    ):
        load_split(load_task_file(tmp_path / "t.yaml"), "train")
    (tmp_path / "dup.csv").write_text("a,a\n1,x\n")
    (tmp_path / "t.yaml").write_text(f"name: t\ndata: {{train: dup.csv, eval: dup.csv}}\n{BASIC}")
    with pytest.raises(
        DataError, match=r"dup\.csv:1: the first line is read as the header but has the repeated"
    ):
        load_split(load_task_file(tmp_path / "t.yaml"), "eval")


def test_unreadable_files_are_data_errors(tmp_path, monkeypatch):
    from hdopt.lm.tasks import readers

    (tmp_path / "d.json").write_text('[{"text": "très bien", "label": "1"}]', encoding="latin-1")
    (tmp_path / "t.yaml").write_text(f"name: t\ndata: {{train: d.json, eval: d.json}}\nformat: json\n{BASIC}")
    task = load_task_file(tmp_path / "t.yaml")
    with pytest.raises(DataError, match=r"d\.json: cannot decode as utf-8 .*; set its encoding"):
        load_split(task, "eval")

    def denied(path, spec):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setitem(readers.READERS, "json", denied)
    with pytest.raises(DataError, match=r"d\.json: cannot read the file \(Permission denied\)"):
        load_split(task, "eval")
