"""The explicit TinT (fixed-pattern weights + prefix tokens) computes what the structured one computes."""

from __future__ import annotations

import pytest
import torch
from tint_models import random_ids, rel, tiny_model

from hdopt.tint import TinTConfig, build


def small_model(arch: str):
    """Width 8, 2 blocks; Llama: 2 query heads sharing 1 key/value head, untied LM head."""
    extra = {"heads": 2, "kv_heads": 1, "tied": False} if arch == "llama" else {}
    return tiny_model(arch, layers=2, width=8, vocab=23, **extra)


@pytest.mark.parametrize("arch,steps,reduction",
                         [("gpt2", 1, "sum"), ("opt", 1, "mean"), ("gpt2", 2, "mean"), ("llama", 1, "sum"),
                          ("llama", 1, "mean"), ("llama", 2, "sum"), ("llama", 2, "mean")])
def test_explicit_matches_structured_fp64(arch, steps, reduction):
    model = small_model(arch)
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


def test_explicit_label_only_targets_match_structured():
    """The per-position loss weight register (label tokens only, mean over each sequence's own labels)."""
    model = small_model("gpt2")
    ids = random_ids(2, 9, seed=4) % 23
    targets = torch.zeros_like(ids, dtype=torch.bool)
    targets[0, [2, 4, 5]], targets[1, [3]] = True, True
    cfg = {"n_layers": 2, "n_steps": 1, "inner_lr": 0.05, "backward": "reference", "reduction": "mean",
           "max_len": 10}
    structured = build(model, TinTConfig(**cfg))
    want = structured(ids, context_len=6, targets=targets)
    got = build(model, TinTConfig(**cfg, realization="explicit"))(ids, context_len=6, targets=targets)
    untargeted = structured(ids, context_len=6)
    before = structured.run(ids, structured.blocks_with(None), logits_from=5)[0]
    assert rel(untargeted.query_logits - before, want.query_logits - before) > 1e-2  # the labels matter
    assert rel(got.query_logits - before, want.query_logits - before) <= 1e-6
    assert torch.allclose(got.inner_losses, want.inner_losses, rtol=1e-9)


def test_explicit_llama_with_shared_heads_and_tied_embeddings():
    """4 query heads in 2 key/value groups, one simulated block of two, tied output head."""
    model = tiny_model("llama", layers=2, width=16, vocab=23, heads=4, kv_heads=2)
    ids = random_ids(1, 8, seed=6) % 23
    cfg = {"n_layers": 1, "n_steps": 1, "inner_lr": 0.02, "backward": "reference", "max_len": 8}
    structured = build(model, TinTConfig(**cfg))
    want = structured(ids, context_len=5).query_logits
    got = build(model, TinTConfig(**cfg, realization="explicit"))(ids, context_len=5).query_logits
    before = structured.run(ids, structured.blocks_with(None), logits_from=4)[0]
    assert rel(want, before) > 1e-3
    assert rel(got - before, want - before) <= 1e-6


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_explicit_first_pass_is_the_auxiliary(arch):
    model = small_model(arch)
    ids = random_ids(1, 7, seed=5) % 23
    cfg = {"n_layers": 1, "n_steps": 0, "backward": "reference", "max_len": 8}
    explicit = build(model, TinTConfig(**cfg, realization="explicit"))
    got = explicit(ids, context_len=3).query_logits
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, 2:]
    # HF's LlamaRMSNorm computes in float32 even for a float64 model: that bounds the Llama comparison
    assert rel(got, want) <= (1e-12 if arch == "gpt2" else 1e-6)
    assert rel(got, build(model, TinTConfig(**cfg))(ids, context_len=3).query_logits) <= 1e-12


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_explicit_counts_parameters_without_allocating(arch):
    from hdopt.tint.aux import from_hf
    from hdopt.tint.explicit import explicit_tint

    spec = from_hf(small_model(arch))
    small = explicit_tint(spec, TinTConfig(n_layers=1, backward="reference", max_len=10))
    meta = explicit_tint(spec, TinTConfig(n_layers=1, backward="reference", max_len=10), device="meta")
    assert meta.num_parameters() == small.num_parameters() > 0
    assert meta.num_parameters(reuse=False) > meta.num_parameters()
    assert meta.size_report() == small.size_report()
    assert meta.prefix.is_meta


def test_explicit_rejects_padding_and_long_inputs():
    explicit = build(tiny_model("gpt2", layers=2, width=8, vocab=23),
                     TinTConfig(backward="reference", realization="explicit", max_len=8))
    ids = torch.ones(1, 6, dtype=torch.long)
    with pytest.raises(ValueError):
        explicit(ids, context_len=3, attention_mask=torch.ones_like(ids))
    with pytest.raises(ValueError):
        explicit(torch.ones(1, 9, dtype=torch.long), context_len=3)


def test_explicit_class_must_match_the_family():
    from hdopt.tint.aux import from_hf
    from hdopt.tint.explicit import ExplicitTinT
    from hdopt.tint.explicit_llama import ExplicitLlamaTinT

    cfg = TinTConfig(backward="reference", max_len=8)
    with pytest.raises(ValueError):
        ExplicitTinT(from_hf(small_model("llama")), cfg)
    with pytest.raises(ValueError):
        ExplicitLlamaTinT(from_hf(small_model("gpt2")), cfg)


def test_register_group_and_route_names_are_checked_when_declared():
    from hdopt.tint.explicit_layout import Act, At, Group, Keys, Map, Route

    with pytest.raises(TypeError):
        At("n1")  # a string is not an activation name
    with pytest.raises(ValueError):
        At(Act.N1, -1)
    with pytest.raises(ValueError):
        Group(Map.QKV)  # a block's map needs its block
    with pytest.raises(ValueError):
        Group(Map.VOCAB, 0)  # the vocabulary belongs to no block
    with pytest.raises(ValueError):
        Route(rows=Group(Map.O, 0), keys=Keys.CAUSAL)  # prefix rows only attend to the tokens
    with pytest.raises(TypeError):
        Route(keys="causal")
    assert Route(rows=Group(Map.O, 1), keys=Keys.TOKENS) == Route(Group(Map.O, 1), Keys.TOKENS)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_forward_only_blocks_add_applications_not_modules(arch):
    """Modules are shared by pattern: a deeper auxiliary with the same simulated top block needs no new
    module (its extra blocks reuse the scratch forward), only more applications."""
    from hdopt.tint.aux import from_hf
    from hdopt.tint.explicit import explicit_tint

    extra = {"heads": 2, "kv_heads": 1, "tied": False} if arch == "llama" else {}
    cfg = TinTConfig(n_layers=1, backward="reference", max_len=10)
    sizes = [explicit_tint(from_hf(tiny_model(arch, layers=n, width=8, vocab=23, **extra)), cfg,
                           device="meta").size_report() for n in (2, 3)]
    assert sizes[0]["modules"] == sizes[1]["modules"]
    assert sizes[0]["params_reused"] == sizes[1]["params_reused"]
    assert sizes[1]["module_applications"] > sizes[0]["module_applications"]
    assert sizes[1]["params_no_reuse"] > sizes[0]["params_no_reuse"]
