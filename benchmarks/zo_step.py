"""Benchmark: cost and memory of a zeroth-order step vs a forward pass, against the reference algorithm.

Measured side by side in one run on the same model and batch (SmolLM2-135M, 16 x 32 tokens, LM loss over all
positions by default):

* forward: one ``model(input_ids, labels)`` pass under ``torch.no_grad``;
* hdopt ZOSGD step, Gaussian and Rademacher noise (perturbation at forward time, chunked counter-based noise);
* a reference-style MeZO step re-implemented from the paper's description: ``torch.manual_seed`` before each
  of four sweeps that draw ``z ~ N(0, I)`` per tensor with ``torch.normal``; out-of-place
  ``p.data = p.data + c * z`` for +eps, -2eps, +eps and the update;
* on request (``--modes``), the later rules at their paper defaults: ``fzoo`` (N = 8, 9 forwards a step) and
  ``hizoo`` (3 forwards and a diagonal Hessian buffer the size of the trainable parameters).
  ``--trainable last-block`` trains only the last decoder block (the top-block / adapter-sized case).

Rounds interleave the four measurements so machine noise hits them alike; the figures are medians over
rounds of the per-round ratios. Peak memory is measured in a fresh subprocess per mode, after the model is
loaded (CPU: peak RSS with the kernel's peak counter reset; CUDA: ``torch.cuda.max_memory_allocated``).
Also measured (``--restore-only`` runs just this, in seconds): the exact restore. With the perturbation
written into the weights (hdopt's ``perturb="inplace"``) and lr = 0, the fraction of weights that differ
from the start after 100 steps in float32, bfloat16 and float16, for hdopt and for the reference round trip;
saved to benchmarks/results/zo_restore.json (and .md).

A mode may also be any registered optimizer (``hdopt.zo.OPTIMIZERS``: ``lozo``, ``sparse-mezo``, ...) or
``lozo-m`` (LOZO with momentum 0.9), built with its paper's own hyperparameters (``paper_defaults``: rank,
interval, sparsity) and the benchmark's lr and eps.

Run:  python benchmarks/zo_step.py [--rounds 7] [--device cpu|cuda] [--modes forward,zosgd-gaussian]
                                   [--wait-idle 600] [--restore-only] [--trainable all|last-block]
Saves benchmarks/results/zo_step.json (and .md) unless --out says otherwise. ``--modes`` times (and probes the
memory of) a subset; ``forward`` is always included, as the unit. On a shared machine other processes slow
the many small ops of a step far more than the large GEMMs of a forward (a 2-thread op waits for a thread
that another process preempted), so the ratios are only comparable between quiet runs: ``--wait-idle``
starts each measurement once the CPUs are idle and repeats one during which other processes used CPU time;
the tries and the load average are recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hdopt.io import atomic_write_bytes
from hdopt.lm.models import load_model
from hdopt.memory import peak_mib, reset_peak
from hdopt.zo import OPTIMIZERS, ZOSGD
from hdopt.zo.noise import NoiseGenerator, chunks

RESULTS = Path(__file__).parent / "results"
MODES = ("forward", "zosgd-gaussian", "zosgd-rademacher", "reference", "fzoo", "hizoo")
DEFAULT_MODES = MODES[:4]
TRAINABLE = ("all", "last-block")
RULE_VARIANTS = {"lozo-m": ("lozo", {"momentum": 0.9})}  # a mode name -> (registry name, extra arguments)


# -- the reference algorithm, from the paper's description ---------------------------------------------
def _reference_sweep(params, seed: int, coef: float) -> None:
    torch.manual_seed(seed)
    for p in params:
        z = torch.normal(mean=0.0, std=1.0, size=p.shape, dtype=p.dtype, device=p.device)
        p.data = p.data + coef * z


@torch.no_grad()
def reference_step(params, closure, lr: float, eps: float, seed: int) -> float:
    """MeZO as published: perturb +eps, evaluate, -2eps, evaluate, +eps (restore), update along z."""
    _reference_sweep(params, seed, eps)
    loss_plus = float(closure())
    _reference_sweep(params, seed, -2 * eps)
    loss_minus = float(closure())
    _reference_sweep(params, seed, eps)
    grad = (loss_plus - loss_minus) / (2 * eps)
    _reference_sweep(params, seed, -lr * grad)
    return loss_plus


# -- measurements --------------------------------------------------------------------------------------
def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _setup(args):
    model, _ = load_model(args.model, dtype=args.dtype, device=args.device)
    model.eval()
    if args.trainable == "last-block":  # a decoder's last block (Llama-style model.model.layers)
        model.requires_grad_(False)
        model.model.layers[-1].requires_grad_(True)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=gen).to(args.device)

    def closure():
        return model(input_ids=ids, labels=ids).loss

    return model, closure


def _runner(mode: str, model, closure, args):
    params = [p for p in model.parameters() if p.requires_grad]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if mode == "forward":
        return lambda: torch.no_grad()(closure)()
    if mode == "reference":
        counter = iter(range(10**9))
        return lambda: reference_step(params, closure, args.lr, args.eps, seed=next(counter))
    if mode.startswith("zosgd-"):
        opt = ZOSGD(named, lr=args.lr, eps=args.eps, noise=mode.split("-")[1], seed=1)
    else:  # a registered rule with its paper's defaults (q, noise, estimator, the rule's own)
        name, extra = RULE_VARIANTS.get(mode, (mode, {}))
        cls = OPTIMIZERS.get(name)
        kwargs = {**cls.paper_defaults, "lr": args.lr, "eps": args.eps, **extra}
        opt = cls(named, seed=1, **kwargs)
    return lambda: opt.step(closure)


def _loadavg() -> float | None:
    try:
        return float(Path("/proc/loadavg").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _cpu_jiffies() -> tuple[int, int] | None:
    """(busy, total) CPU jiffies of the whole machine (Linux /proc/stat), None elsewhere."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    return sum(fields) - fields[3] - fields[4], sum(fields)


def _wait_idle(limit: float) -> None:
    """Wait (up to ``limit`` seconds) until the CPUs are >= 90% idle over half a second."""
    start = time.perf_counter()
    while time.perf_counter() - start < limit:
        before = _cpu_jiffies()
        time.sleep(0.5)
        after = _cpu_jiffies()
        if before is None or after is None or (after[0] - before[0]) <= 0.1 * max(1, after[1] - before[1]):
            return


def _timed(run, device: str, wait_idle: float) -> tuple[float, int]:
    """Seconds of one ``run()`` and the number of tries. With ``wait_idle`` (a shared machine): start on idle
    CPUs, and repeat (up to 10 tries) a run during which other processes used more than 3% of its wall time
    in CPU time (machine-wide busy time from /proc/stat minus this process's own)."""
    tries = 0
    while True:
        tries += 1
        if wait_idle:
            _wait_idle(wait_idle)
        busy0, own0 = _cpu_jiffies(), sum(os.times()[:2])
        _sync(device)
        start = time.perf_counter()
        run()
        _sync(device)
        seconds = time.perf_counter() - start
        busy1, own1 = _cpu_jiffies(), sum(os.times()[:2])
        if not wait_idle or busy0 is None or busy1 is None or tries >= 10:
            return seconds, tries
        others = (busy1[0] - busy0[0]) / os.sysconf("SC_CLK_TCK") - (own1 - own0)
        if others <= 0.03 * seconds + 0.02:
            return seconds, tries


def time_modes(args) -> dict:
    model, closure = _setup(args)
    runners = {mode: _runner(mode, model, closure, args) for mode in args.modes}
    for run in runners.values():  # warm-up
        run()
    times = {mode: [] for mode in args.modes}
    tries = {mode: [] for mode in args.modes}
    load_before = _loadavg()
    for r in range(args.rounds):
        for mode, run in runners.items():
            seconds, n = _timed(run, args.device, args.wait_idle)
            times[mode].append(seconds)
            tries[mode].append(n)
        print(
            f"round {r + 1}/{args.rounds}: " + ", ".join(f"{m} {times[m][-1]:.2f}s" for m in args.modes),
            flush=True,
        )
    ratios = {
        mode: statistics.median(t / f for t, f in zip(times[mode], times["forward"], strict=True))
        for mode in args.modes
    }
    return {
        "seconds_median": {m: statistics.median(v) for m, v in times.items()},
        "forward_equivalents": ratios,
        "seconds": times,
        "tries": tries,
        "load_average_1min": {"before": load_before, "after": _loadavg()},
    }


def noise_sweeps(args) -> dict:
    """Seconds for one sweep of noise over the model's parameter count, added into a buffer: as the optimizer
    streams it (``pieces``) and, for Gaussian noise, one whole chunk at a time (``generate``)."""
    numel = sum(p.numel() for p in load_model(args.model, dtype="float32")[0].parameters())
    target = torch.zeros(min(numel, 1 << 20), device=args.device)

    def streamed(gen):
        for s, n in chunks(numel, gen.chunk):
            for at, z in gen.pieces(12345, s, n):
                target[at : at + z.numel()].add_(z, alpha=1e-3)

    def whole_chunks(gen):
        for s, n in chunks(numel, gen.chunk):
            target[:n].add_(gen.generate(12345, s, n), alpha=1e-3)

    out = {}
    variants = [
        ("gaussian", streamed, ""),
        ("gaussian", whole_chunks, ", whole chunks"),
        ("rademacher", streamed, ""),
    ]
    for dist, sweep, label in variants:
        gen = NoiseGenerator(dist, device=args.device)
        samples = [
            _timed(lambda gen=gen, sweep=sweep: sweep(gen), args.device, args.wait_idle)[0] for _ in range(3)
        ]
        out[f"hdopt {dist}{label}"] = statistics.median(samples)
    buf = torch.empty(1 << 20, device=args.device)

    def randn():
        for _s, n in chunks(numel, 1 << 20):
            torch.randn(n, out=buf[:n])
            target[:n].add_(buf[:n], alpha=1e-3)

    out["torch.randn"] = statistics.median(_timed(randn, args.device, args.wait_idle)[0] for _ in range(3))
    return out


def memory_probe(mode: str, args) -> float:
    """Peak memory (MiB) of two iterations of ``mode`` in this (fresh) process, model loading excluded."""
    model, closure = _setup(args)
    run = _runner(mode, model, closure, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    if not reset_peak() and not args.device.startswith("cuda"):
        print("warning: cannot reset the peak RSS here; the figure includes model loading", file=sys.stderr)
    for _ in range(2):
        run()
    if args.device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_mib()


def measure_memory(args) -> dict:
    peaks = {}
    for mode in args.modes:
        cmd = [sys.executable, __file__, "--memory-probe", mode, *_passthrough(args)]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[mode] = float(result.stdout.strip().splitlines()[-1])
        print(f"peak memory {mode}: {peaks[mode]:.0f} MiB", flush=True)
    return {"peak_mib": peaks, "ratio_to_forward": {m: peaks[m] / peaks["forward"] for m in args.modes}}


RESTORE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@torch.no_grad()
def exact_restore(cycles: int = 100, eps: float = 1e-3) -> dict:
    """Weights changed by ``cycles`` steps with lr = 0 in which the perturbation is written into the weights.

    hdopt runs with ``perturb="inplace"`` (back up, write theta + eps z, evaluate, copy the backup back), the
    mode in which a restore can fail (in the default forward mode the weights are never written); the
    reference writes +eps z, -2 eps z, +eps z. Same layer, same dtype, same number of steps (two perturbed
    evaluations each). Per dtype and method: the fraction of weight elements that differ from the start, the
    largest difference, and the share of loss evaluations that saw written (changed) weights.
    """
    out = {"layer": "Linear(512, 512)", "cycles": cycles, "eps": eps, "dtypes": {}}
    for dtype in RESTORE_DTYPES:
        rows = {}
        for method in ("hdopt", "reference"):
            torch.manual_seed(0)
            layer = torch.nn.Linear(512, 512).to(dtype)
            x = torch.randn(8, 512).to(dtype)
            start, written = layer.weight.detach().clone(), []

            def closure(layer=layer, x=x, start=start, written=written):
                written.append(not torch.equal(layer.weight, start))
                return layer(x).float().pow(2).mean()

            if method == "hdopt":
                opt = ZOSGD(layer.named_parameters(), lr=0.0, eps=eps, perturb="inplace")
                for _ in range(cycles):
                    opt.step(closure)
            else:
                for seed in range(cycles):
                    reference_step([layer.weight, layer.bias], closure, lr=0.0, eps=eps, seed=seed)
            diff = (layer.weight.float() - start.float()).abs()
            rows[method] = {"changed": (diff > 0).float().mean().item(), "max_abs_change": diff.max().item(),
                            "evaluations_on_written_weights": sum(written) / len(written)}
        out["dtypes"][str(dtype).replace("torch.", "")] = rows
    return out


def _restore_markdown(restore: dict) -> str:
    lines = [
        f"{restore['layer']}, {restore['cycles']} steps with lr = 0, eps {restore['eps']:g}, perturbation "
        "written into the weights (hdopt: perturb='inplace').",
        "",
        "| dtype | elements changed: hdopt | reference round trip | largest change: hdopt | reference |",
        "|---|---|---|---|---|",
    ]
    for name, rows in restore["dtypes"].items():
        h, r = rows["hdopt"], rows["reference"]
        lines.append(f"| {name} | {h['changed']:.1%} | {r['changed']:.1%} | {h['max_abs_change']:.3g} | "
                     f"{r['max_abs_change']:.3g} |")
    return "\n".join(lines) + "\n"


def save_restore(path: Path, cycles: int) -> None:
    """Measure :func:`exact_restore` and write it to ``path`` (JSON) and its Markdown table next to it."""
    restore = {"torch": torch.__version__, **exact_restore(cycles)}
    markdown = _restore_markdown(restore)
    print(markdown)
    atomic_write_bytes(path, json.dumps(restore, indent=2).encode())
    atomic_write_bytes(path.with_suffix(".md"), markdown.encode())


def _trainable_count(args) -> int:
    model, _ = _setup(args)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _passthrough(args) -> list[str]:
    return [
        "--model", args.model, "--dtype", args.dtype, "--device", args.device, "--batch", str(args.batch),
        "--seq", str(args.seq), "--lr", str(args.lr), "--eps", str(args.eps), "--trainable", args.trainable,
    ]  # fmt: skip


def _markdown(report: dict) -> str:
    t, m = report["timing"], report["memory"]
    lines = [
        f"Model {report['model']} ({report['dtype']}, trainable: {report.get('trainable', 'all')}), "
        f"batch {report['batch']} x {report['seq']} tokens, "
        f"{report['hardware']}, medians over {report['rounds']} rounds.",
        "",
        "| | seconds | forward equivalents | peak memory (MiB) | memory vs inference |",
        "|---|---|---|---|---|",
    ]
    for mode in t["seconds_median"]:
        lines.append(
            f"| {mode} | {t['seconds_median'][mode]:.2f} | {t['forward_equivalents'][mode]:.2f} | "
            f"{m['peak_mib'][mode]:.0f} | {m['ratio_to_forward'][mode]:.3f}x |"
        )
    lines += ["", "| noise sweep over all parameters | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in report["noise_sweep_seconds"].items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--lr", type=float, default=1e-6)
    parser.add_argument("--eps", type=float, default=1e-3)
    parser.add_argument("--out", type=Path, default=RESULTS / "zo_step.json")
    parser.add_argument("--modes", default=",".join(DEFAULT_MODES), help=f"comma-separated subset of {MODES}")
    parser.add_argument("--trainable", choices=TRAINABLE, default="all", help="the parameters a step trains")
    parser.add_argument(
        "--wait-idle",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="shared machines: start each measurement on idle CPUs (waiting up to SECONDS) and repeat one "
        "that other processes disturbed",
    )
    parser.add_argument("--restore-only", action="store_true",
                        help="measure only the exact restore (seconds) and save it to --restore-out")
    parser.add_argument("--restore-out", type=Path, default=RESULTS / "zo_restore.json")
    parser.add_argument("--restore-cycles", type=int, default=100)
    known = (*MODES, *OPTIMIZERS, *RULE_VARIANTS)
    parser.add_argument("--memory-probe", choices=known, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.restore_only:
        save_restore(args.restore_out, args.restore_cycles)
        return 0
    unknown = set(args.modes.split(",")) - set(known)
    if unknown:
        parser.error(f"unknown modes {sorted(unknown)}; choose from {known}")
    args.modes = ["forward"] + [m for m in dict.fromkeys(args.modes.split(",")) if m != "forward"]
    if args.memory_probe:
        print(memory_probe(args.memory_probe, args))
        return 0
    if args.device.startswith("cuda"):
        hardware = torch.cuda.get_device_name()
    else:
        hardware = f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    report = {
        "model": args.model, "dtype": args.dtype, "device": args.device, "hardware": hardware,
        "batch": args.batch, "seq": args.seq, "rounds": args.rounds, "torch": torch.__version__,
        "trainable": args.trainable, "trainable_parameters": _trainable_count(args),
        "timing": time_modes(args),
        "memory": measure_memory(args),
        "noise_sweep_seconds": noise_sweeps(args),
    }  # fmt: skip
    markdown = _markdown(report)
    print(markdown)
    atomic_write_bytes(args.out, json.dumps(report, indent=2).encode())
    atomic_write_bytes(args.out.with_suffix(".md"), markdown.encode())
    save_restore(args.restore_out, args.restore_cycles)
    return 0


if __name__ == "__main__":
    sys.exit(main())
