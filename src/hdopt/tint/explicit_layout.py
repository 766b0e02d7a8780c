"""Typed names of the explicit TinT's state: token registers, block activations, prefix groups and routes.

The explicit TinT (:mod:`hdopt.tint.explicit`) addresses coordinates of its state by these names instead of
strings, so a misspelt or misused name fails where it is written (an unknown enum member, or a dataclass
that checks its fields when it is created), not when a program is built:

* :class:`Reg`: token registers that exist once (inputs, the residual stream, the backward's work space);
* :class:`Act` and :class:`At`: a block's activations, in the scratch copy shared by blocks that only run
  forward (``At(act)``) or in the copy kept for the backward pass of simulated block ``l`` (``At(act, l)``);
* :class:`Pre`: the two registers of a prefix row (a weight row with its bias, and the row's one-hot);
* :class:`Map` and :class:`Group`: the auxiliary's linear maps, and the prefix rows holding map ``m`` of
  block ``l`` (``Group(m, l)``);
* :class:`Keys` and :class:`Route`: which rows a gadget writes and what they attend to;
  :func:`route_masks` turns a route into the hard masks a gadget module takes.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch


class Reg(Enum):
    """Token registers that exist once. Widths: D unless the realization says otherwise."""

    POS = "pos"  # one-hot position (max_len)
    ONE = "one"  # the constant 1
    C = "c"  # the position's loss weight (for predicting the next token)
    TOK = "tok"  # the token's output embedding (the row the previous position's loss gradient subtracts)
    EMB = "emb"  # the token's input embedding (+ learned position)
    TGT = "tgt"  # the next token's output embedding (written by a shift head)
    X = "x"  # the residual stream
    G = "g"  # d loss / d x during the backward pass
    COS = "cos"  # RoPE tables at the token's position (Llama family; head_dim each)
    SIN = "sin"
    # backward of one block (cleared after each block)
    DA = "da"  # d loss / d (MLP activation output)
    DS = "ds"  # d loss / d silu(gate) (Llama family)
    DH = "dh"  # d loss / d (MLP pre-activation): [d gate, d up] for the Llama family
    DG = "dg"  # view: d gate (Llama family)
    DUP = "dup"  # view: d up (Llama family)
    DU2 = "du2"
    DN2 = "dn2"
    DO = "do"  # d loss / d (attention output, all heads)
    DQKV = "dqkv"
    DU1 = "du1"
    DN1 = "dn1"
    # loss gradient at the top (cleared after use)
    NF = "nf"  # normalize(x) of the final norm
    UF = "uf"  # the final norm's output
    PE = "pe"  # E^T softmax(E uf): the expected output embedding
    DUF = "duf"
    DNF = "dnf"


class Act(Enum):
    """A block's activations (one scratch copy; one kept copy per simulated block)."""

    QKV = "qkv"  # q | k | v (scratch only: the backward needs the probabilities, not q, k)
    R = "r"  # q | k after RoPE (scratch only; Llama family)
    X = "x"  # block input (kept only)
    X2 = "x2"  # input of the MLP sublayer (kept only)
    PROBS = "probs"  # each head's row of attention probabilities, n_heads x max_len (kept only)
    N1 = "n1"  # normalize(x)
    U1 = "u1"  # ln1's output
    O = "o"  # attention output (all heads), before the output projection
    N2 = "n2"
    U2 = "u2"
    H = "h"  # MLP pre-activation: fc's output, or [gate, up] for the Llama family
    G = "g"  # view: the gate part of H (Llama family)
    UP = "up"  # view: the up part of H (Llama family)
    S = "s"  # silu(gate) (Llama family)
    A = "a"  # the MLP's hidden activation (input of proj / down)


@dataclass(frozen=True)
class At:
    """Activation ``act`` of simulated block ``layer``, or its scratch copy (``layer=None``)."""

    act: Act
    layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.act, Act):
            raise TypeError(f"At needs an Act, got {self.act!r}")
        if self.layer is not None and (not isinstance(self.layer, int) or self.layer < 0):
            raise ValueError(f"At.layer must be a block index >= 0 or None, got {self.layer!r}")


Register = Reg | At


class Pre(Enum):
    """The registers of a prefix row."""

    W = "w"  # [weight row, zero padding, bias] (the bias in the last coordinate)
    E = "e"  # one-hot of the row's index inside its group


class Map(Enum):
    """The auxiliary's linear maps held in prefix rows, one row per output coordinate."""

    LN1 = "ln1"  # diag(gamma), bias beta
    QKV = "qkv"  # q | k | v rows
    O = "o"
    LN2 = "ln2"
    FC = "fc"  # GPT-2 / OPT MLP
    PROJ = "proj"
    GU = "gu"  # gate | up rows (Llama family)
    DOWN = "down"
    LNF = "lnf"  # the final norm (no block)
    VOCAB = "vocab"  # the output embeddings (no block)


MEMBERS = {Map.LN1: ("ln1",), Map.QKV: ("q", "k", "v"), Map.O: ("o",), Map.LN2: ("ln2",),
           Map.FC: ("fc",), Map.PROJ: ("proj",), Map.GU: ("gate", "up"), Map.DOWN: ("down",)}
"""The :class:`hdopt.tint.aux.AuxSpec` tensors (``name.w``, ``name.b``) whose rows a block's map holds."""

NORMS = (Map.LN1, Map.LN2)  # maps holding diag(gamma): their gains are frozen by the reference rule


@dataclass(frozen=True)
class Group:
    """The prefix rows of map ``map`` in block ``layer`` (``layer=None`` exactly for LNF and VOCAB)."""

    map: Map
    layer: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.map, Map):
            raise TypeError(f"Group needs a Map, got {self.map!r}")
        outside = self.map in (Map.LNF, Map.VOCAB)
        if outside != (self.layer is None) or (self.layer is not None and self.layer < 0):
            need = "has no" if outside else "needs a"
            raise ValueError(f"{self.map} {need} block index, got {self.layer!r}")


class Keys(Enum):
    """Token-to-token attention patterns."""

    CAUSAL = "causal"  # token t attends to tokens s <= t
    SELF = "self"  # token t attends to itself
    TOKENS = "tokens"  # every row attends to every input token


@dataclass(frozen=True)
class Route:
    """Which rows a gadget writes (its hard 0/1 gate) and what they attend to (its hard attention mask).

    Attributes:
        rows: None for the input tokens, or a prefix :class:`Group` (an SGD update writes its rows, which
            then attend to the tokens: ``keys`` must be ``Keys.TOKENS``).
        keys: a :class:`Keys` pattern, a prefix :class:`Group` (tokens read a linear map), or None for
            modules without attention (MLP, norm).
    """

    rows: Group | None = None
    keys: Keys | Group | None = None

    def __post_init__(self) -> None:
        if self.rows is not None and not isinstance(self.rows, Group):
            raise TypeError(f"Route.rows must be a Group or None, got {self.rows!r}")
        if self.keys is not None and not isinstance(self.keys, (Keys, Group)):
            raise TypeError(f"Route.keys must be Keys, a Group or None, got {self.keys!r}")
        if self.rows is not None and self.keys is not Keys.TOKENS:
            raise ValueError("prefix rows only attend to the input tokens (keys=Keys.TOKENS)")


def route_masks(route: Route, groups: dict[Group, tuple[int, int]], n_prefix: int, T: int,
                dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The hard masks of ``route`` over ``n_prefix`` prefix rows followed by ``T`` input tokens.

    Args:
        groups: each prefix group's (first row, number of rows).
    Returns:
        (attention mask (N, N) bool, True = may attend, or None for modules without attention;
        row gate (N, 1) in ``dtype``, 1 on the rows the module writes).
    """
    P, N = n_prefix, n_prefix + T

    def rows_of(group: Group | None) -> torch.Tensor:
        rows = torch.zeros(N, dtype=torch.bool)
        start, n = (P, T) if group is None else groups[group]
        rows[start:start + n] = True
        return rows

    rows = rows_of(route.rows)
    gate = rows[:, None].to(dtype)
    if route.keys is None:
        return None, gate
    if route.keys is Keys.CAUSAL:
        allowed = torch.zeros(N, N, dtype=torch.bool)
        allowed[P:, P:] = torch.ones(T, T, dtype=torch.bool).tril()
    elif route.keys is Keys.SELF:
        allowed = torch.zeros(N, N, dtype=torch.bool)
        allowed[P + torch.arange(T), P + torch.arange(T)] = True
    else:  # every input token, or a prefix group's rows
        allowed = rows[:, None] & rows_of(None if route.keys is Keys.TOKENS else route.keys)[None]
    # rows with nothing to attend to (gated off) see themselves: no empty softmax
    return allowed | (torch.eye(N, dtype=torch.bool) & ~allowed.any(-1, keepdim=True)), gate
