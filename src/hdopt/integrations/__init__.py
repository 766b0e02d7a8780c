"""Adapters to other ecosystems.

:mod:`hdopt.integrations.transformers`: :class:`~hdopt.integrations.transformers.ZOTrainer`, a Hugging Face
``Trainer`` whose training step is an :mod:`hdopt.zo` step (imported on demand: it imports transformers).
"""
