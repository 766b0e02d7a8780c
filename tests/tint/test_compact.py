"""The compact explicit TinT computes what the structured one computes, and is as small as claimed."""

from __future__ import annotations

import pytest
import torch
from tint_models import random_ids, rel, tiny_model

from hdopt.tint import TinTConfig, build, from_hf
from hdopt.tint.compact import CompactLlamaTinT, CompactTinT, compact_tint
from hdopt.tint.compact.prefix import PrefixLayout
from hdopt.tint.size import SHAPES, Shape, compact_formula, meta_spec

# The rule's finite difference multiplies rounding errors by N = 1000 at every simulated norm and activation:
# float64 rounding (1e-16) becomes ~1e-13 per step; 1e-10 leaves room for a few layers and steps.
FP64 = 1e-10


def small_model(arch: str):
    """Width 8, 2 blocks (GPT-2: 8 MLP chunks); Llama: 2 query heads sharing 1 key/value head, untied head."""
    extra = {"heads": 2, "kv_heads": 1, "tied": False} if arch == "llama" else {}
    return tiny_model(arch, layers=2, width=8, vocab=23, **extra)


def config(**kw) -> TinTConfig:
    return TinTConfig(**{"n_layers": 2, "n_steps": 1, "inner_lr": 0.01, "backward": "reference",
                         "max_len": 10, **kw})


@pytest.mark.parametrize("arch,steps,reduction", [("gpt2", 1, "sum"), ("gpt2", 2, "mean"), ("opt", 1, "mean"),
                                                  ("llama", 1, "sum"), ("llama", 2, "mean")])
def test_compact_matches_structured_fp64(arch, steps, reduction):
    model = small_model(arch)
    ids = random_ids(2, 9, seed=4) % 23
    cfg = config(n_steps=steps, reduction=reduction)
    structured = build(model, cfg)
    want, got = structured(ids, context_len=6), compact_tint(from_hf(model), cfg)(ids, context_len=6)
    before = structured.run(ids, structured.blocks_with(None), logits_from=5)[0]
    assert rel(want.query_logits, before) > 1e-3  # the simulated steps changed the logits
    assert rel(got.query_logits - before, want.query_logits - before) <= FP64
    assert torch.allclose(got.inner_losses, want.inner_losses, rtol=FP64)
    # the updated weights, read back from the prefix rows, are the structured rule's (biases included: the
    # output projection's bias is stepped once, not once per MLP chunk)
    for g, w in zip(got.blocks, want.blocks, strict=True):
        assert g.keys() == w.keys()
        for name in w:
            assert rel(g[name], w[name].expand_as(g[name])) <= FP64, name


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sliced_execution_is_the_dense_modules_forward(arch):
    """The fast executor skips only exact zeros: it equals each module's own forward on the whole state."""
    model = small_model(arch)
    ids = random_ids(1, 8, seed=2) % 23
    net = compact_tint(from_hf(model), config(n_steps=2, n_layers=1))
    sliced, dense = net(ids, context_len=5), net(ids, context_len=5, dense=True)
    assert rel(sliced.query_logits, dense.query_logits) <= 1e-12
    assert torch.allclose(sliced.inner_losses, dense.inner_losses, rtol=1e-12)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_packed_queries_equal_separate_forward_passes(arch):
    """[context | q1 | q2] with each query seeing only the context and itself = one pass per query."""
    model = small_model(arch)
    net, structured = compact_tint(from_hf(model), config()), build(model, config())
    context, queries = [5, 9, 3, 7, 11, 2], [[4, 8], [13, 6, 1]]
    targets = [3, 5]  # positions of the training targets in the context
    packed = net.packed_logits(context, targets, queries)
    ctx = torch.tensor([context])
    mask = torch.zeros_like(ctx, dtype=torch.bool)
    mask[0, targets] = True
    top, _ = structured.adapt(ctx, mask)
    for i, q in enumerate(queries):
        ids = torch.tensor([context + q])
        full = torch.cat((mask, torch.zeros(1, len(q), dtype=torch.bool)), 1)
        one = net(ids, context_len=len(context), targets=full).query_logits[0, -1]
        want = structured.run(ids, structured.blocks_with(top), positions=torch.tensor([ids.shape[1] - 1]))
        assert rel(packed[i], one) <= 1e-12
        assert rel(packed[i], want[0][0, 0]) <= FP64


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_first_pass_is_the_auxiliary(arch):
    model = small_model(arch)
    ids = random_ids(1, 7, seed=5) % 23
    got = compact_tint(from_hf(model), config(n_steps=0, n_layers=1))(ids, context_len=3).query_logits
    with torch.no_grad():
        want = model(input_ids=ids).logits[:, 2:]
    # HF's LlamaRMSNorm computes in float32 even for a float64 model: that bounds the Llama comparison
    assert rel(got, want) <= (1e-12 if arch == "gpt2" else 1e-6)


def test_prefix_packing_round_trips_and_shares_rows():
    layout = PrefixLayout([("a", "x", 5, 7), ("b", "y", 3, 2)], slot_budget=12)
    a, b = layout.groups["a"], layout.groups["b"]
    assert (a.slots, a.rows) == (2, 4) and (b.slots, b.rows) == (3, 1)  # 2 rows of 5 + bias per token
    X = torch.zeros(layout.n_rows, layout.width, dtype=torch.float64)
    w, bias = torch.randn(7, 5, dtype=torch.float64), torch.randn(7, dtype=torch.float64)
    layout.encode(X, a, w, bias)
    got_w, got_b = layout.decode(X, a)
    assert torch.equal(got_w, w) and torch.equal(got_b, bias)
    assert torch.equal(X[:a.rows, :a.rows], torch.eye(a.rows, dtype=torch.float64))  # the index one-hots


def tiny_shapes() -> dict[str, Shape]:
    return {"gpt2": Shape("gpt2", 8, 2, 2, 32, 2, 23, 64, "gelu_tanh"),
            "opt": Shape("gpt2", 8, 2, 2, 16, 3, 23, 64, "relu", pos_offset=2),
            "llama-gqa": Shape("llama", 32, 4, 1, 96, 2, 23, 64, "silu")}


@pytest.mark.parametrize("name,steps", [(n, s) for n in ("gpt2", "opt", "llama-gqa") for s in (0, 1, 2)]
                         + [("gpt2-shape", 2), ("smollm2-135m", 1)])
def test_closed_form_count_is_the_built_networks(name, steps):
    shape = {**tiny_shapes(), **SHAPES}[name]
    layers = min(shape.n_layers, 3)
    built = compact_tint(meta_spec(shape), TinTConfig(n_layers=layers, n_steps=steps, backward="reference",
                                                      max_len=64), device="meta").size_report()
    formula = compact_formula(shape, layers, steps, 64)
    for key in ("width", "prefix_rows", "mlp_chunk", "module_params", "embeddings",
                "params_reused_with_prefix"):
        assert built[key] == formula[key], key


def test_gpt2_compact_fits_the_reference_budget():
    """GPT-2 124M, all 12 layers, 1 step: at most the reference's 1,476,796,914 with reuse, counting the
    prefix values (the auxiliary's packed weights) as the reference does."""
    cfg = TinTConfig(n_layers=12, n_steps=1, backward="reference", max_len=1024)
    net = compact_tint(meta_spec(SHAPES["gpt2-shape"]), cfg, device="meta")
    assert net.num_parameters(prefix=True) <= 1_476_796_914
    assert net.num_parameters(prefix=True) == compact_formula(SHAPES["gpt2-shape"], 12, 1, 1024)[
        "params_reused_with_prefix"]
    assert net.num_parameters(reuse=False) > net.num_parameters(reuse="layer") > net.num_parameters()


@pytest.mark.parametrize("tied", [True, False])
def test_embeddings_are_counted_once_when_tied(tied):
    """from_hf detaches tied weights into distinct tensors sharing storage: they are one embedding."""
    model = tiny_model("llama", layers=2, width=8, vocab=23, heads=2, kv_heads=1, tied=tied)
    spec = from_hf(model)
    net = compact_tint(spec, config(), device="meta")
    rope = 2 * 10 * spec.head_dim  # the rotary tables at max_len = 10 positions
    assert net.embedding_params() == (1 if tied else 2) * 23 * 8 + rope


def test_shared_modules_do_not_grow_with_depth():
    spec = from_hf(small_model("gpt2"))
    one, two = (compact_tint(spec, config(n_layers=n), device="meta") for n in (1, 2))
    assert len(one.ops) == len(two.ops) and one.num_parameters() == two.num_parameters()
    assert two.num_parameters(reuse=False) > one.num_parameters(reuse=False)


def test_bad_configurations_are_refused():
    spec = from_hf(small_model("gpt2"))
    with pytest.raises(ValueError, match="reference"):
        CompactTinT(spec, TinTConfig(backward="exact"))
    with pytest.raises(ValueError, match="llama"):
        CompactLlamaTinT(spec, config())
    with pytest.raises(ValueError, match="divide"):
        CompactTinT(spec, config(), mlp_chunk=5)
    net = CompactTinT(spec, config(max_len=6))
    ids = torch.ones(1, 7, dtype=torch.long)
    with pytest.raises(ValueError, match="max_len"):
        net(ids, context_len=3)
    with pytest.raises(ValueError, match="unpadded"):
        net(ids[:, :5], context_len=3, attention_mask=torch.ones(1, 5))
