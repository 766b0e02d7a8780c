"""Write the TinT tables into docs/tint.md and the README's TinT row from the saved results (nothing typed).

``python benchmarks/tint.py tables --update-docs``: every ``<!-- table:NAME -->`` ... ``<!-- /table:NAME -->``
block of docs/tint.md is replaced by the table NAME of :func:`tint.tables_by_name`, and the README line that
starts with :data:`README_ROW` by :func:`readme_row`.
"""

from __future__ import annotations

import re
import statistics
from pathlib import Path

from hdopt.lm.rundir import write_text
from hdopt.tint.results import read_json

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README_ROW = "| TinT simulates SGD inside a forward pass |"


def replace_blocks(text: str, blocks: dict[str, str]) -> tuple[str, list[str]]:
    """``text`` with each marked block's body replaced; also the names of the blocks found."""
    found = []
    for name, body in blocks.items():
        pattern = re.compile(rf"(<!-- table:{name} -->\n).*?(<!-- /table:{name} -->)", re.S)
        if pattern.search(text):
            found.append(name)
            text = pattern.sub(lambda m, body=body: m.group(1) + body + "\n" + m.group(2), text)
    return text, found


def readme_row(fewshot_accs) -> str:
    """The README's TinT row: exactness, the compact network's size and agreement, every task's accuracy.

    ``fewshot_accs(task, shots, method)`` -> accuracy per seed (benchmarks/tint.py ``_accs``).
    """
    checks = read_json(RESULTS / "tint_checks.json", {})
    sizes = {(r["aux"], r["layers"], r["steps"]): r for r in read_json(RESULTS / "tint_sizes.json",
                                                                       {"rows": []})["rows"]}
    parts = []
    if "exact_vs_sgd_fp64/gpt2/1step_sum" in checks:
        exact = checks["exact_vs_sgd_fp64/gpt2/1step_sum"]
        parts.append(f"exact mode vs autograd SGD: {exact:.0e} (GPT-2, fp64)")
    gpt2 = sizes.get(("gpt2-shape", 12, 1))
    if gpt2:
        parts.append(f"compact explicit network for GPT-2 (12 layers x 1 step): "
                     f"{gpt2['compact']['params_reused_with_prefix'] / 1e9:.2f}B parameters with its prefix "
                     f"(reference: {gpt2['reference'][0] / 1e9:.2f}B)")
    import tint_compact

    rows = [r for r in tint_compact.agreement_rows() if r["dtype"] == "float64"]
    if rows:
        n = sum(r["n"] for r in rows)
        agree = sum(r["agreement"] * r["n"] for r in rows) / n
        parts.append(f"its own forward pass on SmolLM2 agrees with the structured rule on {100 * agree:.0f}%"
                     f" of {n} few-shot predictions (largest label-logit difference "
                     f"{max(r['max_abs_logit_diff'] for r in rows):.0e}, fp64)")
    accs = []
    for task, name in (("sst2", "SST-2"), ("mr", "MR"), ("cr", "CR")):
        per_seed = [fewshot_accs(task, 32, m) for m in ("icl", "tint", "ft")]
        if all(per_seed):
            cells = [f"{100 * statistics.mean(a):.1f} ± {100 * statistics.pstdev(a):.1f}" for a in per_seed]
            accs.append(f"{name} " + " / ".join(cells))
    if accs:
        parts.append("32-shot ICL / TinT (structured, fp32) / fine-tuning, mean ± std over 3 demonstration "
                     "seeds, 200 examples each: " + "; ".join(accs))
    return f"{README_ROW} {'; '.join(parts)} | [tint](docs/tint.md) |"


def update(blocks: dict[str, str], fewshot_accs) -> None:
    doc = ROOT / "docs" / "tint.md"
    text, found = replace_blocks(doc.read_text(), {k: v for k, v in blocks.items() if v})
    write_text(doc, text)
    readme = ROOT / "README.md"
    lines = readme.read_text().splitlines(keepends=True)
    row = readme_row(fewshot_accs) + "\n"
    lines = [row if line.startswith(README_ROW) else line for line in lines]
    write_text(readme, "".join(lines))
    print(f"updated docs/tint.md blocks {found} and the README's TinT row")
