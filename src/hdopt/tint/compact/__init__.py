"""The compact explicit TinT: a network of real modules, packed as the paper packs it, small enough to run.

:class:`CompactTinT` (GPT-2/OPT) and :class:`CompactLlamaTinT` (Llama family) realize the reference backward
rule with S weight rows per prefix token (:mod:`.prefix`), activations kept by lifetime in a fixed set of
registers plus one block of memory rows per simulated layer (:mod:`.program`), and one module per fixed
pattern, shared across layers, steps and MLP chunks. :mod:`.executor` runs the modules' own forward densely
(small models) or without their exact zeros (real auxiliaries).
"""

from __future__ import annotations

from hdopt.tint.aux import AuxSpec
from hdopt.tint.compact.llama import CompactLlamaTinT
from hdopt.tint.compact.program import CompactTinT
from hdopt.tint.config import TinTConfig

__all__ = ["CompactLlamaTinT", "CompactTinT", "compact_tint"]


def compact_tint(spec: AuxSpec, config: TinTConfig, device=None, **options) -> CompactTinT:
    """The compact TinT of ``spec``'s family; ``options``: ``mlp_chunk``, ``slot_budget``."""
    cls = CompactLlamaTinT if spec.family == "llama" else CompactTinT
    return cls(spec, config, device, **options)
