"""Generation tasks scored by token F1: SQuAD v1.1 and DROP (MeZO templates)."""

from hdopt.lm.tasks.base import DataFile, HubSource, Task, register_task

SQUAD = register_task(
    Task(
        name="squad",
        description="SQuAD v1.1; offline only dev.json exists: train = even articles, eval = odd articles",
        template="Title: {title}\nContext: {context}\nQuestion: {question}\nAnswer:",
        target_column="answers",
        prepare="squad",
        metric="f1",
        files={
            "train": DataFile("squad/dev.json", format="squad", fold=(0, 2)),
            "eval": DataFile("squad/dev.json", format="squad", fold=(1, 2)),
        },
        hub=HubSource("squad"),
    )
)

DROP = register_task(
    Task(
        name="drop",
        description="DROP (JSONL with passage, question, answers; or the hub's answers_spans)",
        template="Passage: {passage}\nQuestion: {question}\nAnswer:",
        target_column="answers",
        prepare="drop",
        metric="f1",
        files={"train": DataFile("drop/train.jsonl"), "eval": DataFile("drop/val.jsonl")},
        hub=HubSource("ucinlp/drop"),
    )
)
