"""Single-sentence classification sets with LM-BFF templates: SST-5, MR, CR."""

from dataclasses import replace

from hdopt.lm.tasks.base import DataFile, HubSource, Task, register_task

LM_BFF_COLUMNS = ("label", "sentence")  # LM-BFF's test.csv files have no header
TEXT_COLUMN = {"text": "sentence"}  # the hub copies call the sentence "text"

SST5 = register_task(
    Task(
        name="sst5",
        description="SST-5 fine-grained sentiment (raw `label sentence` train, LM-BFF test.csv)",
        template="{sentence} It was",
        label_words=(" terrible", " bad", " okay", " good", " great"),
        label_column="label",
        label_values=("0", "1", "2", "3", "4"),
        prepare="ptb_brackets",
        files={
            "train": DataFile("sst5/train.txt", format="label_text"),
            "eval": DataFile("sst5/test.csv", columns=LM_BFF_COLUMNS),
        },
        hub=HubSource("SetFit/sst5", splits={"train": "train", "eval": "test"}, rename=TEXT_COLUMN),
    )
)

MR = register_task(
    Task(
        name="mr",
        description="MR movie reviews (train = all.txt minus the LM-BFF test split)",
        template="{sentence} It was",
        label_words=(" terrible", " great"),
        label_column="label",
        label_values=("0", "1"),
        prepare="strip_text",
        files={
            "train": DataFile("mr/all.txt", format="label_text", encoding="cp1252", minus="eval"),
            "eval": DataFile("mr/test.csv", columns=LM_BFF_COLUMNS),
        },
        hub=HubSource("rotten_tomatoes", splits={"train": "train", "eval": "test"}, rename=TEXT_COLUMN),
    )
)

CR = register_task(  # MR's record with CR's files (no hub copy)
    replace(
        MR,
        name="cr",
        description="CR customer reviews (train = all.txt minus the LM-BFF test split)",
        files={
            "train": DataFile("cr/all.txt", format="label_text", encoding="cp1252", minus="eval"),
            "eval": DataFile("cr/test.csv", columns=LM_BFF_COLUMNS),
        },
        hub=None,
    )
)
