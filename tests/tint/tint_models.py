"""Tiny random auxiliaries and the autograd oracles (shared with the docs' numeric report)."""

from hdopt.tint.checks import (  # noqa: F401
    VOCAB,
    autograd_reference_rule,
    hf_logits,
    hf_sgd,
    random_ids,
    rel,
    tiny_model,
)
