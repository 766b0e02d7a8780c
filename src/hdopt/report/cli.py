"""``hdopt report``: run the talk's claims on this machine and write an HTML report.

hdopt report                      # --scale quick: about 15 minutes on a 2-core CPU
hdopt report --scale paper        # the papers' protocols (for a GPU)
hdopt report --only tint --fresh  # recompute one section, reuse the others from the cache
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hdopt.report.context import Context, default_data_dir
from hdopt.report.scales import SCALES


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``report`` arguments to ``parser``."""
    from hdopt.report.runner import SECTION_KEYS

    parser.description = __doc__.split("\n\n")[0]
    parser.add_argument(
        "--scale",
        choices=SCALES,
        default="quick",
        help="smoke: about a minute; quick: ~15 min on 2 CPU cores; paper: full protocols",
    )
    parser.add_argument("--out", type=Path, default=Path("report"), help="report folder (default ./report)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="model alias or local path (default smollm2-135m)"
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="folder with sst2/ cr/ ... (default $HDOPT_DATA_DIR, else ../shared/data)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        choices=SECTION_KEYS,
        default=list(SECTION_KEYS),
        metavar="SECTION",
        help=f"sections to compute: {', '.join(SECTION_KEYS)}",
    )
    parser.add_argument("--fresh", action="store_true", help="recompute even when cached results exist")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--no-progress", dest="progress", action="store_false")


def run(args: argparse.Namespace) -> int:
    """Build the report; print where it is and the verdict of every claim. Returns 0."""
    from transformers.utils import logging as hf_logging

    from hdopt.lm.models import PACKAGED
    from hdopt.report.runner import build_report

    hf_logging.set_verbosity_error()  # the report's own bar shows progress; keep the loaders quiet
    hf_logging.disable_progress_bar()
    if args.model not in PACKAGED and not Path(args.model).expanduser().exists():
        raise SystemExit(f"hdopt report: --model {args.model!r} is neither a packaged alias "
                         f"({', '.join(sorted(PACKAGED))}) nor a local path")  # fmt: skip
    data_dir = args.data_dir or default_data_dir()
    if data_dir is not None and not data_dir.is_dir():
        raise SystemExit(f"hdopt report: --data-dir {data_dir} is not a folder")
    ctx = Context(
        args.scale, args.out, args.model, data_dir.resolve() if data_dir else None, args.seed, args.threads
    )
    try:
        index, sections = build_report(ctx, tuple(args.only), args.fresh, args.progress)
    except FileNotFoundError as err:
        raise SystemExit(f"hdopt report: {err}") from err
    for s in sections:
        for c in s.claims:
            print(f"[{c.verdict:>17}] {s.title}: {c.title} - {c.measured}")
    print(f"wrote {index} and {index.parent / 'summary.md'}")
    return 0
