"""GLUE: SST-2 (the MeZO template ``{sentence} It was`` + terrible/great)."""

from hdopt.lm.tasks.base import DataFile, HubSource, Task, register_task

SST2 = register_task(
    Task(
        name="sst2",
        description="SST-2 sentiment (GLUE TSV: sentence, label)",
        template="{sentence} It was",
        label_words=(" terrible", " great"),
        label_column="label",
        label_values=("0", "1"),
        prepare="strip_text",
        files={"train": DataFile("sst2/train.tsv"), "eval": DataFile("sst2/dev.tsv")},
        hub=HubSource("glue", "sst2"),
    )
)
