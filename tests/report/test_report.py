"""The report: every section renders with numbers and plots; caching; the HTML in a real browser."""

from __future__ import annotations

import base64
import html
import json
import re
import shutil
import subprocess
import sys

import pytest

from hdopt.report import SECTION_KEYS, Claim, Context, Section, Table, budget, build_report, runner
from hdopt.report.claims import NOT_REPRODUCED, PARTLY, REPRODUCED, VERDICTS, fmt, verdict_from
from hdopt.report.render import BADGE

NUMBER = re.compile(r"\d")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_every_section_renders_with_numbers_and_plots(smoke_report):
    ctx, index, sections = smoke_report
    assert [s.key for s in sections] == list(SECTION_KEYS)
    html = index.read_text(encoding="utf-8")
    for section in sections:
        assert f"id='{section.key}'" in html
        assert section.claims, section.key
        for claim in section.claims:
            assert claim.verdict in VERDICTS
            assert NUMBER.search(claim.measured), (claim.title, claim.measured)
            assert claim.command.strip()
            assert claim.title in html
    plots = [p for s in sections for c in s.claims for p in c.plots]
    # the five lab experiments, Local SGD, two fine-tuning figures and TinT's bar chart
    assert len(plots) == 9
    for rel in plots:
        data = (ctx.folder / rel).read_bytes()
        assert data.startswith(PNG_MAGIC), rel
        assert base64.b64encode(data).decode("ascii") in html, f"{rel} is not inlined"
    assert 'src="http' not in html and "<link" not in html  # self-contained: nothing fetched


def test_summary_markdown_lists_every_claim(smoke_report):
    ctx, _, sections = smoke_report
    summary = (ctx.folder / "summary.md").read_text(encoding="utf-8")
    for section in sections:
        assert f"## {section.title}" in summary
        for claim in section.claims:
            assert f"### {claim.title}: {claim.verdict}" in summary
    for rel in [p for s in sections for c in s.claims for p in c.plots]:
        assert f"]({rel})" in summary


def test_forward_only_section_measures_all_methods(smoke_report):
    _, _, sections = smoke_report
    section = next(s for s in sections if s.key == "forward_only")
    accuracy, top, memory, cost = section.claims
    methods = [row[0] for row in accuracy.tables[0].rows]
    top_name = "exact read-path gradient, read-position adapters"
    assert methods == ["zero-shot", "ICL", "FT (AdamW)", "MeZO", top_name]
    b = budget("smoke")
    steps = {row[0]: int(row[3]) for row in accuracy.tables[0].rows}
    assert steps == {"zero-shot": 0, "ICL": 0, "FT (AdamW)": b.fo_steps, "MeZO": b.zo_steps,
                     top_name: b.top_steps}  # fmt: skip
    assert [row[0] for row in top.tables[0].rows] == ["FT (AdamW)", "MeZO", top_name]
    forwards = {row[0]: float(row[3]) for row in top.tables[0].rows}
    # a read-adapters-exact step's 1 + r (L + 1) / 2 copies of the last tokens through every block (r 8 and
    # the tiny model's L = 4 blocks: 21) count 1/T each (T the prompts' mean length), plus one forward a
    # batch the context's cache ran; FT's and MeZO's forwards are whole. The cell has 3 significant digits
    # (relative error <= 5e-3) and T is saved to 2 decimals
    ctx = smoke_report[0]
    run = json.loads((ctx.folder / "runs" / "finetune" / "top" / "results.json").read_text())
    assert run["method"] == "read-adapters-exact" and run["read_rank"] == 8
    expected = b.top_steps * (1 + 8 * (4 + 1) / 2) / run["mean_row_tokens"] + run["cache_forwards"]
    assert run["cache_forwards"] >= 1 and forwards[top_name] == pytest.approx(expected, rel=6e-3)
    assert forwards["MeZO"] == 2 * b.zo_steps
    for row in accuracy.tables[0].rows:
        assert 0.0 <= float(row[2]) <= 100.0
    peaks = {row[0]: float(row[1].replace(",", "")) for row in memory.tables[0].rows}
    assert set(peaks) == {"inference", "mezo", "ft"} and all(v > 0 for v in peaks.values())
    ratios = [float(row[1]) for row in cost.tables[0].rows]
    assert all(r > 1.0 for r in ratios)  # a two-point step cannot cost less than one forward pass


def test_tint_agreement_meets_tolerances(smoke_report):
    _, _, sections = smoke_report
    agreement = next(s for s in sections if s.key == "tint").claims[0]
    assert agreement.verdict == REPRODUCED, agreement.measured


def test_cached_sections_are_reused_and_settings_invalidate(smoke_report, monkeypatch, tmp_path):
    ctx, _, _ = smoke_report
    folder = tmp_path / "copy"
    shutil.copytree(ctx.folder, folder)

    def boom(*args, **kwargs):
        raise AssertionError("a cached section was recomputed")

    monkeypatch.setattr(runner, "SECTIONS", [(k, w, boom) for k, w, _ in runner.SECTIONS])
    same = Context(ctx.scale, folder, ctx.model, ctx.data_dir, ctx.seed, ctx.threads)
    _, sections = build_report(same, progress=False)
    assert len(sections) == len(SECTION_KEYS)

    calls = []

    def fake(c, progress=None):
        calls.append(c.seed)
        return Section("local_sgd", "Local SGD", "", [_claim()], c.scale, c.settings())

    monkeypatch.setattr(runner, "SECTIONS", [(k, w, fake if k == "local_sgd" else boom)
                                             for k, w, _ in runner.SECTIONS])  # fmt: skip
    other_seed = Context(ctx.scale, folder, ctx.model, ctx.data_dir, 1, ctx.threads)
    _, sections = build_report(other_seed, only=("local_sgd",), progress=False)
    assert calls == [1]  # recomputed: the cached one was for seed 0
    assert [s.key for s in sections] == ["local_sgd"]  # the others were cached for seed 0: left out
    build_report(same, only=("local_sgd",), fresh=True, progress=False)
    assert calls == [1, 0]


def test_unknown_section_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown section"):
        build_report(Context("smoke", tmp_path), only=("nope",), progress=False)
    with pytest.raises(ValueError, match="unknown scale"):
        budget("huge")


def test_cli_refuses_missing_data_dir(tmp_path):
    done = subprocess.run([sys.executable, "-m", "hdopt", "report", "--data-dir", str(tmp_path / "none"),
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)  # fmt: skip
    assert done.returncode != 0
    assert "is not a folder" in done.stderr


def _claim(verdict: str = PARTLY) -> Claim:
    return Claim("t", "c", "p 1", "m 2", verdict, "w", "cmd", [Table(["a", "b"], [["1", "2"]])], [])


def test_claim_json_round_trip_and_verdict_rules():
    section = Section("k", "T", "i", [_claim()], "smoke", {"seed": 0}, 1.5)
    again = Section.from_json(json.loads(json.dumps(section.to_json())))
    assert again == section
    assert again.claims[0].tables[0].markdown() == "| a | b |\n|---|---|\n| 1 | 2 |"
    assert verdict_from(True) == REPRODUCED
    assert verdict_from(False, True) == PARTLY
    assert verdict_from(False) == NOT_REPRODUCED
    with pytest.raises(ValueError, match="verdict"):
        _claim("maybe")
    assert [fmt(x) for x in (None, 0, 0.1234, 3e-7, 12345.0)] == ["-", "0", "0.123", "3.0e-07", "1.23e+04"]


def _browser() -> str | None:
    return next((b for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


# Runs inside the page once it has loaded: what a reader sees, as JSON on <body data-probe="...">.
PROBE = """<script>window.addEventListener('load', () => {
  const text = el => el ? el.textContent.trim() : null;
  const shown = img => img.complete && img.naturalWidth > 0 && img.getBoundingClientRect().width > 0;
  const probe = {
    sections: [...document.querySelectorAll('section.part')].map(s => s.id),
    summary: [...document.querySelectorAll('#summary tbody tr')].map(tr => ({
      claim: text(tr.cells[1]), measured: text(tr.cells[3]), verdict: text(tr.cells[4]),
      badge: tr.cells[4].querySelector('.badge') ? tr.cells[4].querySelector('.badge').className : null,
      target: !!document.getElementById(tr.cells[1].querySelector('a').getAttribute('href').slice(1))})),
    claims: [...document.querySelectorAll('div.claim')].map(c => ({
      id: c.id, verdict: text(c.querySelector('h3 .badge')),
      images: [...c.querySelectorAll('img')].map(i => ({alt: i.alt, shown: shown(i)}))})),
  };
  document.body.setAttribute('data-probe', JSON.stringify(probe));
});</script>"""


@pytest.mark.skipif(
    _browser() is None, reason="headless Chromium not installed (Debian: apt install chromium)"
)
def test_report_opens_in_headless_chromium(smoke_report, tmp_path):
    """Chromium loads index.html and runs a script that reads back, from the rendered page, the claims
    table (claim, measured value, verdict and its badge, working link), each claim's verdict, and every
    image (decoded and laid out)."""
    ctx, index, sections = smoke_report
    probe = tmp_path / "probe.html"
    probe.write_text(
        index.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"), encoding="utf-8"
    )
    command = [_browser(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000",
               "--dump-dom", probe.as_uri()]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    found = re.search(r"data-probe=\"([^\"]+)\"", done.stdout)
    assert found, done.stderr[-2000:]
    result = json.loads(html.unescape(found.group(1)))
    claims = [(s, i, c) for s in sections for i, c in enumerate(s.claims)]
    assert result["sections"] == [s.key for s in sections]
    assert [(r["claim"], r["measured"], r["verdict"]) for r in result["summary"]] == [
        (c.title.strip(), c.measured.strip(), c.verdict) for _, _, c in claims
    ]
    assert all(r["target"] for r in result["summary"])
    assert [r["badge"] for r in result["summary"]] == [f"badge {BADGE[c.verdict]}" for _, _, c in claims]
    assert [(r["id"], r["verdict"]) for r in result["claims"]] == [
        (f"{s.key}-{i}", c.verdict) for s, i, c in claims
    ]
    images = [(image["alt"], image["shown"]) for r in result["claims"] for image in r["images"]]
    assert images == [(rel, True) for _, _, c in claims for rel in c.plots] and len(images) == 9
