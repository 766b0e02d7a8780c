"""``hdopt tasks``: the built-in list, and ``check`` printing splits, label-word tokens and prompts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hdopt.cli import main
from hdopt.lm.tasks import list_tasks
from tests.lm.conftest import byte_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("byte-tokenizer")
    byte_tokenizer(add_bos=True).save_pretrained(folder)
    return folder


def write(folder: Path, words: str) -> Path:
    (folder / "train.csv").write_text("stars,text\n5,loved it\n1,broke\n5,great value\n1,never arrived\n")
    (folder / "test.csv").write_text('1,awful\n5,"works, well"\n1,broke\n')
    (folder / "r.yaml").write_text(
        "name: reviews\ndata: {train: train.csv, eval: {path: test.csv, columns: [stars, text]}}\n"
        f'template: "Review: {{text}}\\nSentiment:"\nlabel_column: stars\nlabel_words: {words}\n'
    )
    return folder / "r.yaml"


def test_check_prints_splits_tokens_prompts_and_warnings(tmp_path, tokenizer_dir, capsys):
    path = write(tmp_path, '{"1": "bad", "5": " ok"}')
    assert main(["tasks", "check", str(path), "--model", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"task 'reviews' (hdopt task, {path})"
    assert out[1] == "kind: classification: 2 label words, mean per-token log-likelihood"
    assert out[3] == f"  train         4 examples  {tmp_path / 'train.csv'} (csv; utf-8)"
    assert out[4] == f"  eval          3 examples  {tmp_path / 'test.csv'} (csv; utf-8; columns stars,text)"
    assert out[5] == "eval prompts also in train: 1 of 3"
    ids = {w: byte_tokenizer(add_bos=True)(w, add_special_tokens=False).input_ids for w in ("bad", " ok")}
    assert out[7] == f"  'bad'            3 tokens  'b' + 'a' + 'd'  {ids['bad']}"
    assert out[8] == f"  ' ok'            3 tokens  ' ' + 'o' + 'k'  {ids[' ok']}"
    assert out[9] == "prompts (3 of eval; prompt + gold continuation):"
    assert out[10] == "  reviews/eval/0: 'Review: awful\\nSentiment:' + 'bad'"
    assert out[11] == "  reviews/eval/1: 'Review: works, well\\nSentiment:' + ' ok'"
    warnings = [line for line in out if line.startswith("warning: ")]
    assert warnings[0].startswith("warning: 1 eval prompts are also train prompts")
    assert any(w.startswith("warning: label word 'bad' has no leading space") for w in warnings)
    assert len(warnings) == 4  # shared prompt, two multi-token words, one missing space


def test_check_refuses_unusable_label_words(tmp_path, tokenizer_dir, capsys):
    assert main(["tasks", "check", str(write(tmp_path, '{"1": "", "5": " ok"}')), "--model",
                 str(tokenizer_dir)]) == 2  # fmt: skip
    assert "error: label word '' has no tokens: give it some text" in capsys.readouterr().out
    assert main(["tasks", "check", str(write(tmp_path, '{"1": " ok", "5": " ok"}'))]) == 2
    assert "hdopt tasks: task 'reviews' (" in capsys.readouterr().err
    assert main(["tasks", "check", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err == f"hdopt tasks: task file not found: {tmp_path / 'missing.yaml'}\n"


def test_list_and_builtin_check(data_dir, tokenizer_dir, capsys):
    assert main(["tasks"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^sst2 +SST-2 sentiment \(GLUE TSV: sentence, label\)$", out, re.M)
    assert len(out.splitlines()) == len(list_tasks()) + 2 and "hdopt tasks check" in out
    assert main(["tasks", "check", "cb", "--data-dir", str(data_dir), "--model", str(tokenizer_dir)]) == 0
    out = capsys.readouterr().out
    assert "  train       250 examples  cb/train.jsonl (jsonl; utf-8)" in out
    assert "  eval         56 examples  cb/val.jsonl (jsonl; utf-8)" in out
    assert "eval prompts also in train: 0 of 56" in out
