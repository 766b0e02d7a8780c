"""lm-evaluation-harness task files: the same examples and numbers as the built-in tasks, the harness's
field rules (Jinja, delimiters, splits, generation stops), and every unsupported field refused by name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from hdopt.cli import main
from hdopt.lm import evaluation
from hdopt.lm.evaluation import EvalConfig, choose_demonstrations, evaluate, run_eval
from hdopt.lm.generation import greedy_generate
from hdopt.lm.tasks import DataError, TaskError, get_task, load_split, load_task_file
from tests.lm.conftest import DATA_DIR, byte_tokenizer, tiny_model

SST2_YAML = """\
task: sst2_harness
dataset_path: csv
dataset_kwargs:
  data_files: {{train: {data}/sst2/train.tsv, validation: {data}/sst2/dev.tsv}}
  delimiter: "\\t"
training_split: train
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{sentence | trim}}}} It was"
doc_to_choice: [terrible, great]
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""
BOOLQ_YAML = """\
task: boolq_harness
dataset_path: json
dataset_kwargs:
  data_files: {{train: {data}/boolq/train.jsonl, validation: {data}/boolq/val.jsonl}}
training_split: train
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{% set q = question | trim %}}{{{{passage}}}} {{{{q[:1] | upper}}}}{{{{q[1:]}}}}\\
  {{{{'' if q.endswith('?') else '?'}}}}\\n"
target_delimiter: ""
doc_to_choice: ["Yes", "No"]
doc_to_target: "{{{{0 if label else 1}}}}"
"""


def harness_file(tmp_path: Path, text: str, name: str = "task.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.format(data=DATA_DIR))
    return path


@pytest.mark.parametrize(
    ("builtin", "text", "splits"), [("sst2", SST2_YAML, ("eval",)), ("boolq", BOOLQ_YAML, ("eval", "train"))]
)
def test_harness_files_give_the_builtin_examples(builtin, text, splits, data_dir, tmp_path):
    task = load_task_file(harness_file(tmp_path, text), allow_outside=True)
    assert task.option_score == "sum" and task.metric == "accuracy" and task.doc is not None
    for split in splits:  # every example (SST-2 train, 67k rows, reads like its dev split: skipped for time)
        mine, theirs = load_split(task, split), load_split(get_task(builtin), split, data_dir)
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs, strict=True):
            assert (a.prompt, a.options, a.label, a.target) == (b.prompt, b.options, b.label, b.target)


@pytest.mark.integration
def test_harness_files_give_the_builtin_zero_shot_numbers(data_dir, tmp_path, smollm2):
    """SmolLM2 zero-shot: 32 SST-2 test examples through run_eval, and the 8 shortest BoolQ ones (long
    passages are slow on a CPU) through evaluate: the same accuracy and the same per-example scores
    (one-token label words, so the harness's summed score equals hdopt's mean)."""
    model, tokenizer = smollm2
    outcome = {}
    for name, task in (("builtin", "sst2"), ("harness", str(harness_file(tmp_path, SST2_YAML)))):
        cfg = EvalConfig(task=task, num_eval=32, data_dir=str(data_dir), output_dir=str(tmp_path / name),
                         progress=False, allow_outside_data=True)  # fmt: skip
        results, out = run_eval(cfg, model, tokenizer)
        rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
        per_example = [(r["uid"].rsplit("/", 1)[1], r["label"], r["prediction"], r["scores"]) for r in rows]
        outcome[name] = (results["accuracy"], per_example)
    assert outcome["harness"] == outcome["builtin"] and len(outcome["builtin"][1]) == 32
    harness = load_task_file(harness_file(tmp_path, BOOLQ_YAML), allow_outside=True)
    pools = [load_split(t, "eval", data_dir) for t in (get_task("boolq"), harness)]
    shortest = sorted(range(len(pools[0])), key=lambda i: len(pools[0][i].prompt))[:8]
    cfg = EvalConfig(progress=False).for_task(harness)
    results = [evaluate(model, tokenizer, t, [p[i] for i in shortest], [], cfg)
               for t, p in zip((get_task("boolq"), harness), pools, strict=True)]  # fmt: skip
    assert results[0].metrics == results[1].metrics
    assert [r["scores"] for r in results[0].predictions] == [r["scores"] for r in results[1].predictions]


def test_multiple_choice_acc_is_the_summed_log_likelihood(tmp_path):
    rows = [{"q": f"pick {i}", "answer": i % 3, "opts": ["a", "bcd", "efghij"]} for i in range(6)]
    (tmp_path / "mc.json").write_text(json.dumps(rows))  # a JSON array, as the hub's json loader reads it
    (tmp_path / "mc.yaml").write_text(
        "task: mc\ndataset_path: json\ndataset_kwargs: {data_files: mc.json}\ntest_split: train\n"
        'output_type: multiple_choice\ndoc_to_text: "Q: {{q}}\\nA:"\ndoc_to_choice: opts\n'
        "doc_to_target: answer\n"
    )
    model, tokenizer = tiny_model("llama"), byte_tokenizer(add_bos=True)
    results, out = run_eval(EvalConfig(task=str(tmp_path / "mc.yaml"), output_dir=str(tmp_path / "run"),
                                       progress=False), model, tokenizer)  # fmt: skip
    rows = {r["uid"]: r for r in map(json.loads, (out / "predictions.jsonl").read_text().splitlines())}
    for i in range(6):
        prompt = f"Q: pick {i}\nA:"
        sums = []
        for option in (" a", " bcd", " efghij"):  # brute force: one full forward per option
            ids = tokenizer(prompt).input_ids
            opt = tokenizer(option, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ids + opt])).logits[0].float(), -1)
            sums.append(sum(float(logp[len(ids) - 1 + t, tok]) for t, tok in enumerate(opt)))
        row = rows[f"mc/eval/{i}"]
        assert row["options"] == [" a", " bcd", " efghij"] and row["label_index"] == i % 3
        assert row["scores"] == pytest.approx(sums, abs=1e-3)
        assert row["prediction_index"] == max(range(3), key=lambda k: sums[k])


def test_generation_stops_fewshot_split_and_num_fewshot(tmp_path, monkeypatch):
    rows = [{"q": f"{i}+{i}", "a": str(2 * i)} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    (tmp_path / "shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[4:8]))
    (tmp_path / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[8:]))
    (tmp_path / "gen.yaml").write_text(
        "task: sums\ndataset_path: json\n"
        "dataset_kwargs: {data_files: {train: train.jsonl, shots: shots.jsonl, test: test.jsonl}}\n"
        "training_split: train\nfewshot_split: shots\ntest_split: test\nnum_fewshot: 3\n"
        'fewshot_delimiter: "\\n###\\n"\noutput_type: generate_until\n'
        'doc_to_text: "Q: {{q}}\\nA:"\ndoc_to_target: a\n'
        "generation_kwargs: {until: [\"\\n\", 'Q:'], max_gen_toks: 7}\n"
        "metric_list: [{metric: exact_match}, {metric: f1}]\n"
    )
    task = load_task_file(tmp_path / "gen.yaml")
    assert (task.stop, task.max_new_tokens, task.metric, task.is_generation) == (("\n", "Q:"), 7, "em", True)
    assert task.demo_separator == "\n###\n" and task.label_words == ()
    test = load_split(task, "eval")
    assert test[0].prompt == "Q: 8+8\nA:" and test[0].answers == ("16",) and test[0].target == " 16"
    cfg = EvalConfig(task=str(tmp_path / "gen.yaml"), method="icl", output_dir=str(tmp_path / "run"),
                     progress=False, batch_size=2).for_task(task)  # fmt: skip
    assert (cfg.num_demos, cfg.max_new_tokens) == (3, 7)  # the file's num_fewshot and max_gen_toks
    demos = choose_demonstrations(task, cfg, load_split(task, "train"))
    assert len(demos) == 3 and {d.answers[0] for d in demos} <= {"8", "10", "12", "14"}  # the shots file
    calls = []

    def recording(model, tokenizer, prompts, max_new_tokens, stop, max_length):
        calls.append((prompts, max_new_tokens, stop))
        return greedy_generate(model, tokenizer, prompts, max_new_tokens, stop, max_length)

    monkeypatch.setattr(evaluation, "greedy_generate", recording)
    results, out = run_eval(EvalConfig(task=str(tmp_path / "gen.yaml"), method="icl", batch_size=2,
                                       output_dir=str(tmp_path / "run"), progress=False),
                            tiny_model("gpt2"), byte_tokenizer(add_bos=False))  # fmt: skip
    assert results["metric"] == "em" and results["num_demos"] == 3 and results["num_eval"] == 4
    assert [(n, stop) for _, n, stop in calls] == [(7, ("\n", "Q:"))] * 2  # the file's until and max_gen_toks
    context = "".join(f"Q: {d.fields['q']}\nA: {d.fields['a']}\n###\n" for d in demos)
    assert all(p.startswith(context) for prompts, _, _ in calls for p in prompts)  # fewshot_delimiter
    for row in map(json.loads, (out / "predictions.jsonl").read_text().splitlines()):
        assert "\n" not in row["prediction"] and "Q:" not in row["prediction"]


def test_csv_cells_are_typed_and_templates_see_numbers(tmp_path):
    (tmp_path / "t.csv").write_text("text,label,score\nfine,1,0.5\nbad,0,2\n")
    (tmp_path / "t.yaml").write_text(
        "task: typed\ndataset_path: csv\ndataset_kwargs: {data_files: {test: t.csv}}\ntest_split: test\n"
        "output_type: multiple_choice\ndoc_to_text: '{{text}} ({{score * 2}}, {{label == 1}})'\n"
        "doc_to_choice: [no, yes]\ndoc_to_target: label\n"
    )
    examples = load_split(load_task_file(tmp_path / "t.yaml"), "eval")
    assert [(e.prompt, e.label) for e in examples] == [("fine (1.0, True)", 1), ("bad (4.0, False)", 0)]


BASE = (
    "task: t\ndataset_path: json\ndataset_kwargs: {data_files: {test: d.jsonl}}\ntest_split: test\n"
    "output_type: multiple_choice\ndoc_to_text: '{{x}}'\ndoc_to_choice: [a, b]\ndoc_to_target: y\n"
)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("description: 'Answer:'\n",
         r"t\.yaml:9: field 'description' is not supported by hdopt \(a prompt prefix"),
        ("process_docs: !function utils.process\n",
         r"field 'process_docs' is not supported by hdopt \(Python code"),
        ("dataset_name: boolq\n", r"field 'dataset_name' is not supported by hdopt"),
        ("filter_list: []\n", r"field 'filter_list' is not supported by hdopt"),
        ("include: base.yaml\n", r"field 'include' is not supported by hdopt \(copy the included"),
        ("fewshot_config: {sampler: first_n}\n",
         r"field 'fewshot_config' is not supported by hdopt; supported"),
        ("metric_list: [{metric: acc_norm}]\n",
         r"metric 'acc_norm' is not supported by hdopt for multiple_choice; supported: acc"),
        ("metric_list: [{metric: acc, aggregation: median}]\n",
         r"metric 'acc': aggregation: 'median' is not"),
        ("metric_list: [{metric: acc, ignore_case: true}]\n",
         r"metric 'acc': ignore_case: True is not supported"),
        ("generation_kwargs: {until: ['x']}\n",
         r"generation_kwargs apply to output_type: generate_until only"),
        ("num_fewshot: -1\n", r"num_fewshot must be an integer >= 0"),
        ("target_delimiter: 3\n", r"target_delimiter must be a string"),
    ],
)  # fmt: skip
def test_unsupported_fields_are_refused_by_name(tmp_path, extra, message):
    (tmp_path / "d.jsonl").write_text('{"x": "q", "y": 0}\n')
    (tmp_path / "t.yaml").write_text(BASE + extra)
    with pytest.raises(TaskError, match=message):
        load_task_file(tmp_path / "t.yaml")


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("output_type: multiple_choice", "output_type: loglikelihood",
         r"output_type 'loglikelihood' is not supported by hdopt; supported: multiple_choice, "
         r"generate_until"),
        ("output_type: multiple_choice", "output_type: generate_until\ngeneration_kwargs: {top_p: 0.9}",
         r"generation_kwargs\.top_p is not supported by hdopt \(greedy decoding\)"),
        ("output_type: multiple_choice", "output_type: generate_until\ngeneration_kwargs: {do_sample: true}",
         r"hdopt decodes greedily: do_sample must be false and temperature 0"),
        ("dataset_path: json", "dataset_path: super_glue",
         r"dataset_path 'super_glue': hdopt reads lm-eval tasks from local"),
        ("{data_files: {test: d.jsonl}}", "{data_files: {test: d.jsonl}, field: data}",
         r"dataset_kwargs\.field is not supported by hdopt"),
        ("test_split: test", "test_split: validation",
         r"test_split 'validation' is not a key of dataset_kwargs\.data_files \(test\)"),
        ("test_split: test", "training_split: test", r"give test_split or validation_split"),
        ("doc_to_text: '{{x}}'", "doc_to_text: !function utils.text",
         r"doc_to_text: !function utils\.text is Python code"),
        ("doc_to_text: '{{x}}'", "doc_to_text: '{{x'", r"t\.yaml:6: doc_to_text: bad Jinja template"),
        ("doc_to_choice: [a, b]\n", "", r"output_type multiple_choice needs doc_to_choice"),
        ("data_files: {test: d.jsonl}", "data_files: {test: ../d.jsonl}",
         r"is outside the task file's folder"),
    ],
)  # fmt: skip
def test_bad_harness_files_say_what_is_wrong(tmp_path, old, new, message):
    (tmp_path / "d.jsonl").write_text('{"x": "q", "y": 0}\n')
    assert old in BASE
    (tmp_path / "t.yaml").write_text(BASE.replace(old, new))
    with pytest.raises(TaskError, match=message):
        load_task_file(tmp_path / "t.yaml")


def test_a_tsv_read_with_commas_is_refused(tmp_path):
    (tmp_path / "d.tsv").write_text("x\ty\nq\t0\n")
    (tmp_path / "t.yaml").write_text(BASE.replace("d.jsonl", "d.tsv").replace("json", "csv"))
    with pytest.raises(
        TaskError, match=r"d\.tsv would be read with ',' between columns: give dataset_kwargs\.delimiter"
    ):
        load_task_file(tmp_path / "t.yaml")


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ('{"x": {"a": [1, 2]}, "y": 0}',
         r"d\.jsonl:1: doc_to_text: a field holds a dict \(\{'a': \[1, 2\]\}\), not text"),
        ('{"x": "q", "y": 2}', r"d\.jsonl:1: doc_to_target 2 is not an index into the 2 choices"),
        ('{"x": "q", "y": "c"}', r"doc_to_target 'c' is not one of the choices \['a', 'b'\]"),
        ('{"z": "q", "y": 0}', r"d\.jsonl:1: doc_to_text: 'x' is undefined \(row has: z, y\)"),
    ],
)  # fmt: skip
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    (tmp_path / "d.jsonl").write_text(row + "\n")
    (tmp_path / "t.yaml").write_text(BASE)
    with pytest.raises(DataError, match=message):
        load_split(load_task_file(tmp_path / "t.yaml"), "eval")


def test_hdopt_finetune_accepts_a_harness_file(tmp_path, capsys):
    words = ["cat", "dog", "sun", "map", "cup", "pen", "box", "hat"]
    rows = [{"text": f"{'good' if i % 2 else 'bad'} {words[i % 8]}", "label": i % 2} for i in range(48)]
    for name, part in (("train", rows[:32]), ("test", rows[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    (tmp_path / "toy.yaml").write_text(
        "task: toy\ndataset_path: json\n"
        "dataset_kwargs: {data_files: {train: train.jsonl, test: test.jsonl}}\n"
        "training_split: train\ntest_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{text}}:'\n"
        "doc_to_choice: ['no', 'yes']\ndoc_to_target: label\n"
    )
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    byte_tokenizer(add_bos=True).save_pretrained(folder)
    code = main(["finetune", "--model", str(folder), "--task", str(tmp_path / "toy.yaml"), "--method",
                 "mezo", "--steps", "2", "--num-train", "16", "--num-dev", "8", "--num-eval", "8",
                 "--max-length", "32", "--batch-size", "8", "--output-dir", str(tmp_path / "run"),
                 "--no-progress"])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["task"] == "toy" and results["metric"] == "accuracy" and not math.isnan(results["test"])
