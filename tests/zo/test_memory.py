"""A ZO step holds no more memory than inference plus one module's weights plus the noise it generates.

Measured with the CPU allocator's own accounting (:func:`hdopt.memory.tensor_peak_bytes`: every tensor
allocated during the call, temporaries inside ops included) on a random 4.5M-parameter model whose largest
module is a small part of it, so a step that copies the model (one clone per parameter) cannot hide.

The bound, from how a step runs (:mod:`hdopt.zo.perturb`, :mod:`hdopt.zo.optim`):

* a perturbed forward holds the activations of an ordinary forward (``inference``), plus the perturbed copies
  of the one module whose forward is running (at most ``largest module`` bytes), plus the noise being
  generated for them (at most ``noise``: the generator's working set for one chunk of the largest tensor);
* the update holds no activations: one chunk of the estimate plus the noise for it (less than ``noise`` +
  ``inference``, since the chunk is no larger than the largest tensor here).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from hdopt.memory import tensor_peak_bytes
from hdopt.zo import ZOSGD
from hdopt.zo.noise import NoiseGenerator


class DeepMLPLM(nn.Module):
    """Embedding (tied to the head) -> ``depth`` residual MLP blocks -> LayerNorm -> head."""

    def __init__(self, vocab: int = 1024, width: int = 256, depth: int = 8):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids[:, :-1])
        for block in self.blocks:
            h = h + block(h)
        logits = self.head(self.norm(h))
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


class CloningZOSGD(ZOSGD):
    """A defective optimizer: it backs up every parameter each step (a model copy, as a naive restore)."""

    def step(self, closure=None):
        backup = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        loss = super().step(closure)
        del backup
        return loss


def _model_and_batch():
    model = DeepMLPLM().eval()
    ids = torch.randint(0, 1024, (4, 33), generator=torch.Generator().manual_seed(1))
    return model, ids


def _largest_module_bytes(model: nn.Module) -> int:
    return max(sum(p.numel() * p.element_size() for p in m.parameters(recurse=False))
               for m in model.modules())  # fmt: skip


def _noise_bytes(noise: str, numel: int, chunk: int) -> int:
    """The generator's working set for one chunk of a ``numel``-element tensor, plus the chunk it fills."""
    n = min(numel, chunk)
    gen = NoiseGenerator(noise, chunk)
    _, peak = tensor_peak_bytes(lambda: gen.generate(12345, 0, n))
    return peak + 4 * n


def _step_peak(opt_cls, noise: str) -> tuple[int, int, int]:
    """(peak of one ZO step after a warm-up step, peak of one inference forward, the bound)."""
    torch.set_num_threads(1)
    model, ids = _model_and_batch()
    opt = opt_cls(model.named_parameters(), lr=1e-4, eps=1e-3, noise=noise)

    def closure():
        return model.loss(ids)

    opt.step(closure)  # the first step discovers which tensors the forward uses
    _, step = tensor_peak_bytes(lambda: opt.step(closure))
    with torch.no_grad():
        _, inference = tensor_peak_bytes(closure)
    largest_tensor = max(p.numel() for p in model.parameters())
    bound = inference + _largest_module_bytes(model) + _noise_bytes(noise, largest_tensor, opt.chunk)
    return step, inference, bound


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_zo_step_peak_is_inference_plus_one_module_plus_noise(noise):
    model, _ = _model_and_batch()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert params > 8 * _largest_module_bytes(model)  # a model copy cannot pass for one module
    step, inference, bound = _step_peak(ZOSGD, noise)
    assert inference > 0
    assert step <= bound, f"ZO step {step:,} B > inference {inference:,} B + module + noise = {bound:,} B"


def test_an_optimizer_that_clones_every_parameter_fails_the_bound():
    model, _ = _model_and_batch()
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    step, _, bound = _step_peak(CloningZOSGD, "rademacher")
    plain, _, _ = _step_peak(ZOSGD, "rademacher")
    assert step - plain >= params  # the accounting sees the copy
    assert step > bound
