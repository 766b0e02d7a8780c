"""``hdopt demo``: forward-only fine-tuning of the embedded SmolLM2-135M in about two minutes on a CPU.

It fine-tunes every parameter with :class:`hdopt.zo.ZOSGD` (MeZO) on a dozen built-in movie-review
sentences in the SST-2 prompt format (``<review> It was`` + `` terrible`` / `` great``), printing the loss
as it goes down and the peak memory of a training step next to that of plain inference.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

# A tiny training set written for this demo (label 1 = positive).
REVIEWS: tuple[tuple[str, int], ...] = (
    ("A gripping story with wonderful performances.", 1),
    ("Dull, slow and far too long.", 0),
    ("The best film I have seen this year.", 1),
    ("A tedious mess with no redeeming qualities.", 0),
    ("Funny, warm and beautifully shot.", 1),
    ("The plot makes no sense and the acting is wooden.", 0),
    ("An absolute delight from start to finish.", 1),
    ("I walked out halfway through.", 0),
    ("Smart writing and a moving ending.", 1),
    ("Boring characters in a predictable script.", 0),
    ("A charming, clever little movie.", 1),
    ("Painfully unfunny and instantly forgettable.", 0),
)
TEMPLATE = "{sentence} It was"
OPTIONS = (" terrible", " great")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="smollm2-135m", help="model alias, local path or hub name")
    parser.add_argument("--steps", type=int, default=60, help="MeZO steps (each: 2 forward passes)")
    parser.add_argument("--lr", type=float, default=2e-5, help="learning rate")
    parser.add_argument("--eps", type=float, default=1e-3, help="perturbation scale")
    parser.add_argument("--noise", choices=("gaussian", "rademacher"), default="gaussian")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))


def run(args: argparse.Namespace) -> int:
    from hdopt.lm.models import load_model
    from hdopt.lm.scoring import classification_loss, encode_options, predict
    from hdopt.memory import peak_mib, reset_peak
    from hdopt.zo import ZOSGD

    torch.manual_seed(args.seed)
    print(f"loading {args.model} ({args.dtype}) ...", flush=True)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    n_params = sum(p.numel() for p in model.parameters())
    batch = encode_options(
        tokenizer,
        [TEMPLATE.format(sentence=s) for s, _ in REVIEWS],
        [OPTIONS] * len(REVIEWS),
        [label for _, label in REVIEWS],
    )
    labels = batch.labels

    def accuracy() -> float:
        return (predict(model, batch)[0] == labels).float().mean().item()

    def closure() -> torch.Tensor:
        return classification_loss(model, batch)

    reset_peak()  # the peak of loading the model does not count
    with torch.no_grad():
        start_loss, start_acc = closure().item(), accuracy()
    inference_peak = peak_mib()
    print(
        f"{n_params / 1e6:.1f}M parameters, all trained with forward passes only (MeZO, {args.noise} noise)"
    )
    print(f"step    0  loss {start_loss:.4f}  accuracy {start_acc:.0%}")
    opt = ZOSGD(model.named_parameters(), lr=args.lr, eps=args.eps, noise=args.noise, seed=args.seed)
    reset_peak()
    started = time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = opt.step(closure)
        if step % 10 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss:.4f}  ({(time.perf_counter() - started) / step:.2f} s/step)")
    with torch.no_grad():
        end_loss, end_acc = closure().item(), accuracy()
    step_peak = peak_mib()
    print(f"loss {start_loss:.4f} -> {end_loss:.4f}, accuracy {start_acc:.0%} -> {end_acc:.0%}")
    print(
        f"peak memory: inference {inference_peak:.0f} MiB, MeZO training {step_peak:.0f} MiB "
        f"({step_peak / inference_peak:.3f}x inference)"
    )
    return 0 if end_loss < start_loss else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    configure(parser)
    sys.exit(run(parser.parse_args()))
