"""The explicit TinT (fixed-pattern weights + prefix tokens) computes what the structured one computes."""

from __future__ import annotations

import pytest
import torch
from tint_models import random_ids, rel, tiny_model

from hdopt.tint import TinTConfig, build


@pytest.mark.parametrize("arch,steps,reduction",
                         [("gpt2", 1, "sum"), ("opt", 1, "mean"), ("gpt2", 2, "mean")])
def test_explicit_matches_structured_fp64(arch, steps, reduction):
    model = tiny_model(arch, layers=2, width=8, vocab=23)
    ids = random_ids(2, 9, seed=4) % 23
    cfg = {"n_layers": 2, "n_steps": steps, "inner_lr": 0.01, "backward": "reference", "reduction": reduction,
           "max_len": 10}
    structured = build(model, TinTConfig(**cfg))
    explicit = build(model, TinTConfig(**cfg, realization="explicit"))
    want, got = structured(ids, context_len=6), explicit(ids, context_len=6)
    before = structured.run(ids, structured.blocks_with(None), logits_from=5)[0]
    assert rel(want.query_logits, before) > 1e-3  # the simulated step changed the logits
    assert rel(got.query_logits - before, want.query_logits - before) <= 1e-6
    assert torch.allclose(got.inner_losses, want.inner_losses, rtol=1e-9)


def test_explicit_first_pass_is_the_auxiliary():
    model = tiny_model("gpt2", layers=2, width=8, vocab=23)
    ids = random_ids(1, 7, seed=5) % 23
    explicit = build(model, TinTConfig(n_layers=1, n_steps=0, backward="reference", realization="explicit",
                                       max_len=8))
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, 2:]
    assert rel(explicit(ids, context_len=3).query_logits, want) <= 1e-12


def test_explicit_counts_parameters_without_allocating():
    from hdopt.tint.aux import from_hf
    from hdopt.tint.explicit import ExplicitTinT

    spec = from_hf(tiny_model("gpt2", layers=2, width=8, vocab=23))
    small = ExplicitTinT(spec, TinTConfig(n_layers=1, backward="reference", max_len=10))
    meta = ExplicitTinT(spec, TinTConfig(n_layers=1, backward="reference", max_len=10), device="meta")
    assert meta.num_parameters() == small.num_parameters() > 0
    assert meta.num_parameters(reuse=False) > meta.num_parameters()


def test_explicit_rejects_llama_and_padding():
    with pytest.raises(NotImplementedError):
        build(tiny_model("llama", layers=2), TinTConfig(backward="reference", realization="explicit"))
    explicit = build(tiny_model("gpt2", layers=2, width=8, vocab=23),
                     TinTConfig(backward="reference", realization="explicit", max_len=8))
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError):
        explicit(ids, context_len=3, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError):
        explicit(torch.ones(1, 9, dtype=torch.long), context_len=3)
