"""``hdopt tint``: size accounting and few-shot evaluation of TinT.

    hdopt tint size --aux gpt2-shape --layers 12 --steps 1
    hdopt tint eval --aux smollm2-135m --task sst2 --shots 32 --layers 3 --steps 1 --inner-lr 1e-4
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from hdopt.tint.config import BACKWARDS, REDUCTIONS, TinTConfig
from hdopt.tint.data import TASKS
from hdopt.tint.size import SHAPES


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="tint_command", metavar="{size,eval}", required=True,
                                parser_class=argparse.ArgumentParser)
    size = sub.add_parser("size", help="parameter counts of both realizations next to the reference's")
    size.add_argument("--aux", choices=sorted(SHAPES), default="gpt2-shape", help="auxiliary shape")
    size.add_argument("--layers", type=int, default=12, help="simulated (fine-tuned) top layers")
    size.add_argument("--steps", type=int, default=1, help="simulated SGD steps")
    size.add_argument("--max-len", type=int, default=None, help="input length the TinT is built for "
                      "(default: min(aux max positions, 1024))")
    size.add_argument("--json", action="store_true", help="print JSON instead of a table")

    ev = sub.add_parser("eval", help="few-shot sentiment accuracy: ICL vs TinT vs explicit fine-tuning")
    ev.add_argument("--aux", default="smollm2-135m", help="model alias or path (hdopt.lm.models.load_model)")
    ev.add_argument("--task", choices=TASKS, default="sst2")
    ev.add_argument("--shots", type=int, default=32, help="demonstrations (0: adapt on the test input)")
    ev.add_argument("--layers", type=int, default=3)
    ev.add_argument("--steps", type=int, default=1)
    ev.add_argument("--inner-lr", type=float, default=1e-4)
    ev.add_argument("--backward", choices=BACKWARDS, default="reference")
    ev.add_argument("--reduction", choices=REDUCTIONS, default="mean")
    ev.add_argument("--method", choices=["icl", "tint", "ft", "all"], default="all")
    ev.add_argument("--num-eval", type=int, default=200, help="examples from the reported split")
    ev.add_argument("--seed", type=int, default=0, help="demonstration sampling seed")
    ev.add_argument("--data-dir", default=None, help="folder with sst2/ mr/ cr/ (default $HDOPT_DATA_DIR)")
    ev.add_argument("--output-dir", default=None, help="write config.json and results.json here")


def run(args: argparse.Namespace) -> int:
    return _size(args) if args.tint_command == "size" else _eval(args)


def _size(args) -> int:
    from hdopt.tint.size import format_size, size_table

    table = size_table(args.aux, args.layers, args.steps, args.max_len)
    print(json.dumps(table, indent=1) if args.json else format_size(table))
    return 0


def _eval(args) -> int:
    import random

    from hdopt.lm.models import load_model
    from hdopt.tint import build
    from hdopt.tint import evaluate as ev
    from hdopt.tint.data import load_sentiment
    from hdopt.tint.results import write_json

    if args.shots < 0 or args.shots % 2 or args.num_eval < 1:
        raise SystemExit("--shots must be even and >= 0 (balanced demonstrations); --num-eval >= 1")
    cfg = TinTConfig(n_layers=args.layers, n_steps=args.steps, inner_lr=args.inner_lr,
                     backward=args.backward, reduction=args.reduction)
    model, tok = load_model(args.aux)
    tint = build(model, cfg)
    pool, reported = load_sentiment(args.task, args.data_dir)
    tests = random.Random(1234).sample(reported, min(args.num_eval, len(reported)))
    demos = ev.sample_demos(pool, args.shots, args.seed) if args.shots else []
    methods = ev.METHODS if args.method == "all" else (args.method,)
    results = {}
    for method in methods:
        t0 = time.time()
        results[method] = {"accuracy": ev.classify(method, model, tok, tint, demos, tests),
                           "seconds": time.time() - t0}
        print(f"{args.task} shots={args.shots} {method}: accuracy {results[method]['accuracy']:.3f} "
              f"({results[method]['seconds']:.0f}s)", flush=True)
    if args.output_dir:
        out = Path(args.output_dir)
        run_cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(out / "config.json", {**run_cfg, "tint": cfg.to_dict()})
        write_json(out / "results.json", results)
    return 0
