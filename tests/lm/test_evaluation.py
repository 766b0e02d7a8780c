"""run_eval checks its inputs before the first forward pass, writes predictions as it goes, names the
options in them, and says when it cuts demonstrations or prompts."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from hdopt.cli import main
from hdopt.lm.evaluation import EvalConfig, EvalError, run_eval
from hdopt.lm.scoring import encode_options
from hdopt.lm.tasks import DataError, TaskError, TaskWarning, load_split, load_task_file
from tests.lm.conftest import byte_tokenizer, tiny_model

ROWS = [("5", "loved it"), ("1", "broke at once"), ("5", "great value"), ("1", "never arrived")] * 2
TEST_ROWS = [("1", "awful"), ("5", "works well"), ("1", "cheap plastic"), ("5", "as described")] * 2


def write_task(folder: Path, spec: str = "", rows=ROWS, test_rows=None) -> Path:
    """A reviews task (stars 1/5 -> ' bad'/' good') with train.csv and test.csv in ``folder``."""
    for name, data in (("train.csv", rows), ("test.csv", TEST_ROWS if test_rows is None else test_rows)):
        (folder / name).write_text("stars,text\n" + "".join(f"{s},{t}\n" for s, t in data))
    spec = spec or 'label_words: {"1": " bad", "5": " good"}\n'
    body = "name: reviews\ndata: {train: train.csv, eval: test.csv}\ntemplate: '{text} It was'\n"
    (folder / "reviews.yaml").write_text(body + "label_column: stars\n" + spec)
    return folder / "reviews.yaml"


class CountingModel(torch.nn.Module):
    """Wraps a tiny model; counts forward calls and can fail on the n-th one (a crash mid-run)."""

    def __init__(self, fail_on: int | None = None):
        super().__init__()
        self.inner = tiny_model("llama")
        self.config = self.inner.config
        self.calls, self.fail_on = 0, fail_on

    def get_input_embeddings(self):
        return self.inner.get_input_embeddings()

    def forward(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.inner(**kwargs)


def config(task: Path, out: Path, **changes) -> EvalConfig:
    return EvalConfig(task=str(task), output_dir=str(out), progress=False, **changes)


def test_unwritable_output_folder_fails_before_any_forward_pass(tmp_path):
    task = write_task(tmp_path)
    (tmp_path / "a-file").write_text("x")
    model = CountingModel()
    with pytest.raises(
        EvalError, match=r"cannot write the run folder .*a-file/run .*choose a writable --output-dir"
    ):
        run_eval(config(task, tmp_path / "a-file" / "run"), model, byte_tokenizer(add_bos=True))
    assert model.calls == 0


def test_empty_evaluation_file_is_refused_when_loaded(tmp_path):
    task = load_task_file(write_task(tmp_path, test_rows=[]))
    with pytest.raises(DataError, match=r"task 'reviews': the eval split \(.*test\.csv\) has no examples"):
        load_split(task, "eval")  # hdopt finetune loads its splits before the first training step
    assert len(load_split(task, "train")) == len(ROWS)


def test_max_length_too_small_says_so_before_any_forward_pass(tmp_path):
    task = write_task(tmp_path)
    model, out = CountingModel(), tmp_path / "run"
    expected = (
        r"--max-length 1 leaves no room: the longest option ' good' is 5 token\(s\) and the prompt needs at "
        r"least one more; use --max-length 6 or more"
    )
    with pytest.raises(EvalError, match=expected):
        run_eval(config(task, out, max_length=1), model, byte_tokenizer(add_bos=True))
    assert model.calls == 0 and not out.exists()  # a run that never started leaves no folder behind
    with pytest.raises(
        ValueError, match=r"max_length 1 leaves no room: a row needs at least one prompt token"
    ):
        encode_options(byte_tokenizer(add_bos=True), ["It was"], [[" bad", " good"]], [0], max_length=1)


def test_predictions_are_written_as_the_run_goes(tmp_path):
    task, out = write_task(tmp_path), tmp_path / "run"
    model = CountingModel(fail_on=2)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_eval(config(task, out, batch_size=3), model, byte_tokenizer(add_bos=True))
    written = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(written) == 3  # the first batch survived the crash
    assert (out / "config.json").is_file() and not (out / "results.json").exists()


def test_predictions_name_the_options(tmp_path):
    task, out = write_task(tmp_path), tmp_path / "run"
    results, _ = run_eval(config(task, out), tiny_model("llama"), byte_tokenizer(add_bos=True))
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert sorted(r["uid"] for r in rows) == sorted(f"reviews/eval/{i}" for i in range(len(TEST_ROWS)))
    gold = {"1": " bad", "5": " good"}
    for row in rows:  # the uid's number is the row of test.csv
        stars = TEST_ROWS[int(row["uid"].rsplit("/", 1)[1])][0]
        assert row["label"] == gold[stars] and row["label_index"] == (stars == "5")
        assert row["prediction"] == [" bad", " good"][row["prediction_index"]]
        assert row["correct"] == (row["prediction"] == row["label"]) and len(row["scores"]) == 2
    assert set(results["prediction_share"]) <= {" bad", " good"}


def test_icl_that_cuts_its_demonstrations_warns(tmp_path):
    task = write_task(tmp_path)
    cfg = config(task, tmp_path / "run", method="icl", num_demos=8, num_dev=0, max_length=60)
    with pytest.warns(
        TaskWarning, match=r"ICL: the 8 demonstrations are \d+ tokens; only their last \d+ fit"
    ):
        results, _ = run_eval(cfg, tiny_model("llama"), byte_tokenizer(add_bos=True))
    assert results["prefix_truncated"] is True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", TaskWarning)
        results, _ = run_eval(config(task, tmp_path / "run2", method="icl", num_demos=2, num_dev=0),
                              tiny_model("llama"), byte_tokenizer(add_bos=True))  # fmt: skip
    assert results["prefix_truncated"] is False
    assert not [w for w in caught if "ICL:" in str(w.message)]


def test_label_words_are_checked(tmp_path):
    tokenizer = byte_tokenizer(add_bos=True)
    with pytest.raises(TaskError, match=r"two classes share the label word\(s\) ' ok'"):
        load_task_file(write_task(tmp_path, 'label_words: {"1": " ok", "5": " ok"}\n'))
    task = write_task(tmp_path, 'label_words: {"1": "bad", "5": " good"}\n')
    with pytest.warns(TaskWarning) as caught:
        run_eval(config(task, tmp_path / "run"), tiny_model("llama"), tokenizer)
    messages = [str(w.message) for w in caught]
    assert any(
        "label word 'bad' has no leading space, and prompts end without one (e.g. " in m for m in messages
    )
    assert any("label word ' good' is 5 tokens (' ' + 'g' + 'o' + 'o' + 'd')" in m for m in messages)
    assert not any("label word ' good' has no leading space" in m for m in messages)


def test_cli_prints_warnings_as_one_line_each(tmp_path, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer(add_bos=True).save_pretrained(folder)
    task = write_task(tmp_path, test_rows=ROWS)  # the test rows are the train rows
    code = main(["eval", "--model", str(folder), "--task", str(task), "--method", "icl", "--num-demos", "8",
                 "--num-dev", "0", "--max-length", "60", "--output-dir", str(tmp_path / "run"),
                 "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0
    assert "hdopt eval: warning: ICL: the 8 demonstrations are" in err
    assert (
        "hdopt eval: warning: task 'reviews': 8 of the 8 eval prompts also appear in the train split" in err
    )
    assert main(["eval", "--model", str(folder), "--task", str(task), "--max-length", "1",
                 "--output-dir", str(tmp_path / "run2")]) == 2  # fmt: skip
    last = capsys.readouterr().err.rstrip().splitlines()[-1]  # after transformers' loading bar
    assert last.startswith("hdopt eval: --max-length 1 leaves no room: the longest option ' good' is 5 token")
