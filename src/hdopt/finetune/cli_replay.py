"""``hdopt replay RUN_DIR``: rebuild a ZO run's weights from the starting model and trajectory.bin."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hdopt.finetune import rundir


def _steps(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Rebuild the weights of a MeZO run bitwise from its starting model and its trajectory "
        "(seeds + projected gradients), check them against what the run recorded (the checkpoint's weights "
        "or their sha256, the best dev step's sha256), optionally save them."
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a ZO run folder (config.json, trajectory.bin)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--steps", type=_steps, default=None, help="replay only the first STEPS updates")
    which.add_argument("--best", action="store_true", help="replay to the step with the best dev metric")
    parser.add_argument("--output", metavar="FILE", help="write the rebuilt trainable weights (safetensors)")


def run(args: argparse.Namespace) -> int:
    """Exit status: 0 rebuilt (and equal to what the run recorded, where it recorded something), 1 the
    rebuilt weights differ, 2 a user error (no such folder, a damaged file, another starting model)."""
    from hdopt.finetune.checkpoint import save_checkpoint
    from hdopt.finetune.replay import compare_with_checkpoint, matches, rebuild
    from hdopt.finetune.trained import RunRecord

    folder = Path(args.run_dir)
    try:
        record = RunRecord.of(folder) if folder.is_dir() else RunRecord()
        upto = record.loop.get("best_step") if args.best else args.steps
        if args.best and upto is None:
            raise ValueError(f"{folder} has no best dev step (no dev evaluation, or --no-keep-best)")
        _, params, steps = rebuild(folder, upto=upto)
    except (ValueError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 2
    print(f"replayed {steps} steps of {folder}")
    checks = []
    if steps == record.step:
        equal, worst = compare_with_checkpoint(params, folder / rundir.CHECKPOINT)
        checks.append((f"checkpoint at step {steps}", equal, worst))
    if steps == record.loop.get("best_step"):
        best = matches(params, record.loop.get("best_sha256"))
        checks.append((f"best dev weights (step {steps})", best, 0.0))
    for what, equal, worst in checks:
        if equal is not None:
            print(f"{what}: {'bitwise identical' if equal else f'DIFFERS (max |difference| {worst:.3g})'}")
    if not any(equal is not None for _, equal, _ in checks):
        print(f"no record of the weights at step {steps} to compare with (the run records its checkpoint, "
              f"step {record.step}, and its best dev step, {record.loop.get('best_step')})")  # fmt: skip
    if args.output:
        save_checkpoint(args.output, params, meta={"step": steps, "replayed_from": str(folder)})
        print(f"wrote {args.output}")
    return 1 if any(equal is False for _, equal, _ in checks) else 0
