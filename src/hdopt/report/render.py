"""The report as a self-contained HTML page (inline PNGs, inline CSS) and as Markdown."""

from __future__ import annotations

import base64
import html
import os
import platform
import time
from pathlib import Path

import torch

from hdopt import __version__
from hdopt.report.claims import NOT_REPRODUCED, PARTLY, REPRODUCED, Section, Table

BADGE = {REPRODUCED: "ok", PARTLY: "partly", NOT_REPRODUCED: "no"}
CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;
margin:2em auto;padding:0 1em;color:#1d232a;line-height:1.45}
h1{margin-bottom:.2em}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2em;margin-top:2em}
.meta{color:#5a6673;font-size:.9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #d5dbe1;padding:.3em .6em;text-align:left;vertical-align:top}th{background:#f1f4f7}
.claim{border:1px solid #d5dbe1;border-radius:8px;padding:.4em 1em 1em;margin:1em 0}
.badge{display:inline-block;border-radius:4px;padding:.1em .5em;font-size:.85em;font-weight:600;color:#fff}
.badge.ok{background:#2e7d32}.badge.partly{background:#b7791f}.badge.no{background:#c62828}
pre{background:#f6f8fa;padding:.6em;border-radius:6px;white-space:pre-wrap;word-break:break-all;font-size:.85em}
img{max-width:100%;border:1px solid #e3e7eb;margin:.4em 0}
dt{font-weight:600;margin-top:.4em}dd{margin-left:1em}
"""


def machine() -> str:
    """A one-line description of the hardware and software the report ran on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, {gpu}; "
        f"Python {platform.python_version()}, torch {torch.__version__}, hdopt {__version__}"
    )


def _image(folder: Path, rel: str) -> str:
    data = base64.b64encode((folder / rel).read_bytes()).decode("ascii")
    return f'<img alt="{html.escape(rel)}" src="data:image/png;base64,{data}">'


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in table.rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _counts(sections: list[Section]) -> str:
    verdicts = [c.verdict for s in sections for c in s.claims]
    return ", ".join(f"{verdicts.count(v)} {v}" for v in (REPRODUCED, PARTLY, NOT_REPRODUCED))


def render_html(sections: list[Section], meta: dict, folder: Path) -> str:
    """The whole report as one HTML string; images are read from ``folder`` and inlined."""
    e = html.escape
    out = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>hdopt report</title>"
           f"<style>{CSS}</style></head><body>",
           "<h1>High-dimensional optimization in the age of ChatGPT: the claims, measured</h1>",
           f"<p class='meta'>hdopt report, scale <b>{e(meta['scale'])}</b>, model {e(meta['model'])}; "
           f"{e(time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime()))}; {e(machine())}. "
           f"Verdicts: {e(_counts(sections))}.</p>",
           "<table id='summary'><thead><tr><th>part</th><th>claim</th><th>paper</th><th>measured here</th>"
           "<th>verdict</th></tr></thead><tbody>"]  # fmt: skip
    for s in sections:
        for i, c in enumerate(s.claims):
            out.append(
                f"<tr><td>{e(s.title)}</td><td><a href='#{s.key}-{i}'>{e(c.title)}</a></td>"
                f"<td>{e(c.paper)}</td><td>{e(c.measured)}</td>"
                f"<td><span class='badge {BADGE[c.verdict]}'>{e(c.verdict)}</span></td></tr>"
            )
    out.append("</tbody></table>")
    for s in sections:
        out.append(
            f"<section id='{s.key}' class='part'><h2>{e(s.title)}</h2><p>{e(s.intro)}</p>"
            f"<p class='meta'>computed at scale {e(s.scale)} in {s.seconds:.0f} s</p>"
        )
        for i, c in enumerate(s.claims):
            out.append(
                f"<div class='claim' id='{s.key}-{i}'><h3>{e(c.title)} "
                f"<span class='badge {BADGE[c.verdict]}'>{e(c.verdict)}</span></h3><dl>"
                f"<dt>Claim</dt><dd>{e(c.claim)}</dd><dt>Paper</dt><dd>{e(c.paper)}</dd>"
                f"<dt>Measured here</dt><dd>{e(c.measured)}</dd><dt>Verdict rule</dt><dd>{e(c.why)}</dd>"
                f"<dt>Reproduce</dt><dd><pre><code>{e(c.command)}</code></pre></dd></dl>"
            )
            out += [_table_html(t) for t in c.tables]
            out += [_image(folder, p) for p in c.plots]
            out.append("</div>")
        out.append("</section>")
    out.append(
        f"<p class='meta'>Total {meta['seconds']:.0f} s. Regenerate: <code>hdopt report --scale "
        f"{e(meta['scale'])}</code> (cached sections are reused; <code>--fresh</code> recomputes).</p>"
    )
    out.append("</body></html>")
    return "\n".join(out)


def render_markdown(sections: list[Section], meta: dict) -> str:
    """The report as Markdown: the summary table, then every claim with its tables and image links."""
    lines = [f"# hdopt report (scale {meta['scale']}, model {meta['model']})", "",
             f"{machine()}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
             f"verdicts: {_counts(sections)}.",
             "", "| part | claim | paper | measured here | verdict |", "|---|---|---|---|---|"]  # fmt: skip
    for s in sections:
        lines += [f"| {s.title} | {c.title} | {c.paper} | {c.measured} | **{c.verdict}** |" for c in s.claims]
    for s in sections:
        lines += ["", f"## {s.title}", "", s.intro]
        for c in s.claims:
            lines += [
                "",
                f"### {c.title}: {c.verdict}",
                "",
                f"- Claim: {c.claim}",
                f"- Paper: {c.paper}",
                f"- Measured: {c.measured}",
                f"- Verdict rule: {c.why}",
                "",
                "```",
                c.command,
                "```",
            ]
            for t in c.tables:
                lines += ["", t.markdown()]
            lines += ["", *[f"![{p}]({p})" for p in c.plots]] if c.plots else []
    lines += ["", f"Total {meta['seconds']:.0f} s. Regenerate: `hdopt report --scale {meta['scale']}`."]
    return "\n".join(lines) + "\n"
