"""SuperGLUE tasks with the MeZO prompts (SuperGLUE JSONL files; hub: ``super_glue``)."""

from hdopt.lm.tasks.base import DataFile, HubSource, Task, register_task


def _files(task: str, fmt: str = "") -> dict[str, DataFile]:
    return {"train": DataFile(f"{task}/train.jsonl", fmt), "eval": DataFile(f"{task}/val.jsonl", fmt)}


RTE = register_task(
    Task(
        name="rte",
        description="RTE entailment (label 0 = entailment = Yes)",
        template='{premise}\nDoes this mean that "{hypothesis}" is true? Yes or No?\n',
        label_words=("Yes", "No"),
        label_column="label",
        label_values=("entailment", "not_entailment"),
        files=_files("rte"),
        hub=HubSource("super_glue", "rte", label_values=("0", "1")),
    )
)

CB = register_task(
    Task(
        name="cb",
        description="CommitmentBank 3-way entailment",
        template='Suppose {premise} Can we infer that "{hypothesis}"? Yes, No, or Maybe?\n',
        label_words=("Yes", "No", "Maybe"),
        label_column="label",
        label_values=("entailment", "contradiction", "neutral"),
        files=_files("cb"),
        num_dev=100,
        hub=HubSource("super_glue", "cb", label_values=("0", "1", "2")),
    )
)

BOOLQ = register_task(
    Task(
        name="boolq",
        description="BoolQ yes/no questions on a passage",
        template="{passage} {question}\n",
        label_words=("Yes", "No"),
        label_column="label",
        label_values=("true", "false"),
        prepare="boolq",
        files=_files("boolq"),
        hub=HubSource("super_glue", "boolq", label_values=("1", "0")),
    )
)

WSC = register_task(
    Task(
        name="wsc",
        description="Winograd schema: does the pronoun refer to the span?",
        template='{text}\nIn the previous sentence, does the pronoun "{span2}" refer to {span1}? '
        "Yes or No?\n",
        label_words=("No", "Yes"),
        label_column="label",
        label_values=("false", "true"),
        prepare="wsc",
        files=_files("wsc"),
        hub=HubSource("super_glue", "wsc.fixed", label_values=("0", "1")),
    )
)

WIC = register_task(
    Task(
        name="wic",
        description="Word in context: same meaning in both sentences?",
        template='Does the word "{word}" have the same meaning in these two sentences? Yes, No?\n'
        "{sentence1}\n{sentence2}\n",
        label_words=("No", "Yes"),
        label_column="label",
        label_values=("false", "true"),
        files=_files("wic"),
        hub=HubSource("super_glue", "wic", label_values=("0", "1")),
    )
)

MULTIRC = register_task(
    Task(
        name="multirc",
        description="MultiRC: is this answer to the question about the paragraph correct?",
        template='{paragraph}\nQuestion: {question}\nI found this answer "{answer}". '
        "Is that correct? Yes or No?\n",
        label_words=("No", "Yes"),
        label_column="label",
        label_values=("0", "1"),
        files=_files("multirc", "multirc"),
        hub=HubSource("super_glue", "multirc"),
    )
)

COPA = register_task(
    Task(
        name="copa",
        description="COPA: premise + so/because, pick the more plausible continuation",
        template="{premise} {connector}",
        options_column="options",
        label_column="label",
        prepare="copa",
        files=_files("copa"),
        num_dev=100,
        hub=HubSource("super_glue", "copa"),
    )
)

RECORD = register_task(
    Task(
        name="record",
        description="ReCoRD: which passage entity fills the query's @placeholder",
        template="{passage}\n-",
        options_column="options",
        label_column="label",
        prepare="record",
        files=_files("record", "record"),
        hub=HubSource("super_glue", "record"),
    )
)
