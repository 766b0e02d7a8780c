"""Tiny random GPT-2, OPT and Llama auxiliaries (built from configs, no downloads)."""

from __future__ import annotations

import torch
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

VOCAB = 61


def tiny_model(arch: str, dtype: torch.dtype = torch.float64, seed: int = 0, layers: int = 3, width: int = 16,
               vocab: int = VOCAB):
    """A random auxiliary; GPT-2/OPT ``width`` is the model width (16; the explicit tests use 8)."""
    torch.manual_seed(seed)
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab, n_positions=64, n_embd=width, n_layer=layers, n_head=2,
                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        model = GPT2LMHeadModel(cfg)
    elif arch == "opt":
        cfg = OPTConfig(vocab_size=vocab, hidden_size=width, num_hidden_layers=layers, ffn_dim=2 * width,
                        num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=width,
                        dropout=0.0, attention_dropout=0.0, pad_token_id=1)
        model = OPTForCausalLM(cfg)
    elif arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                          rope_theta=10000.0, tie_word_embeddings=True)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(arch)
    model.config._attn_implementation = "eager"
    with torch.no_grad():  # larger random weights than the init so that updates move logits visibly
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif p.dim() == 1:
                p.copy_(0.1 * torch.randn_like(p))
            elif "wte" in name or "embed" in name or "wpe" in name:
                p.copy_(0.5 * torch.randn_like(p))
            else:  # peaked attention, so that gradients through the scores matter
                p.copy_(torch.randn_like(p) / p.shape[-1] ** 0.5)
    return model.to(dtype).eval()


def random_ids(B: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (B, T), generator=g)
