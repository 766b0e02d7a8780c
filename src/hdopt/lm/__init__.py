"""Language models, tasks and prompt-based evaluation (zero-shot, in-context learning).

Modules: :mod:`~hdopt.lm.models` (loading), :mod:`~hdopt.lm.tasks` (task registry and data),
:mod:`~hdopt.lm.scoring` (option log-likelihoods, losses, generation, metrics),
:mod:`~hdopt.lm.evaluation` (zero-shot / ICL runs).
"""
