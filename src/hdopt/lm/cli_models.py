"""``hdopt models``: list the packaged model aliases, or convert one ahead of time."""

from __future__ import annotations

import argparse
import sys

from hdopt.lm.models import ModelLoadError, cache_root, list_models, prepare


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepare", metavar="ALIAS", help="convert ALIAS's GGUF into the cache now")
    parser.add_argument(
        "--rebuild", metavar="ALIAS", help="delete and redo ALIAS's conversion (corrupt cache)"
    )
    parser.add_argument(
        "--cache-dir", help="converted-model folder (default: $HDOPT_CACHE_DIR or ~/.cache/hdopt)"
    )


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def run(args: argparse.Namespace) -> int:
    try:
        if args.prepare or args.rebuild:
            alias = args.rebuild or args.prepare
            path = prepare(alias, args.cache_dir, rebuild=bool(args.rebuild))
            print(f"{alias}: ready in {path}")
            return 0
    except ModelLoadError as error:
        print(f"hdopt models: {error}", file=sys.stderr)
        return 2
    rows = [("alias", "source", "original", "size (GGUF)", "installed", "ready")]
    for m in list_models(args.cache_dir):
        rows.append((m.alias, m.source, m.hub_name, _size(m.size_bytes), "yes" if m.installed else "no",
                     "yes" if m.ready else "no (converted on first use)"))  # fmt: skip
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print(f"\ncache: {cache_root(args.cache_dir)}  (also: any Hugging Face hub name or local folder)")
    return 0
