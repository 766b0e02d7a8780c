"""``hdopt finetune``: fine-tune a language model with MeZO (full / LoRA / prefix) or a backprop baseline.

Every config field is a flag (``--num-train`` sets ``DataConfig.num_train``); ``--config run.yaml`` sets
sections first and flags override it. ``--resume RUN_DIR`` continues an interrupted run with its own config
(``--steps`` may extend a run with a constant lr).

    hdopt finetune --model smollm2-135m --task sst2 --method mezo --steps 2000 --lr 1e-6 --eps 1e-3 \\
        --num-train 1000
    torchrun --nproc_per_node 4 -m hdopt finetune --method mezo ...   # data-parallel forward-only

Under torchrun only rank 0 prints the summary and writes the run folder. A user error (a bad value, file or
model) is one line and exit status 2 (``hdopt --debug finetune ...`` shows the traceback); a divergence 3,
a torchrun peer that died or hangs 4; a run stopped by Ctrl-C 130, by SIGTERM 143 (both saved a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from hdopt.distributed import exit_on_rank_failure
from hdopt.finetune.config import SECTIONS, ConfigError, RunConfig
from hdopt.finetune.data_parallel import AGREED_ERRORS
from hdopt.finetune.methods import get_method, list_methods
from hdopt.finetune.optimizers import DivergenceError, optimizer_names
from hdopt.lm.models import ModelLoadError

RESUME_FLAGS = ("progress", "tensorboard", "dist_timeout", "steps")  # the fields a resumed run may change
EXIT_DIVERGED, EXIT_RANK_FAILURE, EXIT_INTERRUPTED, EXIT_TERMINATED = 3, 4, 130, 143
USER_ERRORS = (ValueError, OSError, ModelLoadError)  # a bad value, file or model: one line, exit status 2


def _key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` -> ``(key, value)``; the value is read as JSON (``0.9``, ``1e-8``, ``[0.9, 0.99]``,
    ``true``, ``null``), else kept as text."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


class _Mapping(argparse.Action):
    """Collects ``KEY=VALUE`` words into a dict (a key given twice is an error)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        keys = [k for k, _ in values]
        repeated = sorted({k for k in keys if keys.count(k) > 1})
        if repeated:
            parser.error(f"{option_string}: {', '.join(repeated)} given twice")
        setattr(namespace, self.dest, dict(values))


def _flag_type(annotation: str):
    """``(argparse kwargs)`` for a dataclass field annotation (a string under postponed evaluation)."""
    if annotation.startswith("bool"):
        return {"action": argparse.BooleanOptionalAction}
    if annotation.startswith("list"):
        return {"nargs": "+"}
    if annotation.startswith("dict"):
        return {"nargs": "+", "type": _key_value, "action": _Mapping, "metavar": "KEY=VALUE"}
    for name, kind in (("int", int), ("float", float)):
        if annotation.startswith(name):
            return {"type": kind}
    return {"type": str}


def configure(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field (grouped by section), plus --config and --resume."""
    parser.description = "Fine-tune with forward passes (MeZO) or backprop. Methods: " + ", ".join(
        f"{m} ({get_method(m).description})" for m in list_methods()
    )
    parser.add_argument("--config", metavar="RUN_YAML", help="YAML: sections model/data/method/optim/train")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the interrupted run in RUN_DIR")
    for section, cls in SECTIONS.items():
        group = parser.add_argument_group(f"{section} ({cls.__name__})")
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            shown = "the method's default" if default is None else repr(default)
            flag = f"--{f.name.replace('_', '-')}"
            help_text = f"{section}.{f.name} (default: {shown})"
            if f.name == "optimizer":
                help_text += f"; one of {', '.join(optimizer_names())}"
            kwargs = _flag_type(str(f.type))
            group.add_argument(flag, dest=f.name, default=argparse.SUPPRESS, help=help_text, **kwargs)


def config_overrides(args: argparse.Namespace) -> dict:
    """The config fields given as flags (unset flags are absent: they keep the YAML or default value)."""
    return {k: v for k, v in vars(args).items() if k not in ("config", "resume") and not k.startswith("_")}


def _summary(results: dict, folder) -> str:
    metric = results["metric"]
    parts = [f"{results['method']} on {results['task']}: {results['status']}", f"steps {results['steps']}"]
    if results.get("best_dev") is not None:
        parts.append(f"best dev {metric} {results['best_dev']:.2f} (step {results['best_step']})")
    if "test" in results:
        parts.append(f"test {metric} {results['test']:.2f}")
    parts.append(f"{results['wall_seconds']:.0f} s, peak {results['peak_memory_mib']:.0f} MiB")
    return "; ".join(parts) + f"\nrun folder: {folder}"


def _error(err: Exception, rank: int) -> None:
    """Print a user error on one line: once (rank 0) for errors every rank raises alike, else with the
    rank's number."""
    text = " ".join(str(err).split()) or type(err).__name__
    if rank == 0:
        print(f"error: {text}", file=sys.stderr)
    elif not isinstance(err, AGREED_ERRORS):
        print(f"error (rank {rank}): {text}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    """Start or resume a run; prints a summary. Exit codes: 0 done, 2 bad input, 3 diverged, 4 a torchrun
    peer died or hung, 130 stopped by Ctrl-C, 143 by SIGTERM."""
    from hdopt.finetune.data_parallel import launched_world
    from hdopt.finetune.trainer import finetune, resume

    overrides = config_overrides(args)
    rank = launched_world()[0]
    try:
        with exit_on_rank_failure(EXIT_RANK_FAILURE):  # torchrun: print which rank failed, leave at once
            if args.resume:
                fixed = sorted(set(overrides) - set(RESUME_FLAGS))
                if fixed or args.config:
                    allowed = ", ".join("--" + f.replace("_", "-") for f in RESUME_FLAGS)
                    drop = fixed or ["--config"]
                    message = f"a resumed run keeps its config (only {allowed} may change)"
                    raise ConfigError(f"{message}: drop {drop}")
                results, folder = resume(args.resume, **overrides)
            else:
                cfg = RunConfig.from_yaml(args.config) if args.config else RunConfig()
                results, folder = finetune(cfg.replace(**overrides))
    except DivergenceError as err:
        _error(err, rank)
        return EXIT_DIVERGED
    except USER_ERRORS as err:
        if getattr(args, "_debug", False):
            raise
        _error(err, rank)
        return 2
    if results["status"] != "interrupted":
        code = 0
    else:
        code = EXIT_TERMINATED if results.get("stopped_by") == "SIGTERM" else EXIT_INTERRUPTED
    if rank == 0:
        print(_summary(results, folder))
    if rank == 0 and code:
        by = results.get("stopped_by") or "another process"
        print(f"stopped by {by} after saving a checkpoint (exit status {code}): continue with "
              f"`hdopt finetune --resume {folder}`")  # fmt: skip
    return code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hdopt finetune")
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
