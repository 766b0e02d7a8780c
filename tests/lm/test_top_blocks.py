"""Top-block split: the cached bottom + the top blocks compute exactly the whole model, perturbed or not."""

from __future__ import annotations

import pytest
import torch

from hdopt.lm.scoring import classification_loss, encode_examples, predict
from hdopt.lm.tasks import Example
from hdopt.lm.top_blocks import (
    TopBlocks,
    TopBlocksError,
    TrunkCache,
    top_classification_loss,
    top_predictions,
)
from hdopt.zo import ZOSGD
from hdopt.zo.noise import derive_key

from .conftest import tiny_model

PROMPTS = ["a fine film", "dull and long", "it works", "what a mess of a movie", "bright", "no"]


def _examples(n=6, options=(" bad", " good")):
    """Byte-level tokens: ``(" bad", " good")`` are multi-token options, ``("0", "1")`` one-token ones."""
    return [Example(f"e{i}", PROMPTS[i % len(PROMPTS)] + " It was", options, i % 2) for i in range(n)]


def _model(family="llama", layers=4):
    torch.manual_seed(0)
    model = tiny_model(family).double()
    if layers != 2:  # deeper, to have a bottom and a top
        from transformers import AutoModelForCausalLM

        config = model.config
        config.num_hidden_layers = layers
        if hasattr(config, "layer_types") and config.layer_types is not None:
            config.layer_types = [config.layer_types[0]] * layers
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).double().eval()
    return model


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("k", [1, 3, 4])
def test_top_of_the_cached_bottom_is_the_whole_body(family, k, tokenizer_bos):
    model = _model(family)
    blocks = TopBlocks(model, k)
    blocks.check()
    batch = encode_examples(tokenizer_bos, _examples(), 64)
    whole = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)[0]
    cache = TrunkCache(blocks)
    cache.add(batch)
    split = blocks.top(cache.hidden(batch), batch.attention_mask)
    real = batch.attention_mask.bool()
    assert torch.allclose(whole[real], split[real], rtol=0, atol=1e-12)
    assert blocks.fraction == k / 4


@pytest.mark.parametrize("family", ["llama", "gemma3"])  # gemma3: soft-capped logits
@pytest.mark.parametrize("options", [("0", "1"), (" bad", " good")], ids=["label rows", "whole head"])
def test_the_top_block_loss_and_predictions_are_the_whole_models(options, family, tokenizer_bos):
    model = _model(family)
    blocks = TopBlocks(model, 2)
    batch = encode_examples(tokenizer_bos, _examples(options=options), 64)
    assert bool((batch.option_length == 1).all()) == (options == ("0", "1"))
    cache = TrunkCache(blocks)
    cache.add(batch)
    loss = top_classification_loss(blocks, cache.hidden(batch), batch).item()
    # both paths round the logits to float32 (hdopt.lm.scoring's convention), hence 1e-6, not 1e-12
    assert loss == pytest.approx(classification_loss(model, batch).item(), rel=1e-6)
    assert torch.equal(top_predictions(blocks, cache.hidden(batch), batch), predict(model, batch)[0])
    blocks.check()
    assert blocks.fast == (family == "llama")  # gemma3's blocks (q/k norms) take the whole-top fallback


@pytest.mark.parametrize("k", [1, 3])
def test_the_last_block_at_the_asked_positions_equals_the_whole_top(k, tokenizer_bos):
    model = _model()
    blocks = TopBlocks(model, k)
    blocks.check()
    assert blocks.fast
    batch = encode_examples(tokenizer_bos, _examples(options=(" bad", " good")), 64)  # padded rows
    bottom = blocks.bottom(batch.input_ids, batch.attention_mask)
    whole = blocks.top(bottom, batch.attention_mask)[batch.target_seq, batch.target_pos]
    fast = blocks.states_at(bottom, batch.attention_mask, batch.target_seq, batch.target_pos)
    assert torch.allclose(fast, whole, rtol=0, atol=1e-12)


def test_a_perturbed_top_block_loss_equals_the_perturbed_whole_model(tokenizer_bos):
    """What ZO sees in top-block mode is the loss of the whole model at the same perturbed weights."""
    model = _model()
    blocks = TopBlocks(model, 2)
    batch = encode_examples(tokenizer_bos, _examples(), 64)
    cache = TrunkCache(blocks)
    cache.add(batch)
    opt = ZOSGD(blocks.top_parameters(), lr=0.0, eps=1e-2)
    terms = [(derive_key(1, 0), 1.0)]
    factors = opt.eps_factors(1.0)
    bottom = cache.hidden(batch)
    top = opt.evaluate(lambda: top_classification_loss(blocks, bottom, batch), terms, "top", factors)
    whole = opt.evaluate(lambda: classification_loss(model, batch), terms, "whole", factors)
    unperturbed = classification_loss(model, batch).item()
    assert top == pytest.approx(whole, rel=1e-12)
    assert abs(whole - unperturbed) > 1e-6


def test_the_cache_keeps_each_sequence_once_whatever_its_batch(tokenizer_bos):
    model = _model()
    blocks = TopBlocks(model, 1)
    examples = _examples(options=("0", "1"))  # one row per example
    cache = TrunkCache(blocks, dtype=torch.float32)
    cache.add(encode_examples(tokenizer_bos, examples[:4], 64))
    cache.add(encode_examples(tokenizer_bos, examples[2:], 64))
    assert len(cache) == 6
    assert cache.nbytes == sum(len(tokenizer_bos(e.prompt).input_ids) for e in examples) * 32 * 4
    mixed = encode_examples(tokenizer_bos, [examples[5], examples[0]], 64)
    direct = blocks.bottom(mixed.input_ids, mixed.attention_mask)
    real = mixed.attention_mask.bool()
    assert torch.allclose(cache.hidden(mixed)[real], direct[real].float().double(), rtol=0, atol=0)
    with pytest.raises(TopBlocksError, match="1 of 1 sequences are not in the cache"):
        cache.hidden(encode_examples(tokenizer_bos, [Example("x", "unseen", ("0", "1"), 0)], 64))


def test_top_parameters_are_the_top_blocks_and_the_final_norm():
    model = _model()
    names = [n for n, _ in TopBlocks(model, 1).top_parameters()]
    assert names and all(n.startswith("model.layers.3.") for n in names[:-1])
    assert names[-1] == "model.norm.weight"
    assert not any("embed" in n or "lm_head" in n for n in names)


def test_lora_adapters_inside_the_top_blocks_are_found_and_the_split_holds(tokenizer_bos):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(_model(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    blocks = TopBlocks(model, 2)
    blocks.check()
    trainable = [n for n, p in blocks.top_parameters() if p.requires_grad]
    assert trainable and all(("layers.2." in n or "layers.3." in n) and "lora_" in n for n in trainable)


def test_models_that_add_position_embeddings_are_refused():
    blocks = TopBlocks(_model("gpt2", layers=2), 1)
    with pytest.raises(TopBlocksError, match="position embeddings"):
        blocks.check()


def test_k_out_of_range_and_prefix_tuning_are_refused():
    model = _model()
    with pytest.raises(TopBlocksError, match="from 1 to 4"):
        TopBlocks(model, 5)
    with pytest.raises(TopBlocksError, match="from 1 to 4"):
        TopBlocks(model, 0)
