"""``hdopt tint``: size accounting and few-shot evaluation of TinT.

    hdopt tint size --aux gpt2-shape --layers 12 --steps 1
    hdopt tint eval --aux smollm2-135m --task sst2 --shots 32 --layers 3 --steps 1 --inner-lr 1e-4
    hdopt tint eval --aux smollm2-135m --task cr --shots 32 --inner-lr 1e-2 --method tint \
        --realization explicit
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
    ev.add_argument("--realization", choices=["structured", "explicit"], default="structured",
                    help="how TinT is computed: 'structured' (index/einsum ops) or 'explicit' (the forward "
                         "pass of the compact TinT network, hdopt.tint.compact; also reports its agreement "
                         "with the structured rule on the same examples)")
    ev.add_argument("--dtype", choices=["float32", "float64"], default="float32",
                    help="precision of the TinT computation (float64 needs --method tint)")
    ev.add_argument("--query-batch", type=int, default=25,
                    help="explicit realization: test queries packed into one forward pass")
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

    import torch

    from hdopt.lm.models import load_model
    from hdopt.tint import build, from_hf
    from hdopt.tint import evaluate as ev
    from hdopt.tint.data import load_sentiment
    from hdopt.tint.results import write_json

    if args.shots < 0 or args.shots % 2 or args.num_eval < 1 or args.query_batch < 1:
        raise SystemExit("--shots must be even and >= 0 (balanced demonstrations); --num-eval and "
                         "--query-batch >= 1")
    if args.dtype == "float64" and args.method != "tint":
        raise SystemExit("--dtype float64 applies to the TinT computation only: add --method tint")
    if args.realization == "explicit" and args.backward != "reference":
        raise SystemExit("the explicit realization implements the reference rule: use --backward reference")
    cfg = TinTConfig(n_layers=args.layers, n_steps=args.steps, inner_lr=args.inner_lr,
                     backward=args.backward, reduction=args.reduction)
    model, tok = load_model(args.aux)
    spec = from_hf(model).to(getattr(torch, args.dtype))
    tint = build(spec, cfg)
    pool, reported = load_sentiment(args.task, args.data_dir)
    tests = random.Random(1234).sample(reported, min(args.num_eval, len(reported)))
    demos = ev.sample_demos(pool, args.shots, args.seed) if args.shots else []
    methods = ev.METHODS if args.method == "all" else (args.method,)
    results = {}
    for method in methods:
        t0 = time.time()
        if method == "tint" and args.realization == "explicit":
            results[method] = _explicit(args, spec, cfg, model, tok, tint, demos, tests)
        else:
            results[method] = {"accuracy": ev.classify(method, model, tok, tint, demos, tests),
                               "realization": "structured" if method == "tint" else "-"}
        results[method]["seconds"] = time.time() - t0
        r = results[method]
        extra = (f", agreement with the structured rule {r['agreement']:.3f}, largest label-logit difference "
                 f"{r['max_abs_logit_diff']:.2g}" if "agreement" in r else "")
        print(f"{args.task} shots={args.shots} {method}: accuracy {r['accuracy']:.3f} "
              f"({r['seconds']:.0f}s{extra})", flush=True)
    if args.output_dir:
        out = Path(args.output_dir)
        run_cfg = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        write_json(out / "config.json", {**run_cfg, "tint": cfg.to_dict()})
        write_json(out / "results.json", results)
    return 0


def _explicit(args, spec, cfg: TinTConfig, model, tok, tint, demos, tests) -> dict:
    """TinT accuracy from the compact network's own forward pass; its agreement with the structured rule."""
    import torch

    from hdopt.tint import evaluate as ev
    from hdopt.tint.compact import compact_tint

    prompt = ev.build_prompt(tok, demos).ids if demos else []
    longest = max(len(ev.query_ids(tok, s)) for s, _ in tests)
    net_cfg = TinTConfig(**{**cfg.to_dict(), "realization": "compact", "max_len": len(prompt) + longest + 1})
    t0 = time.time()
    net = compact_tint(spec, net_cfg)
    built = time.time() - t0
    logits = ev.compact_label_logits(net, tok, demos, tests, args.query_batch)
    ref = ev.label_logits_many({"tint": ("tint", tint)}, model, tok, demos, tests)["tint"]
    labels = torch.tensor([y for _, y in tests])
    size = net.size_report()
    return {"accuracy": ev.accuracy(logits, labels), "realization": "explicit (compact network)",
            "structured_accuracy": ev.accuracy(ref, labels), **ev.agreement(logits, ref),
            "build_seconds": built, "network": {k: size[k] for k in ("width", "prefix_rows", "modules",
                                                                     "params_reused_with_prefix")}}
