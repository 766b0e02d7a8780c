"""Benchmark: peak memory of the Hugging Face Trainer with AdamW and of ZOTrainer, on one model and batch.

Three modes, each in a fresh Python process (so their peaks never mix), on SmolLM2-135M (float32, CPU) and
the same seeded batches of random tokens with the LM loss over all positions:

* ``inference``: ``--steps`` forward passes under ``torch.no_grad`` (the floor);
* ``zo``: ``ZOTrainer(model, args).train()`` for ``--steps`` steps (ZOSGD: MeZO);
* ``adamw``: ``Trainer(model, args).train()`` for ``--steps`` steps (``optim="adamw_torch"``).

Each process loads the model, reads every weight once (a loaded checkpoint may be memory-mapped: its pages
become resident when first read), builds the trainer, then resets the kernel's peak-RSS counter (VmHWM) and
runs the mode: the peak includes what the run adds to the loaded process, AdamW's state too (allocated at its
first step). The ZO process also checks that no parameter has a ``.grad`` afterwards. The time per step is
CPU time (all threads), which a shared machine's load does not inflate as it does wall time.

Run:  python benchmarks/hf_trainer_memory.py [--model smollm2-135m] [--batch 4] [--length 64] [--steps 3]
Saves benchmarks/results/hf_trainer_memory.json (and .md, the table docs/integrations.md shows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hdopt.io import atomic_write_bytes, atomic_write_json

RESULTS = Path(__file__).parent / "results"
MODES = ("inference", "zo", "adamw")


def _batches(vocab: int, batch: int, length: int, steps: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.randint(0, vocab, (batch * steps, length), generator=torch.Generator().manual_seed(0))
    return [{"input_ids": row, "labels": row} for row in ids]


def _trainer(mode: str, model, data, out: str, args):
    from transformers import Trainer, TrainingArguments, default_data_collator

    from hdopt.integrations.transformers import ZOTrainer

    training = TrainingArguments(
        out, max_steps=args.steps, per_device_train_batch_size=args.batch, learning_rate=1e-6,
        optim="adamw_torch", lr_scheduler_type="constant", save_strategy="no", report_to="none",
        use_cpu=True, disable_tqdm=True, logging_steps=args.steps,
    )  # fmt: skip
    if mode == "zo":
        return ZOTrainer(model, training, train_dataset=data, data_collator=default_data_collator,
                         zo_optimizer="zosgd", zo_kwargs={"eps": 1e-3})  # fmt: skip
    return Trainer(model, training, train_dataset=data, data_collator=default_data_collator)


def probe(mode: str, args) -> dict:
    """Run ``mode`` in this process; its peak RSS (MiB) with the model and trainer already built."""
    from transformers.utils import logging as hf_logging

    from hdopt.lm.models import load_model
    from hdopt.memory import peak_mib, reset_peak, rss_mib

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, "float32", "cpu")
    with torch.no_grad():
        sum(float(p.sum()) for p in model.parameters())  # every weight page resident before the reset
    data = _batches(model.config.vocab_size, args.batch, args.length, args.steps)
    with tempfile.TemporaryDirectory() as out:
        trainer = None if mode == "inference" else _trainer(mode, model, data, out, args)
        loaded = rss_mib() or 0.0
        exact = reset_peak()
        start = time.process_time()
        if trainer is None:
            with torch.no_grad():
                for i in range(args.steps):
                    rows = data[i * args.batch : (i + 1) * args.batch]
                    ids = torch.stack([r["input_ids"] for r in rows])
                    model(input_ids=ids, labels=ids)
        else:
            trainer.train()
        seconds = (time.process_time() - start) / args.steps
        peak = peak_mib()
    grads = sum(p.grad is not None for p in model.parameters())
    return {"mode": mode, "loaded_mib": round(loaded, 1), "peak_mib": round(peak, 1),
            "added_mib": round(peak - loaded, 1), "peak_excludes_loading": bool(exact),
            "cpu_seconds_per_step": round(seconds, 2), "parameters_with_grad": grads,
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def measure(mode: str, args) -> dict:
    """:func:`probe` in a fresh Python process (this interpreter, this import path)."""
    cmd = [sys.executable, __file__, "--probe", mode, "--model", args.model, "--batch", str(args.batch),
           "--length", str(args.length), "--steps", str(args.steps),
           "--threads", str(args.threads)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env=dict(os.environ))
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} probe failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(result: dict) -> str:
    rows = ["| mode | peak RSS (MiB) | added to the loaded process (MiB) | peak / inference | CPU s/step |",
            "|---|---|---|---|---|"]  # fmt: skip
    floor = result["modes"]["inference"]["peak_mib"]
    names = {"inference": "inference (no_grad forward)", "zo": "ZOTrainer (ZOSGD)",
             "adamw": "Trainer + AdamW"}  # fmt: skip
    for mode in MODES:
        m = result["modes"][mode]
        rows.append(f"| {names[mode]} | {m['peak_mib']:.0f} | {m['added_mib']:.0f} | "
                    f"{m['peak_mib'] / floor:.2f}x | {m['cpu_seconds_per_step']:.1f} |")  # fmt: skip
    setting = result["setting"]
    rows.append("")
    rows.append(
        f"{setting['model']} float32, batch {setting['batch']} x {setting['length']} tokens, "
        f"{setting['steps']} steps, {setting['threads']} thread(s), {result['hardware']}; "
        f"AdamW / ZO peak: {result['ratios']['adamw_over_zo']:.2f}x"
    )
    return "\n".join(rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "hf_trainer_memory.json")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args)))
        return
    modes = {}
    for mode in MODES:
        modes[mode] = measure(mode, args)
        print(json.dumps(modes[mode]), flush=True)
    if modes["zo"]["parameters_with_grad"]:
        raise RuntimeError("ZOTrainer left .grad buffers: the measurement is not of a forward-only run")
    import transformers

    result = {
        "command": " ".join(["python benchmarks/hf_trainer_memory.py", *sys.argv[1:]]),
        "hardware": f"{platform.machine()} CPU, {os.cpu_count()} cores ({platform.platform()})",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "setting": {"model": args.model, "batch": args.batch, "length": args.length, "steps": args.steps,
                    "threads": args.threads},  # fmt: skip
        "modes": modes,
        "ratios": {
            "zo_over_inference": round(modes["zo"]["peak_mib"] / modes["inference"]["peak_mib"], 3),
            "adamw_over_zo": round(modes["adamw"]["peak_mib"] / modes["zo"]["peak_mib"], 3),
            "adamw_over_inference": round(modes["adamw"]["peak_mib"] / modes["inference"]["peak_mib"], 3),
        },
    }
    atomic_write_json(args.out, result)
    markdown = table(result)
    atomic_write_bytes(args.out.with_suffix(".md"), markdown.encode())
    print(markdown)


if __name__ == "__main__":
    main()
