"""What read-position training can reach, and how good node perturbation's estimate of it is.

    PYTHONPATH=src python benchmarks/read_adapters_ceiling.py estimates              # cosines (about 2 min)
    PYTHONPATH=src python benchmarks/read_adapters_ceiling.py ceiling --what adapters --rank 8 --lrs 1e-3,3e-3
    PYTHONPATH=src python benchmarks/read_adapters_ceiling.py ceiling --what blocks --lrs 3e-5
    PYTHONPATH=src python benchmarks/read_adapters_ceiling.py ceiling --what all-positions --lrs 3e-3
    PYTHONPATH=src python benchmarks/read_adapters_ceiling.py curve --directions 16   # also 32

The SST-2 protocol of benchmarks/zo_convergence.py (SmolLM2-135M, 1000 train / 100 dev / 200 test examples,
64 tokens, data seed 0, from the prompt). The frozen model's keys and values of every prompt before its last
token are cached (hdopt.lm.read_path), and training runs the last tokens alone through the blocks.

* ``estimates``: on the first 16 training prompts, at the start (``D`` = 0), the cosine between node
  perturbation's estimate of the read adapters' gradient (hdopt.finetune.read_node_perturbation) and
  backprop's, for several ranks, estimators and direction counts (five keys each; median and range), and
  of the ``coordinates`` estimator's forward differences (``--method read-adapters-exact``), with the copies
  each runs and what they cost in copies of the whole read path.
* ``ceiling``: backprop (AdamW, batch 8, constant lr) on the same read path, dev and test accuracy every 50
  steps, the test accuracy at the best dev step: ``--what adapters`` trains the read adapters of ``--rank``
  (what ``--method read-adapters`` trains), ``--what blocks`` every block's weights applied at the last token
  only (the context stays the frozen model's), ``--what all-positions`` the same adapters acting at every
  position (backprop through the whole model: the capacity the read path gives up by caching the context).
* ``curve``: node perturbation itself (``--method read-adapters``' estimator and AdamW step, one-sided, eps
  1e-2, batch 16, the run's data order and keys) with dev and test accuracy every 50 steps, of the adapters
  and of their exponential moving average (decay 0.99): where the test accuracy plateaus, against the one
  figure the protocol reads (the test accuracy at the best dev step).

Saves benchmarks/results/read_adapters_ceiling.json (each part keeps the others' entries).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hdopt.finetune.batches import step_indices
from hdopt.finetune.read_node_perturbation import ReadNodePerturbation
from hdopt.io import atomic_write_json
from hdopt.lm.models import load_model
from hdopt.lm.read_adapters import ReadAdapters, attach_read_adapters, body_and_layers
from hdopt.lm.read_path import ContextCache, read_path_losses, read_path_scores
from hdopt.lm.scoring import classification_loss, encode_examples, predict
from hdopt.lm.tasks import load_split, resolve_task, sample_protocol
from hdopt.zo.noise import derive_key

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "read_adapters_ceiling.json"
DATA_DIR = os.environ.get("HDOPT_DATA_DIR", str(ROOT.parent / "shared" / "data"))
PROTOCOL = "SST-2, SmolLM2-135M, 1000 train / 100 dev / 200 test examples, 64 tokens, data seed 0"
DOWN = "read_adapters.down"
ESTIMATES = ((8, "central", 8), (8, "one-sided", 16), (8, "central", 16), (8, "one-sided", 32),
             (16, "central", 8), (16, "one-sided", 16), (4, "one-sided", 16),
             (8, "coordinates", None))  # fmt: skip (coordinates: every one of the L x r, no directions drawn)


def _setup():
    model, tokenizer = load_model("smollm2-135m")
    model.eval().requires_grad_(False)
    task = resolve_task("sst2")
    pools = load_split(task, "train", DATA_DIR), load_split(task, "eval", DATA_DIR)
    return model, tokenizer, sample_protocol(*pools, 0, 1000, 100, 200)


def _evaluation_batches(tokenizer, splits) -> dict[str, list]:
    """The dev and test examples, encoded in batches of 50."""
    return {name: [encode_examples(tokenizer, part[i : i + 50], 64) for i in range(0, len(part), 50)]
            for name, part in (("dev", splits.dev), ("test", splits.eval))}  # fmt: skip


def _accuracy(batches: list, predicted) -> float:
    """Accuracy in percent (one decimal) of ``predicted(batch)``, each batch's predicted options."""
    hits = sum(int((predicted(batch) == batch.labels).sum()) for batch in batches)
    return round(100.0 * hits / sum(len(batch.labels) for batch in batches), 1)


def estimates() -> dict:
    rows = []
    for rank, estimator, directions in ESTIMATES:
        model, tokenizer, splits = _setup()  # a fresh model for each adapter (loads in about a second)
        batch = encode_examples(tokenizer, list(splits.train[:16]), 64)
        adapters = attach_read_adapters(model, rank, 0)
        adapters.down.requires_grad_(True)
        cache = ContextCache(model)
        cache.add(batch)
        context = cache.context(batch)
        (true,) = torch.autograd.grad(read_path_losses(model, context, batch)[0].mean(), [adapters.down])
        adapters.down.requires_grad_(False)
        nodes = ReadNodePerturbation(model, DOWN, directions, 1e-2, estimator=estimator)
        cosines, errors = [], []
        for key in range(5):
            got = nodes.estimate(context, batch, key).grads[DOWN]
            cosines.append(round(float(torch.nn.functional.cosine_similarity(true.flatten(), got.flatten(),
                                                                             dim=0)), 3))  # fmt: skip
            errors.append(float((got - true).norm() / true.norm()))
        rows.append({"rank": rank, "estimator": estimator, "directions": nodes.directions,
                     "copies": nodes.copies, "path_copies": nodes.path_copies, "cosines": cosines,
                     "median_cosine": statistics.median(cosines),
                     "median_relative_error": round(statistics.median(errors), 4)})  # fmt: skip
        print(rows[-1], flush=True)
    return {"batch": 16, "eps": 1e-2, "rows": rows}


def _best(curve: list) -> tuple:
    """The protocol's point of a curve of (step, dev, test, ...): the best dev, the earliest on ties."""
    return max(curve, key=lambda point: (point[1], -point[0]))


def all_positions(rank: int, lr: float, steps: int, batch_size: int = 8) -> dict:
    """Backprop on rank-``rank`` adapters (as the read adapters: ``D`` trained from zeros, ``U`` fixed, drawn
    from seed 0) that act at every position of every block, through the whole model."""
    model, tokenizer, splits = _setup()
    _, layers = body_and_layers(model)
    adapters = ReadAdapters(len(layers), model.config.hidden_size, rank, 0)  # U and D, without the read hooks
    down = adapters.down.requires_grad_(True)

    def everywhere(index: int, layer: torch.nn.Module):
        def hook(module, args, kwargs, output):
            hidden_in = args[0] if args else kwargs["hidden_states"]
            out = output[0] if isinstance(output, tuple) else output
            x = layer.input_layernorm(hidden_in)
            out = out + (x @ down[index].T) @ adapters.up[index].T
            return (out, *output[1:]) if isinstance(output, tuple) else out

        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(everywhere(index, layer), with_kwargs=True)
    start = time.perf_counter()
    encoded = _evaluation_batches(tokenizer, splits)

    @torch.no_grad()
    def accuracy(name: str) -> float:
        return _accuracy(encoded[name], lambda b: predict(model, b)[0])

    opt, curve = torch.optim.AdamW([down], lr=lr, weight_decay=0.0), [(0, accuracy("dev"), accuracy("test"))]
    for step in range(steps):
        chosen = [splits.train[i] for i in step_indices(len(splits.train), batch_size, 0, step)]
        opt.zero_grad()
        classification_loss(model, encode_examples(tokenizer, chosen, 64)).backward()
        opt.step()
        if (step + 1) % 50 == 0:
            curve.append((step + 1, accuracy("dev"), accuracy("test")))
            print("all-positions", rank, lr, curve[-1], flush=True)
    best = _best(curve)
    return {"what": "all-positions", "rank": rank, "lr": lr, "steps": steps, "batch_size": batch_size,
            "curve": curve, "best_dev": best[1], "best_step": best[0], "test_at_best_dev": best[2],
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def ceiling(what: str, rank: int, lr: float, steps: int, batch_size: int = 8) -> dict:
    if what == "all-positions":
        return all_positions(rank, lr, steps, batch_size)
    model, tokenizer, splits = _setup()
    if what == "adapters":
        adapters = attach_read_adapters(model, rank, 0)
        params = [adapters.down.requires_grad_(True)]
    else:  # every block's weights, used at the last token only: the cache keeps the frozen context
        params = [p.requires_grad_(True) for p in model.model.layers.parameters()]
    cache, start = ContextCache(model, "/tmp"), time.perf_counter()
    encoded = _evaluation_batches(tokenizer, splits)
    for batches in encoded.values():
        for batch in batches:
            cache.add(batch)
    train = [encode_examples(tokenizer, splits.train[i : i + 50], 64) for i in range(0, 1000, 50)]
    for batch in train:
        cache.add(batch)

    @torch.no_grad()
    def accuracy(name: str) -> float:
        return _accuracy(encoded[name], lambda b: read_path_scores(model, cache.context(b), b)[0].argmax(1))

    opt, curve = torch.optim.AdamW(params, lr=lr, weight_decay=0.0), [(0, accuracy("dev"), accuracy("test"))]
    for step in range(steps):
        chosen = [splits.train[i] for i in step_indices(len(splits.train), batch_size, 0, step)]
        batch = encode_examples(tokenizer, chosen, 64)
        opt.zero_grad()
        read_path_losses(model, cache.context(batch), batch)[0].mean().backward()
        opt.step()
        if (step + 1) % 50 == 0:
            curve.append((step + 1, accuracy("dev"), accuracy("test")))
            print(what, rank, lr, curve[-1], flush=True)
    cache.close()
    best = _best(curve)
    return {"what": what, "rank": rank if what == "adapters" else None, "lr": lr, "steps": steps,
            "batch_size": batch_size, "curve": curve, "best_dev": best[1], "best_step": best[0],
            "test_at_best_dev": best[2], "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def curve(directions: int, lr: float = 1e-3, steps: int = 800, batch_size: int = 16,
          decay: float = 0.99) -> dict:  # fmt: skip
    """Node perturbation of the rank-8 read adapters as ``--method read-adapters`` runs it (seed 0), with dev
    and test accuracy every 50 steps of the adapters and of their moving average."""
    model, tokenizer, splits = _setup()
    adapters = attach_read_adapters(model, 8, 0)
    cache, start = ContextCache(model, "/tmp"), time.perf_counter()
    encoded = _evaluation_batches(tokenizer, splits)
    for batch in [b for batches in encoded.values() for b in batches]:
        cache.add(batch)
    for first in range(0, len(splits.train), 50):
        cache.add(encode_examples(tokenizer, splits.train[first : first + 50], 64))

    @torch.no_grad()
    def accuracies() -> tuple[float, float]:
        def read(b):
            return read_path_scores(model, cache.context(b), b)[0].argmax(1)

        return _accuracy(encoded["dev"], read), _accuracy(encoded["test"], read)

    nodes = ReadNodePerturbation(model, DOWN, directions, 1e-2, estimator="one-sided")
    down = adapters.down
    opt, average = torch.optim.AdamW([down], lr=lr, weight_decay=0.0), down.detach().clone()
    points = [(0, *accuracies(), *accuracies())]
    for step in range(steps):
        chosen = [splits.train[i] for i in step_indices(len(splits.train), batch_size, 0, step)]
        batch = encode_examples(tokenizer, chosen, 64)
        down.grad = nodes.estimate(cache.context(batch), batch, derive_key(0, step, 0)).grads[DOWN]
        opt.step()
        with torch.no_grad():
            average.mul_(decay).add_(down, alpha=1 - decay)
        if (step + 1) % 50 == 0:
            raw, kept = accuracies(), down.detach().clone()
            with torch.no_grad():
                down.copy_(average)
                averaged = accuracies()
                down.copy_(kept)
            points.append((step + 1, *raw, *averaged))
            print("curve", directions, points[-1], flush=True)
    cache.close()
    best, best_average = _best(points), _best([(p[0], p[3], p[4]) for p in points])
    late = [p for p in points if p[0] >= 200]
    return {"directions": directions, "lr": lr, "steps": steps, "batch_size": batch_size, "decay": decay,
            "columns": ["step", "dev", "test", "average dev", "average test"], "curve": points,
            "best_dev": best[1], "best_step": best[0], "test_at_best_dev": best[2],
            "average_best_dev": best_average[1], "average_test_at_best_dev": best_average[2],
            "mean_test_from_200": round(statistics.mean(p[2] for p in late), 2) if late else None,
            "average_mean_test_from_200": round(statistics.mean(p[4] for p in late), 2) if late else None,
            "seconds": round(time.perf_counter() - start, 1)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("estimates")
    p = sub.add_parser("ceiling")
    p.add_argument("--what", choices=("adapters", "blocks", "all-positions"), default="adapters")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lrs", default="1e-3,3e-3")
    p.add_argument("--steps", type=int, default=600)
    c = sub.add_parser("curve")
    c.add_argument("--directions", type=int, default=16)
    args = parser.parse_args()
    when = {"threads": torch.get_num_threads(), "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
    if args.command == "estimates":
        entry = {**estimates(), **when, "command": "python benchmarks/read_adapters_ceiling.py estimates"}
    elif args.command == "curve":
        command = f"python benchmarks/read_adapters_ceiling.py curve --directions {args.directions}"
        entry = {**curve(args.directions), **when, "command": command}
    else:
        rows = [ceiling(args.what, args.rank, float(lr), args.steps) for lr in args.lrs.split(",")]
        chosen = max(rows, key=lambda r: (r["best_dev"], -r["best_step"]))  # the lr chosen on dev
        command = (f"python benchmarks/read_adapters_ceiling.py ceiling --what {args.what} "
                   f"--rank {args.rank} --lrs {args.lrs} --steps {args.steps}")  # fmt: skip
        entry = {"what": args.what, "rank": chosen["rank"], "command": command, **when, "rows": rows,
                 "chosen_lr": chosen["lr"], "chosen_best_dev": chosen["best_dev"],
                 "chosen_test": chosen["test_at_best_dev"]}  # fmt: skip
    # read the file when the part is done, not when it started: parts run side by side keep each other's
    saved = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"protocol": PROTOCOL, "ceilings": []}
    if args.command == "estimates":
        saved["estimates"] = entry
    elif args.command == "curve":
        kept = [c for c in saved.get("curves", []) if c["directions"] != args.directions]
        saved["curves"] = sorted(kept + [entry], key=lambda c: c["directions"])
    else:
        key = (entry["what"], entry["rank"])
        saved["ceilings"] = [c for c in saved["ceilings"] if (c["what"], c["rank"]) != key] + [entry]
    atomic_write_json(RESULTS, saved)


if __name__ == "__main__":
    main()
