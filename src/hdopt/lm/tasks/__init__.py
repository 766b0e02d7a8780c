"""Task registry: the MeZO task suite, LM-BFF single-sentence sets, and custom tasks from YAML/JSON
(hdopt's format or lm-evaluation-harness task files).

>>> from hdopt.lm.tasks import get_task, load_split
>>> task = get_task("sst2")
>>> task.template
'{sentence} It was'
"""

from hdopt.lm.tasks import glue, qa, sentiment, superglue  # noqa: F401  (each module registers its tasks)
from hdopt.lm.tasks.base import (
    DataError,
    DataFile,
    Example,
    HubSource,
    Task,
    TaskError,
    TaskWarning,
    get_task,
    list_tasks,
    register_task,
    unregister_task,
)
from hdopt.lm.tasks.custom import load_task_file, resolve_task, with_overrides
from hdopt.lm.tasks.data import load_split, resolve_data_dir
from hdopt.lm.tasks.sampling import Splits, sample_per_class, sample_protocol, shared_prompts

__all__ = [
    "DataError",
    "DataFile",
    "Example",
    "HubSource",
    "Splits",
    "Task",
    "TaskError",
    "TaskWarning",
    "get_task",
    "list_tasks",
    "load_split",
    "load_task_file",
    "register_task",
    "resolve_data_dir",
    "resolve_task",
    "sample_per_class",
    "sample_protocol",
    "shared_prompts",
    "unregister_task",
    "with_overrides",
]
