"""Peak memory of one training step per method, each measured alone in a fresh process.

``python -m hdopt.finetune.peak_memory --model M --mode mezo --batch 16 --length 32`` loads the model,
resets the peak counter (VmHWM on Linux; CUDA's peak on a GPU), runs ``--repeats`` steps on a random batch
with the LM loss over all positions, and prints one JSON line. :func:`measure` runs that in a subprocess so
that the peaks of different modes never mix.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MODES = ("inference", "mezo", "mezo-lora", "ft-prefix", "ft")


def probe(model_name: str, mode: str, batch: int, length: int, repeats: int = 1, device: str = "cpu") -> dict:
    """Run ``mode`` in this process and return its peak memory (MiB) with the model resident."""
    from hdopt.finetune.adapters import LoraSettings, add_lora
    from hdopt.finetune.prefix import add_prefix
    from hdopt.lm.models import load_model
    from hdopt.memory import peak_mib, reset_peak, rss_mib
    from hdopt.zo import ZOSGD

    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    torch.manual_seed(0)
    model, _ = load_model(model_name, "float32", device)
    model.eval()
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=model.device)
    if mode == "mezo-lora":
        model = add_lora(model, LoraSettings(), seed=0)
    if mode == "ft-prefix":
        model = add_prefix(model)
    params = [(n, p) for n, p in model.named_parameters() if mode in ("mezo", "ft") or p.requires_grad]
    cuda = ids.device.type == "cuda"  # a prefix wrapper has no .device
    loaded = torch.cuda.memory_allocated() / 2**20 if cuda else rss_mib() or 0.0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    exact = True if cuda else reset_peak()
    start = time.perf_counter()
    if mode == "inference":
        for _ in range(repeats):
            with torch.no_grad():
                model(input_ids=ids, labels=ids)
    elif mode.startswith("mezo"):
        zo = ZOSGD(params, lr=1e-7, eps=1e-3)
        for _ in range(repeats):
            zo.step(lambda: model(input_ids=ids, labels=ids).loss)
    else:
        model.train()
        adam = torch.optim.AdamW([p for _, p in params], lr=1e-7)
        for _ in range(repeats):
            adam.zero_grad(set_to_none=True)
            model(input_ids=ids, labels=ids).loss.backward()
            adam.step()
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_mib()
    return {"model": model_name, "mode": mode, "batch": batch, "length": length, "device": str(ids.device),
            "loaded_mib": round(loaded, 1), "peak_mib": round(peak, 1), "peak_excludes_loading": bool(exact),
            "seconds_per_step": round(seconds, 3),
            "trainable": sum(p.numel() for _, p in params)}  # fmt: skip


def measure(model_name: str, mode: str, batch: int, length: int, repeats: int = 1, device: str = "cpu",
            timeout: float = 1800, threads: int | None = None) -> dict:  # fmt: skip
    """:func:`probe` in a fresh Python process (same interpreter and import path); raises on failure."""
    cmd = [
        sys.executable,
        "-m",
        "hdopt.finetune.peak_memory",
        "--model",
        model_name,
        "--mode",
        mode,
        "--batch",
        str(batch),
        "--length",
        str(length),
        "--repeats",
        str(repeats),
        "--device",
        device,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"memory probe {mode} on {model_name} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--mode", choices=MODES, required=True)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    print(json.dumps(probe(args.model, args.mode, args.batch, args.length, args.repeats, args.device)))


if __name__ == "__main__":
    main()
