"""Backprop's ceiling for top-block training: AdamW on the top K blocks over the same cached bottom states.

    PYTHONPATH=src python benchmarks/top_block_backprop.py [--k 1,2,4] [--lrs 3e-5,1e-4] [--steps 250]
                                                           [--head]

The SST-2 protocol of benchmarks/zo_convergence.py (SmolLM2-135M, 1000 train / 100 dev / 200 test examples,
64 tokens, data seed 0, from the prompt), batch 8, the classification loss of ``--zo-blocks`` runs: what any
optimizer, forward-only or not, can reach when only the top K blocks (and the final norm) train. Dev and test
accuracy every 50 steps (read through the cache, equal to the whole model's: tests/lm/test_top_blocks.py);
per learning rate the test accuracy at the best dev step. With ``--head`` the LM head's rows train too (untied
from the input embeddings, which stay frozen, so the cached states do not move; only the label words' rows
get gradients): does the frozen head cap the ceiling? Saves benchmarks/results/top_block_backprop.json, one
entry per K and head setting (a run keeps the entries of the others).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from hdopt.finetune.batches import step_indices
from hdopt.io import atomic_write_json
from hdopt.lm.models import load_model
from hdopt.lm.scoring import encode_examples
from hdopt.lm.tasks import load_split, resolve_task, sample_protocol
from hdopt.lm.top_blocks import TopBlocks, TrunkCache, top_classification_loss, top_predictions

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = "1000 train / 100 dev / 200 test, 64 tokens"
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))


def run(k: int, lr: float, steps: int, batch_size: int = 8, head: bool = False) -> dict:
    model, tokenizer = load_model("smollm2-135m")
    model.eval().requires_grad_(False)
    if head:  # a copy of the tied head: the input embeddings (and so the cache) stay as they were
        out = model.get_output_embeddings()
        out.weight = torch.nn.Parameter(out.weight.detach().clone())
    task = resolve_task("sst2")
    pools = load_split(task, "train", DATA_DIR), load_split(task, "eval", DATA_DIR)
    splits = sample_protocol(*pools, 0, 1000, 100, 200)
    blocks = TopBlocks(model, k)
    params = [p.requires_grad_(True) for _, p in blocks.top_parameters()]
    groups = [{"params": params}]
    if head:  # no weight decay: rows without a gradient (all but the label words') stay bitwise
        head_weight = model.get_output_embeddings().weight.requires_grad_(True)
        groups.append({"params": [head_weight], "weight_decay": 0.0})
    cache, start = TrunkCache(blocks), time.perf_counter()
    encoded = {name: [encode_examples(tokenizer, part[i : i + 50], 64) for i in range(0, len(part), 50)]
               for name, part in (("dev", splits.dev), ("test", splits.eval))}  # fmt: skip
    for batches in encoded.values():
        for batch in batches:
            cache.add(batch)

    def accuracy(name: str) -> float:
        batches = encoded[name]
        hits = sum(int((top_predictions(blocks, cache.hidden(b), b) == b.labels).sum()) for b in batches)
        return round(100.0 * hits / sum(len(b.labels) for b in batches), 1)

    opt, curve = torch.optim.AdamW(groups, lr=lr), [(0, accuracy("dev"), accuracy("test"))]
    for step in range(steps):
        chosen = [splits.train[i] for i in step_indices(len(splits.train), batch_size, 0, step)]
        batch = encode_examples(tokenizer, chosen, 64)
        cache.add(batch)
        opt.zero_grad()
        top_classification_loss(blocks, cache.hidden(batch), batch).backward()
        opt.step()
        if (step + 1) % 50 == 0:
            curve.append((step + 1, accuracy("dev"), accuracy("test")))
    best = max(curve, key=lambda point: (point[1], -point[0]))
    seconds = round(time.perf_counter() - start, 1)
    return {"k": k, "head": head, "lr": lr, "steps": steps, "batch_size": batch_size, "curve": curve,
            "best_dev": best[1], "best_step": best[0], "test_at_best_dev": best[2], "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--k", default="1", help="how many top blocks train; several as 1,2,4")
    parser.add_argument("--lrs", default="3e-5,1e-4")
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--head", action="store_true", help="the LM head's rows train too (untied)")
    args = parser.parse_args()
    path = ROOT / "benchmarks" / "results" / "top_block_backprop.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    # the other settings' measurements are kept (an entry from before --head existed trained no head)
    ceilings = {(c["k"], c.get("head", False)): {"head": False, **c} for c in saved.get("ceilings", [])}
    for k in (int(x) for x in args.k.split(",")):
        rows = [run(k, float(lr), args.steps, head=args.head) for lr in args.lrs.split(",")]
        for r in rows:
            what = f"K={r['k']}" + (" and head" if r["head"] else "")
            print(f"{what} lr {r['lr']:g}: best dev {r['best_dev']} (step {r['best_step']}), "
                  f"test {r['test_at_best_dev']}, {r['seconds']} s")  # fmt: skip
        chosen = max(rows, key=lambda r: (r["best_dev"], -r["best_step"]))  # the lr chosen on dev
        command = f"python benchmarks/top_block_backprop.py --k {k} --lrs {args.lrs} --steps {args.steps}"
        command += " --head" if args.head else ""
        when = time.strftime("%Y-%m-%d %H:%M", time.gmtime())
        ceilings[k, args.head] = {"k": k, "head": args.head, "command": command,
                                  "threads": torch.get_num_threads(), "date_utc": when, "rows": rows,
                                  "chosen_lr": chosen["lr"], "chosen_best_dev": chosen["best_dev"],
                                  "chosen_test": chosen["test_at_best_dev"]}  # fmt: skip
        out = {"model": "smollm2-135m", "task": "sst2", "protocol": PROTOCOL,
               "ceilings": [ceilings[key] for key in sorted(ceilings)]}  # fmt: skip
        atomic_write_json(path, out)  # after each K: an interrupted sweep keeps what it measured


if __name__ == "__main__":
    main()
