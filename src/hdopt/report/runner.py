"""Run the report's sections (or reuse their cached results), then write index.html and summary.md."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hdopt.io import atomic_write_json, atomic_write_text
from hdopt.report import finetune, lab, tint
from hdopt.report.claims import Section
from hdopt.report.context import Context
from hdopt.report.render import render_html, render_markdown

# (key, what it shows, the function that computes it)
SECTIONS: list[tuple[str, str, Callable[..., Section]]] = [
    ("implicit_bias", "implicit bias of training", lab.implicit_bias),
    ("local_sgd", "Local SGD", lab.local_sgd),
    ("forward_only", "forward-only fine-tuning", finetune.forward_only),
    ("tint", "TinT", tint.tint),
]
SECTION_KEYS = tuple(key for key, _, _ in SECTIONS)


def cache_path(ctx: Context, key: str) -> Path:
    return ctx.folder / "cache" / f"{key}.json"


def cached(ctx: Context, key: str) -> Section | None:
    """The cached section when it was computed with the same settings; None otherwise."""
    path = cache_path(ctx, key)
    if not path.is_file():
        return None
    try:
        section = Section.from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, TypeError, KeyError):
        return None  # unreadable or from an older layout: recompute
    missing = [p for c in section.claims for p in c.plots if not (ctx.folder / p).is_file()]
    return section if section.settings == json.loads(json.dumps(ctx.settings())) and not missing else None


def build_report(ctx: Context, only: tuple[str, ...] = SECTION_KEYS, fresh: bool = False,
                 progress: bool = True) -> tuple[Path, list[Section]]:  # fmt: skip
    """Compute (or reuse) each section in ``only``, then write ``index.html`` and ``summary.md``.

    Sections not in ``only`` are included from the cache when present. Each finished section is cached at
    once, so an interrupted report resumes where it stopped. Returns the index path and the sections.
    """
    unknown = sorted(set(only) - set(SECTION_KEYS))
    if unknown:
        raise ValueError(f"unknown section(s) {unknown}; choose from {', '.join(SECTION_KEYS)}")
    ctx.folder.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(ctx.threads)
    start = time.perf_counter()
    sections: list[Section] = []
    todo = [k for k in only if fresh or cached(ctx, k) is None]
    titles = {k: what for k, what, _ in SECTIONS}
    bar = tqdm(total=len(todo), unit="section", disable=not progress or not todo, desc="report")
    for key, _what, fn in SECTIONS:
        if key not in todo:
            section = cached(ctx, key)
            if section is not None:
                sections.append(section)
            continue
        remaining = [titles[k] for k in todo[todo.index(key) + 1 :]]
        bar.set_postfix_str(f"then: {', '.join(remaining) or 'rendering'}")
        t0 = time.perf_counter()
        section = fn(ctx, bar.set_description_str)
        section.seconds = round(time.perf_counter() - t0, 1)
        atomic_write_json(cache_path(ctx, key), section.to_json(), default=str)
        sections.append(section)
        bar.update(1)
    bar.close()
    meta = {"scale": ctx.scale, "model": ctx.model, "seconds": round(time.perf_counter() - start, 1)}
    index = ctx.folder / "index.html"
    atomic_write_text(index, render_html(sections, meta, ctx.folder))
    atomic_write_text(ctx.folder / "summary.md", render_markdown(sections, meta))
    return index, sections
