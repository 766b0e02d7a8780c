"""``hdopt lab <name>``: run one implicit-bias experiment, write results.json + a PNG, print the verdict.

Flags map one-to-one onto the experiment's config dataclass (``--seed`` -> ``seed``, ``--data`` -> ``data``,
``--n-train`` -> ``n_train``); ``--scale`` picks the preset. The exit status is 0 when every prediction is
met, 1 when one is not (the verdict line says which).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from pathlib import Path

import torch

from hdopt.dynamics.data import DATASETS
from hdopt.dynamics.registry import SCALES, get, names

FASHION_DEFAULT_N = 10000  # used when a preset takes all examples: 60k would make runs far slower


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``lab`` arguments to ``parser``."""
    parser.add_argument("name", choices=names(), help="experiment to run")
    parser.add_argument("--scale", choices=SCALES, default="default",
                        help="smoke: seconds; default: <= 5 minutes on a 2-core CPU; "
                        "full: the bigger version")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default runs/lab/NAME-SCALE)")
    parser.add_argument("--seed", type=int, default=None, help="seed for data, init and batches")
    parser.add_argument("--data", choices=DATASETS, default=None,
                        help="data set (default digits; fashion-mnist needs the Debian package)")
    parser.add_argument("--n-train", type=int, default=None, help="training examples to use")
    parser.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE", dest="settings",
                        help="override any config field of the preset, e.g. --set width=64 time_units=6")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (the lab's models are tiny: one thread is usually fastest)")


def parse_settings(experiment, settings: list[str]) -> dict:
    """``["width=64", "lrs=0.1,0.2"]`` -> typed overrides, each parsed like the preset's own value."""
    preset = experiment.presets["default"]
    out = {}
    for item in settings:
        name, sep, text = item.partition("=")
        if not sep or not hasattr(preset, name):
            fields = ", ".join(f.name for f in dataclasses.fields(experiment.config_cls))
            raise SystemExit(f"hdopt lab {experiment.name}: --set {item!r}: expected FIELD=VALUE with FIELD "
                             f"one of {fields}")
        out[name] = _parse_like(getattr(preset, name), text, f"--set {item}")
    return out


def _parse_like(example, text: str, where: str):
    if isinstance(example, tuple):
        inner = example[0] if example else 0.0
        return tuple(_parse_like(inner, t, where) for t in text.split(",") if t)
    if example is None:  # optional numbers (n_train); keep strings otherwise
        for kind in (int, float):
            try:
                return kind(text)
            except ValueError:
                pass
        return None if text.lower() == "none" else text
    if isinstance(example, bool):
        if text.lower() not in ("true", "false", "1", "0"):
            raise SystemExit(f"hdopt lab: {where}: expected true or false")
        return text.lower() in ("true", "1")
    try:
        value = type(example)(text)
    except ValueError:
        raise SystemExit(f"hdopt lab: {where}: expected a {type(example).__name__}") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise SystemExit(f"hdopt lab: {where}: expected a finite number")
    return value


def build_config(args: argparse.Namespace):
    """The experiment's preset for ``args.scale`` with the flags applied."""
    experiment = get(args.name)
    fields = {f.name for f in dataclasses.fields(experiment.config_cls)}
    overrides = {}
    if args.seed is not None:
        overrides["seed"] = args.seed
    for flag, field in (("data", "data"), ("n_train", "n_train")):
        value = getattr(args, flag, None)
        if value is None:
            continue
        if field not in fields:
            raise SystemExit(f"hdopt lab {args.name}: --{flag.replace('_', '-')} does not apply "
                             f"(this experiment builds its own problem)")
        if flag == "n_train" and value < 1:
            raise SystemExit(f"hdopt lab {args.name}: --n-train must be at least 1, got {value}")
        overrides[field] = value
    overrides.update(parse_settings(experiment, getattr(args, "settings", [])))
    config = experiment.config(args.scale, **overrides)
    if getattr(config, "data", None) == "fashion-mnist" and config.n_train is None:
        config = dataclasses.replace(config, n_train=FASHION_DEFAULT_N)
    return config


def run(args: argparse.Namespace) -> int:
    """Run the experiment; print the verdict and where the files went. Returns 0 on PASS, 1 on FAIL."""
    experiment = get(args.name)
    config = build_config(args)
    out = args.out or Path("runs") / "lab" / f"{args.name}-{args.scale}"
    torch.set_num_threads(args.threads)
    try:
        result = experiment.run(config, out)
    except FileNotFoundError as err:
        raise SystemExit(f"hdopt lab {args.name}: {err}") from err
    print(result.verdict())
    print(f"wrote {out / 'results.json'} and {result.plot} in {result.runtime_s:.1f} s "
          f"({result.cpu_s:.1f} s CPU)")
    return 0 if result.passed else 1
