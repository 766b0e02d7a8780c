"""TinT: a transformer whose single forward pass fine-tunes a smaller auxiliary transformer.

Panigrahi, Malladi, Xia, Arora, "Trainable Transformer in Transformer" (ICML 2024), rebuilt for GPT-2/OPT and
Llama-family auxiliaries, with an exact backward mode, correct bias steps, and three realizations:
``structured`` (fast, every architecture), ``explicit`` (fixed-pattern weights + prefix tokens; GPT-2/OPT
and Llama-family, reference rule) and ``compact`` (the explicit network packed as the paper packs it, small
enough to run on a real auxiliary).

    >>> tint = build(hf_model, TinTConfig(n_layers=3, n_steps=1, inner_lr=1e-4))
    >>> out = tint(input_ids, context_len=100)   # out.query_logits, out.inner_losses
"""

from __future__ import annotations

from torch import nn

from hdopt.tint.aux import AuxSpec, from_hf
from hdopt.tint.config import TinTConfig
from hdopt.tint.structured import StructuredTinT, TinTOutput

__all__ = ["AuxSpec", "StructuredTinT", "TinTConfig", "TinTOutput", "build", "from_hf"]


def build(aux_model: nn.Module | AuxSpec, config: TinTConfig | None = None) -> nn.Module:
    """A TinT simulating fine-tuning of ``aux_model`` (a Hugging Face causal LM or an :class:`AuxSpec`).

    Returns a :class:`StructuredTinT` or, for ``config.realization == "explicit"``, an
    :class:`hdopt.tint.explicit.ExplicitTinT` (:class:`hdopt.tint.explicit_llama.ExplicitLlamaTinT` for
    Llama-family auxiliaries), or for ``"compact"`` a :class:`hdopt.tint.compact.CompactTinT`; all are
    called as ``tint(input_ids, context_len, ...)``.
    """
    config = config or TinTConfig()
    spec = aux_model if isinstance(aux_model, AuxSpec) else from_hf(aux_model)
    if config.realization == "compact":
        from hdopt.tint.compact import compact_tint

        return compact_tint(spec, config)
    if config.realization == "explicit":
        from hdopt.tint.explicit import explicit_tint

        return explicit_tint(spec, config)
    return StructuredTinT(spec, config)
