"""Loaders on ../shared/data (row counts from MANIFEST.json), sampling protocols, and bad-file errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from hdopt.lm.tasks import DataError, get_task, load_split, sample_per_class, sample_protocol
from hdopt.lm.tasks.data import resolve_data_dir

# task -> split -> the MANIFEST file whose row count is the number of examples
COUNTED = {
    "sst2": {"train": "sst2/train.tsv", "eval": "sst2/dev.tsv"},
    "sst5": {"train": "sst5/train.txt", "eval": "sst5/test.csv"},
    "rte": {"train": "rte/train.jsonl", "eval": "rte/val.jsonl"},
    "cb": {"train": "cb/train.jsonl", "eval": "cb/val.jsonl"},
    "boolq": {"train": "boolq/train.jsonl", "eval": "boolq/val.jsonl"},
    "wsc": {"train": "wsc/train.jsonl", "eval": "wsc/val.jsonl"},
    "wic": {"train": "wic/train.jsonl", "eval": "wic/val.jsonl"},
    "copa": {"train": "copa/train.jsonl", "eval": "copa/val.jsonl"},
    "mr": {"eval": "mr/test.csv"},
    "cr": {"eval": "cr/test.csv"},
}


def manifest_rows(data_dir: Path) -> dict[str, int]:
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())
    return {entry["file"]: entry["rows"] for entry in manifest["files"]}


@pytest.mark.parametrize("task", sorted(COUNTED))
def test_split_sizes_match_manifest(task, data_dir):
    rows = manifest_rows(data_dir)
    for split, file in COUNTED[task].items():
        assert len(load_split(get_task(task), split, data_dir)) == rows[file], (task, split)


def test_derived_splits(data_dir):
    rows = manifest_rows(data_dir)
    # LM-BFF train = all minus test: 8,662 (MR) and 1,775 (CR) rows
    assert (
        len(load_split(get_task("mr"), "train", data_dir)) == rows["mr/all.txt"] - rows["mr/test.csv"] == 8662
    )
    assert (
        len(load_split(get_task("cr"), "train", data_dir)) == rows["cr/all.txt"] - rows["cr/test.csv"] == 1775
    )
    # SQuAD: only dev.json offline; even articles train, odd articles eval, together every question once
    train, test = (load_split(get_task("squad"), s, data_dir) for s in ("train", "eval"))
    assert len(train) + len(test) == rows["squad/dev.json"] == 10570
    assert {e.fields["title"] for e in train}.isdisjoint(e.fields["title"] for e in test)
    # MultiRC: one example per answer option (27,243 train / 4,848 val in the manifest notes)
    assert len(load_split(get_task("multirc"), "eval", data_dir)) == 4848


def test_real_rows_render_exactly(data_dir):
    rte = load_split(get_task("rte"), "eval", data_dir)[0]
    assert rte.prompt == (
        "Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at age 44, "
        "according to the Christopher Reeve Foundation.\n"
        'Does this mean that "Christopher Reeve had an accident." is true? Yes or No?\n'
    )
    assert rte.label == 1  # not_entailment -> "No"
    copa = load_split(get_task("copa"), "eval", data_dir)[0]
    assert (copa.prompt, copa.options, copa.label) == (
        "The man turned on the faucet so",
        (" the toilet filled with water.", " water flowed from the spout."),
        1,
    )


def test_protocol_sizes_and_determinism(data_dir):
    cb = get_task("cb")
    train, test = load_split(cb, "train", data_dir), load_split(cb, "eval", data_dir)
    splits = sample_protocol(train, test, seed=1, num_dev=cb.num_dev)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (150, 100, 56)
    assert {e.uid for e in splits.train}.isdisjoint(e.uid for e in splits.dev)
    again = sample_protocol(train, test, seed=1, num_dev=cb.num_dev)
    assert [e.uid for e in again.train] == [e.uid for e in splits.train]
    other = sample_protocol(train, test, seed=2, num_dev=cb.num_dev)
    assert [e.uid for e in other.train] != [e.uid for e in splits.train]
    wsc = get_task("wsc")
    splits = sample_protocol(load_split(wsc, "train", data_dir), load_split(wsc, "eval", data_dir), seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (54, 500, 104)  # "WSC trains on 54"
    sst2 = get_task("sst2")
    splits = sample_protocol(load_split(sst2, "train", data_dir), load_split(sst2, "eval", data_dir), seed=0)
    assert (len(splits.train), len(splits.dev), len(splits.eval)) == (1000, 500, 872)


def test_k_shot_per_class(data_dir):
    examples = load_split(get_task("cb"), "train", data_dir)
    shots = sample_per_class(examples, 16, seed=13)
    assert sorted(e.label for e in shots) == [0] * 16 + [1] * 16 + [2] * 16
    assert [e.uid for e in shots] == [e.uid for e in sample_per_class(examples, 16, seed=13)]


def test_data_dir_env(monkeypatch, data_dir):
    monkeypatch.setenv("HDOPT_DATA_DIR", str(data_dir))
    assert resolve_data_dir() == data_dir
    assert resolve_data_dir("/elsewhere") == Path("/elsewhere")
    assert len(load_split(get_task("cb"), "eval")) == 56


def _copy_task_files(data_dir: Path, tmp_path: Path, task: str) -> Path:
    shutil.copytree(data_dir / task, tmp_path / task)
    return tmp_path / task


def test_bad_label_names_file_and_line(data_dir, tmp_path):
    folder = _copy_task_files(data_dir, tmp_path, "rte")
    lines = (folder / "val.jsonl").read_text().splitlines()
    row = json.loads(lines[2])
    row["label"] = "maybe"
    lines[2] = json.dumps(row)
    (folder / "val.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("rte"), "eval", tmp_path)
    assert str(info.value) == (
        f"{folder / 'val.jsonl'}:3: label 'maybe' is not one of ['entailment', 'not_entailment'] (task 'rte')"
    )


def test_bad_files_name_file_and_line(data_dir, tmp_path):
    folder = _copy_task_files(data_dir, tmp_path, "sst2")
    with open(folder / "dev.tsv", "a") as handle:
        handle.write("a sentence without a label\n")
    with pytest.raises(DataError) as info:
        load_split(get_task("sst2"), "eval", tmp_path)
    assert str(info.value) == f"{folder / 'dev.tsv'}:874: expected 2 columns (sentence, label), found 1"
    folder = _copy_task_files(data_dir, tmp_path, "cb")
    with open(folder / "val.jsonl", "a") as handle:
        handle.write("{not json\n")
    with pytest.raises(DataError, match=r"val\.jsonl:57: invalid JSON"):
        load_split(get_task("cb"), "eval", tmp_path)
    with pytest.raises(DataError) as info:
        load_split(get_task("boolq"), "eval", tmp_path)
    assert str(info.value).startswith(f"task 'boolq': eval file {tmp_path / 'boolq/val.jsonl'} not found")
