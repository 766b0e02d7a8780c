"""Built-in task records: golden prompts in MeZO's formats, registry rules and validation messages."""

# ruff: noqa: E501  (golden prompt strings are kept whole, one per line, so they can be read against mezo.md)

from __future__ import annotations

import pytest

from hdopt.lm.tasks import DataError, DataFile, Task, TaskError, get_task, list_tasks, register_task
from hdopt.lm.tasks.data import to_example
from hdopt.lm.tasks.readers import Record
from hdopt.lm.tasks.rows import lower_first_word

BUILTIN = [
    "boolq",
    "cb",
    "copa",
    "cr",
    "drop",
    "mr",
    "multirc",
    "record",
    "rte",
    "squad",
    "sst2",
    "sst5",
    "wic",
    "wsc",
]

# (task, raw row as in the data files, prompt, options, gold option index)
GOLDEN = [
    ("sst2", {"sentence": "a gorgeous film . ", "label": "1"}, "a gorgeous film . It was", (" terrible", " great"), 1),
    (
        "rte",
        {"premise": "Dana died.", "hypothesis": "Dana lived.", "label": "not_entailment"},
        'Dana died.\nDoes this mean that "Dana lived." is true? Yes or No?\n',
        ("Yes", "No"),
        1,
    ),
    (
        "cb",
        {"premise": "It rained.", "hypothesis": "the ground is wet", "label": "neutral"},
        'Suppose It rained. Can we infer that "the ground is wet"? Yes, No, or Maybe?\n',
        ("Yes", "No", "Maybe"),
        2,
    ),
    (
        "boolq",
        {"passage": "Ethanol fuel -- It burns.", "question": "does ethanol burn", "label": True},
        "Ethanol fuel -- It burns. Does ethanol burn?\n",
        ("Yes", "No"),
        0,
    ),
    (
        "wsc",
        {"text": "Mark lied to Pete. He was sorry.", "target": {"span1_text": "Mark", "span2_text": "He"}, "label": True},
        'Mark lied to Pete. He was sorry.\nIn the previous sentence, does the pronoun "he" refer to Mark? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    (
        "wic",
        {"word": "class", "sentence1": "A class act.", "sentence2": "Go to class.", "label": False},
        'Does the word "class" have the same meaning in these two sentences? Yes, No?\nA class act.\nGo to class.\n',
        ("No", "Yes"),
        0,
    ),
    (
        "multirc",
        {"paragraph": "Force moves things.", "question": "What moves things?", "answer": "Force", "label": 1},
        'Force moves things.\nQuestion: What moves things?\nI found this answer "Force". Is that correct? Yes or No?\n',
        ("No", "Yes"),
        1,
    ),
    (
        "copa",
        {"premise": "The man turned on the faucet.", "choice1": "The toilet filled.", "choice2": "Water flowed.",
         "question": "effect", "label": 1},
        "The man turned on the faucet so",
        (" the toilet filled.", " water flowed."),
        1,
    ),
    (
        "copa",
        {"premise": "I was tired.", "choice1": "I slept.", "choice2": "Mary ran.", "question": "cause", "label": 0},
        "I was tired because",
        (" I slept.", " mary ran."),
        0,
    ),
    (
        "record",
        {"passage": "Paris is big.\n@highlight\nLondon too", "query": "@placeholder is a city",
         "entities": ["Paris", "London"], "answers": ["London"]},
        "Paris is big.\n- London too\n-",
        (" Paris is a city", " London is a city"),
        1,
    ),
    ("sst5", {"sentence": "-lrb- a -rrb- fine film", "label": "3"}, "( a ) fine film It was",
     (" terrible", " bad", " okay", " good", " great"), 3),
    ("mr", {"sentence": "dull . ", "label": "0"}, "dull . It was", (" terrible", " great"), 0),
    ("cr", {"sentence": "works well", "label": "1"}, "works well It was", (" terrible", " great"), 1),
]  # fmt: skip


def test_builtin_registry_holds_the_suite():
    assert list_tasks() == sorted(BUILTIN)


@pytest.mark.parametrize(("name", "row", "prompt", "options", "label"), GOLDEN)
def test_golden_prompts(name, row, prompt, options, label):
    example = to_example(get_task(name), Record("row.jsonl:1", row, 0), "u0")
    assert example.prompt == prompt
    assert example.options == options
    assert example.label == label
    assert example.demonstration == prompt + options[label]


def test_generation_golden_prompts():
    squad = {"title": "Warsaw", "context": "Marie was born here.", "question": " Who was born? ",
             "answers": {"text": ["Marie", "Marie Curie"]}}  # fmt: skip
    example = to_example(get_task("squad"), Record("dev.json", squad, 0), "q0")
    assert example.prompt == "Title: Warsaw\nContext: Marie was born here.\nQuestion: Who was born?\nAnswer:"
    assert example.answers == ("Marie", "Marie Curie")
    assert example.target == " Marie\n"
    assert example.options == () and example.label is None
    drop = {"passage": "Two goals.", "question": "How many goals?", "answers_spans": {"spans": ["2"]}}
    example = to_example(get_task("drop"), Record("hub", drop, 0), "d0")
    assert example.prompt == "Passage: Two goals.\nQuestion: How many goals?\nAnswer:"
    assert example.target == " 2\n"


def test_lower_first_word_keeps_capital_i():
    assert lower_first_word("I slept.") == "I slept."
    assert lower_first_word("It rained.") == "it rained."
    assert lower_first_word("Water") == "water"


def test_registry_rejects_duplicates_and_lists_valid_names():
    with pytest.raises(TaskError, match="task 'sst2' is already registered"):
        register_task(get_task("sst2"))
    with pytest.raises(TaskError) as info:
        get_task("sst-3")
    assert str(info.value).startswith("unknown task 'sst-3'; built-in tasks: boolq, cb, copa, cr, drop, mr,")


def test_task_record_validation():
    files = {"eval": DataFile("x.csv")}
    with pytest.raises(TaskError, match="give exactly one of label_words, options_column or target_column"):
        Task(name="t", template="{a}", files=files)
    with pytest.raises(TaskError, match=r"label_values \['0'\] must list one raw label per label word"):
        Task(
            name="t",
            template="{a}",
            files=files,
            label_words=(" a", " b"),
            label_column="y",
            label_values=("0",),
        )
    with pytest.raises(TaskError, match="unknown metric 'bleu'; choose one of accuracy, f1"):
        Task(name="t", template="{a}", files=files, target_column="y", metric="bleu")
    with pytest.raises(TaskError, match="files must name an 'eval' split"):
        Task(name="t", template="{a}", files={"train": DataFile("x.csv")}, target_column="y")


def test_row_errors_name_the_row():
    sst2 = get_task("sst2")
    with pytest.raises(DataError) as info:
        to_example(sst2, Record("dev.tsv:7", {"sentence": "ok", "label": "2"}, 0), "u")
    assert str(info.value) == "dev.tsv:7: label '2' is not one of ['0', '1'] (task 'sst2')"
    with pytest.raises(DataError) as info:
        to_example(sst2, Record("dev.tsv:9", {"text": "ok", "label": "1"}, 0), "u")
    assert str(info.value) == "dev.tsv:9: missing column(s) sentence for task 'sst2' (row has: text, label)"
    copa = {"premise": "x.", "choice1": "a", "choice2": "b", "question": "why", "label": 0}
    with pytest.raises(DataError, match=r"^val.jsonl:3: task 'copa' cannot prepare this row"):
        to_example(get_task("copa"), Record("val.jsonl:3", copa, 0), "u")
