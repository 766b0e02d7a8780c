"""hdopt: high-dimensional optimization in the age of ChatGPT, as a library.

Parts: :mod:`hdopt.zo` (forward-only optimizers), :mod:`hdopt.lm` (language models, tasks, evaluation),
:mod:`hdopt.finetune` (MeZO and backprop fine-tuning), :mod:`hdopt.tint` (TinT), :mod:`hdopt.dynamics`
(implicit-bias measurements and experiments), :mod:`hdopt.distributed` (Local SGD, data-parallel ZO).
The bottom floor every part may use: :mod:`hdopt.io` (atomic writes), :mod:`hdopt.registry`,
:mod:`hdopt.plotting`. Imports point down only; tests/test_architecture.py lists the floors and keeps it so.
"""

__version__ = "0.1.0"
