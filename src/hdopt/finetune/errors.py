"""The errors a fine-tuning run raises for what a user can fix (each message says how)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value or file is wrong; the message names the field and what is valid."""


class DivergenceError(RuntimeError):
    """Training diverged (non-finite loss or weights, or a loss far above the first one)."""


class RunFolderError(ValueError):
    """A run folder cannot be used as asked: a file is damaged or stale, or another process holds it."""
