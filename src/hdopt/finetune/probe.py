"""Linear probing (``lp``): logistic regression on frozen last-prompt-token features (MeZO's LP baseline).

The feature of an example is the final hidden state at the last prompt token (before any option), from
the frozen body. A logistic regression (scikit-learn, L2, features divided by their train standard
deviation, no intercept: :func:`hdopt.finetune.label_head.fit_probe`) is fit on the train features, its
C picked on dev from a grid (or ``--lp-c``), and scored on dev and test. Without an intercept the probe is
exactly a set of LM-head rows for one-token label words, which ``--lp-init`` starts other methods from.
This covers tasks with fixed label words; on multiple-choice and
generation tasks ``lp`` is MeZO's head tuning instead (:mod:`hdopt.finetune.head`, trained by the backprop
loop of :mod:`hdopt.finetune.trainer`; see :meth:`hdopt.finetune.methods.Method.for_task`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from hdopt.finetune import rundir
from hdopt.finetune.checkpoint import save_checkpoint
from hdopt.finetune.label_head import fit_probe
from hdopt.io import atomic_write_json


@torch.no_grad()
def last_token_features(model, tokenizer, examples, max_length: int, batch_size: int,
                        progress: str | None = None) -> np.ndarray:  # fmt: skip
    """``[N, hidden]`` float64 features: the body's output at each prompt's last token (``progress``: a
    tqdm bar with that description)."""
    device = model.get_input_embeddings().weight.device
    body = model.base_model
    out = []
    starts = range(0, len(examples), batch_size)
    for i in tqdm(starts, desc=progress, unit="batch", disable=progress is None, leave=False):
        rows = [tokenizer(e.prompt).input_ids[-max_length:] for e in examples[i : i + batch_size]]
        width = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)], mask[r, : len(row)] = torch.tensor(row), 1
        hidden = body(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)[0]
        last = mask.sum(1).to(device) - 1
        out.append(hidden[torch.arange(len(rows), device=device), last].double().cpu().numpy())
    return np.concatenate(out)


def linear_probe(s) -> tuple[dict, Path]:
    """Fit and evaluate the probe for a trainer ``Setup``; writes the run folder."""
    if not s.task.label_words:
        raise ValueError(
            f"the logistic-regression probe needs fixed label words and {s.task.name!r} has none: run lp "
            "through hdopt.finetune.finetune, which tunes the LM head on such tasks"
        )
    folder = rundir.new_run_dir(s.cfg.train.output_dir, s.task.name, s.method.name, s.cfg.model.model)
    with rundir.claim(folder, fresh=True):
        return _fit_and_write(s, folder), folder


def _fit_and_write(s, folder: Path) -> dict:
    cfg = s.cfg
    atomic_write_json(folder / rundir.CONFIG, cfg.to_dict(), default=str)
    start = time.perf_counter()
    s.model.eval()

    def feats(examples, split: str):
        size, bar = cfg.train.eval_batch_size, f"lp features ({split})" if cfg.train.progress else None
        return last_token_features(s.model, s.tokenizer, examples, cfg.data.max_length, size, bar)

    def labels(examples) -> np.ndarray:
        return np.array([e.label for e in examples])

    dev_x = feats(s.splits.dev, "dev") if s.splits.dev else None
    dev_y = labels(s.splits.dev) if s.splits.dev else None
    coef, c, _, dev = fit_probe(feats(s.splits.train, "train"), labels(s.splits.train), dev_x, dev_y,
                                len(s.task.label_words), cfg.method.lp_c, cfg.train.seed)  # fmt: skip
    predicted = np.argmax(feats(s.splits.eval, "test") @ coef.T, axis=1)
    test = round(100.0 * float(np.mean(predicted == labels(s.splits.eval))), 2)
    save_checkpoint(folder / rundir.BEST, [("coef", torch.from_numpy(coef))], meta={"dev": dev, "c": c})
    results = {
        "status": "completed", "method": "lp", "model": cfg.model.model, "task": s.task.name,
        "metric": "accuracy", "steps": 0, "forwards": len(s.splits.train) + len(s.splits.dev),
        "backwards": 0, "wall_seconds": round(time.perf_counter() - start, 2), "best_dev": dev,
        "best_step": 0, "test_accuracy": test, "test": test,
        "trainable_parameters": int(coef.size), "lp_c": c,
        "peak_memory_mib": round(rundir.peak_memory_mib(s.device), 1),
    }  # fmt: skip
    rundir.write_jsonl(folder / rundir.METRICS, [{"step": 0, "dev_accuracy": dev}])
    atomic_write_json(folder / rundir.RESULTS, results, default=str)
    return results
