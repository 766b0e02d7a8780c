"""The ``hdopt`` command line: one entry point, one thin subcommand per part of the library.

Each subcommand lives in the module that owns the work and exposes ``configure(parser)`` and
``run(args) -> int``; this file only lists them. Modules are imported when their subcommand runs, so
``hdopt --help`` stays fast.

One error policy for every subcommand (:func:`main`): an error the user can fix (a bad value or file name:
``ValueError``, ``OSError``, :class:`hdopt.lm.models.ModelLoadError`, a YAML error, or ``SystemExit`` with
a message) is printed on one line and the exit status is 2; anything else is a bug and shows its
traceback. ``hdopt --debug COMMAND ...`` shows the traceback of user errors too. Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from hdopt import __version__

# (name, one-line help, module that implements it)
SUBCOMMANDS: list[tuple[str, str, str]] = [
    ("demo", "forward-only (MeZO) fine-tuning demo on the embedded SmolLM2-135M", "hdopt.demo"),
    (
        "models",
        "list the model aliases, their source, size and whether they are ready",
        "hdopt.lm.cli_models",
    ),
    ("eval", "zero-shot / in-context evaluation of a language model on a task", "hdopt.lm.cli_eval"),
    ("tasks", "list the built-in tasks, or check a task file (hdopt tasks check FILE)", "hdopt.lm.cli_tasks"),
    (
        "finetune",
        "fine-tune a language model: MeZO (full/LoRA/prefix) or backprop baselines",
        "hdopt.finetune.cli",
    ),
    ("compare", "Markdown table of several fine-tuning runs", "hdopt.finetune.cli_compare"),
    ("replay", "rebuild a ZO run's weights bitwise from its trajectory log", "hdopt.finetune.cli_replay"),
    (
        "lab",
        "implicit-bias experiments (equilibrium, explr, sde, eos, mirror, localsgd)",
        "hdopt.dynamics.cli",
    ),
    ("tint", "TinT: in-context fine-tuning inside one forward pass (size, eval)", "hdopt.tint.cli"),
    ("report", "run the talk's claims on this machine and write an HTML report", "hdopt.report.cli"),
]


class _LazyParser(argparse.ArgumentParser):
    """A subcommand parser whose arguments are added by its module on first use."""

    def __init__(self, *args, module: str = "", **kwargs):
        super().__init__(*args, **kwargs)
        self._module_name = module
        self._configured = False

    def _configure(self) -> None:
        if not self._configured:
            self._configured = True
            importlib.import_module(self._module_name).configure(self)
            self.set_defaults(_module=self._module_name)

    def parse_known_args(self, args=None, namespace=None):
        self._configure()
        return super().parse_known_args(args, namespace)

    def format_help(self):
        self._configure()
        return super().format_help()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hdopt",
        description="High-dimensional optimization in the age of ChatGPT: forward-only fine-tuning, "
        "in-context fine-tuning (TinT) and the implicit bias of training.",
    )
    parser.add_argument("--version", action="version", version=f"hdopt {__version__}")
    parser.add_argument("--debug", action="store_true", dest="_debug",
                        help="show the traceback of user errors too (a bad value, file or model name)")
    subparsers = parser.add_subparsers(title="commands", metavar="COMMAND", parser_class=_LazyParser)
    for name, help_text, module in SUBCOMMANDS:
        subparsers.add_parser(name, help=help_text, description=help_text, module=module)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """The exceptions a user causes and can fix (see the module docstring); every other one is a bug."""
    import yaml

    from hdopt.lm.models import ModelLoadError

    return ValueError, OSError, ModelLoadError, yaml.YAMLError


def one_line(err: BaseException) -> str:
    """An exception's message on one line (its type when it has none)."""
    return " ".join(str(err).split()) or type(err).__name__


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "_module"):
        parser.print_help()
        return 2
    command = args._module
    try:
        return int(importlib.import_module(command).run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as exit_:
        if not isinstance(exit_.code, str):  # argparse's own errors (2), or a plain exit status
            raise
        return _report(exit_.code, args, exit_)
    except Exception as err:
        if not isinstance(err, user_errors()):
            raise
        return _report(f"error: {one_line(err)}", args, err)


def _report(message: str, args: Any, err: BaseException) -> int:
    """Print a user error's one line (or raise it again under ``--debug``); returns the exit status 2."""
    if args._debug:
        raise err
    print(" ".join(message.split()), file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
