"""The contract every ZO rule keeps, as checks a rule's test file runs on its own configurations: replay
bitwise (float32 and bf16), a state_dict round trip through torch.save that continues bitwise, gradient
accumulation equal to the full batch, the reduce hook path, and a lower loss on the tiny LM."""

from __future__ import annotations

import io

import torch

from hdopt.zo import replay

from .models import TinyLM, batch, bitwise_equal, snapshot


class ScalingReduce:
    """A stand-in for a cross-worker reduction: records the calls and returns ``factor * values``."""

    def __init__(self, factor: float = 1.0):
        self.calls, self.factor = [], factor

    def __call__(self, values, kind):
        self.calls.append((kind, list(values)))
        return [v * self.factor for v in values]


def replays_bitwise(cls, kwargs: dict, tmp_path, dtype=torch.float32, steps: int = 9) -> None:
    """A run saved as a trajectory file and replayed from the starting weights gives the same bits."""
    model, ids = TinyLM(dtype=dtype), batch()
    start = snapshot(model)
    opt = cls(model.named_parameters(), **kwargs)
    for _ in range(steps):
        opt.step(lambda: model.loss(ids))
    final = snapshot(model)
    assert not bitwise_equal(final, start)
    opt.save_trajectory(tmp_path / "run.zo")
    model.load_state_dict(start)
    replay(model.named_parameters(), tmp_path / "run.zo")
    assert bitwise_equal(final, snapshot(model))


def resumes_bitwise(cls, kwargs: dict, steps: int = 8, stop: int = 5) -> None:
    """Stop after ``stop`` steps, save weights and optimizer through torch.save, load with
    weights_only=True into fresh objects, continue: bitwise the uninterrupted run, and replayable."""
    ids = batch()
    straight = TinyLM()
    start = snapshot(straight)
    opt = cls(straight.named_parameters(), **kwargs)
    for _ in range(steps):
        opt.step(lambda: straight.loss(ids))

    first = TinyLM()
    opt1 = cls(first.named_parameters(), **kwargs)
    for _ in range(stop):
        opt1.step(lambda: first.loss(ids))
    buffer = io.BytesIO()
    torch.save({"model": first.state_dict(), "optimizer": opt1.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    second = TinyLM(seed=9)
    second.load_state_dict(saved["model"])
    opt2 = cls(second.named_parameters(), **kwargs)
    opt2.load_state_dict(saved["optimizer"])
    for _ in range(steps - stop):
        opt2.step(lambda: second.loss(ids))
    assert bitwise_equal(snapshot(straight), snapshot(second))
    assert len(opt2.trajectory) == steps  # the resumed optimizer holds the whole run
    replayed = TinyLM(seed=5)
    replayed.load_state_dict(start)
    replay(replayed.named_parameters(), (opt2.trajectory_header(), opt2.trajectory))
    assert bitwise_equal(snapshot(straight), snapshot(replayed))


def accumulates_like_the_full_batch(cls, kwargs: dict, steps: int = 4) -> None:
    """Two half batches through estimate() give the full batch's update (float64, to rounding: the losses'
    rounding, ~1e-16, over 2 eps = 2e-4 moves each projected gradient by ~1e-12 relative and the weights by
    ~1e-12 after a few steps; using one micro-batch alone moves them by ~lr = 1e-2)."""
    ids = batch(n=8)
    full, accum = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    opt_full = cls(full.named_parameters(), **kwargs)
    opt_accum = cls(accum.named_parameters(), **kwargs)
    for _ in range(steps):
        opt_full.step(lambda: full.loss(ids))
        for half in (ids[:4], ids[4:]):
            opt_accum.estimate(lambda h=half: accum.loss(h))
        opt_accum.step()
    moved = False
    for key, value in full.state_dict().items():
        other = accum.state_dict()[key]
        assert torch.allclose(value, other, rtol=0, atol=1e-10), key
        moved |= not torch.equal(value, TinyLM(dtype=torch.float64).state_dict()[key])
    assert moved


def reduces_the_projected_gradients(cls, kwargs: dict, steps: int = 4) -> None:
    """The reduce hook sees the q projected gradients and the update uses what it returns: lr 2a on half
    the gradient is lr a on all of it (float64)."""
    ids = batch()
    lr = kwargs["lr"]
    plain, reduced = TinyLM(dtype=torch.float64), TinyLM(dtype=torch.float64)
    hook = ScalingReduce(factor=0.5)
    opt_plain = cls(plain.named_parameters(), **{**kwargs, "lr": lr / 2})
    opt_reduced = cls(reduced.named_parameters(), **{**kwargs, "lr": lr}, reduce=hook)
    for _ in range(steps):
        opt_plain.step(lambda: plain.loss(ids))
        opt_reduced.step(lambda: reduced.loss(ids))
    assert [kind for kind, _ in hook.calls] == ["projected_gradients"] * steps
    assert all(len(values) == opt_reduced.q for _, values in hook.calls)
    assert opt_reduced.trajectory.records[-1].grads == tuple(0.5 * g for g in hook.calls[-1][1])
    for name, value in plain.state_dict().items():
        assert torch.allclose(value, reduced.state_dict()[name], rtol=0, atol=1e-12), name


def lowers_the_loss(cls, kwargs: dict, steps: int = 150, by: float = 0.1) -> None:
    model, ids = TinyLM(), batch()
    opt = cls(model.named_parameters(), **kwargs)
    start = model.loss(ids).item()
    for _ in range(steps):
        opt.step(lambda: model.loss(ids))
    assert model.loss(ids).item() < start - by
