"""hdopt: high-dimensional optimization in the age of ChatGPT, as a library.

Parts: :mod:`hdopt.zo` (forward-only optimizers), :mod:`hdopt.lm` (language models and tasks).
"""

__version__ = "0.1.0"
