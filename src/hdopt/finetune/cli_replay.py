"""``hdopt replay RUN_DIR``: rebuild a ZO run's weights from the starting model and trajectory.bin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdopt.finetune import rundir


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Rebuild the weights of a MeZO run bitwise from its starting model and its trajectory "
        "(seeds + projected gradients), check them against the run's checkpoint, optionally save them."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a ZO run folder (config.json, trajectory.bin)")
    parser.add_argument("--steps", type=int, default=None, help="replay only the first STEPS updates")
    parser.add_argument("--output", metavar="FILE", help="write the rebuilt trainable weights (safetensors)")


def run(args: argparse.Namespace) -> int:
    from hdopt.finetune.checkpoint import checkpoint_meta, save_checkpoint
    from hdopt.finetune.replay import compare_with_checkpoint, rebuild

    folder = Path(args.run_dir)
    try:
        _, params, steps = rebuild(folder, upto=args.steps)
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"replayed {steps} steps of {folder}")
    code = 0
    checkpoint = folder / rundir.CHECKPOINT
    if checkpoint.is_file() and checkpoint_meta(checkpoint).get("step") == steps:
        equal, worst = compare_with_checkpoint(params, checkpoint)
        verdict = "bitwise identical" if equal else f"DIFFERS (max |difference| {worst:.3g})"
        print(f"checkpoint at step {steps}: {verdict}")
        code = 0 if equal else 1
    if args.output:
        save_checkpoint(args.output, params, meta={"step": steps, "replayed_from": str(folder)})
        print(f"wrote {args.output}")
    return code
