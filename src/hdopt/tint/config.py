"""TinT configuration: one dataclass, validated once."""

from __future__ import annotations

from dataclasses import asdict, dataclass

BACKWARDS = ("reference", "exact")
REALIZATIONS = ("structured", "explicit", "compact")
REDUCTIONS = ("sum", "mean")


@dataclass
class TinTConfig:
    """What the TinT's forward pass simulates.

    Attributes:
        n_layers: how many top blocks of the auxiliary model are fine-tuned (the rest only run forward).
        n_steps: SGD steps on the context, each a full forward + backward of the top blocks.
        inner_lr: SGD learning rate of the simulated fine-tuning: ``theta <- theta - inner_lr * grad``.
        reduction: the inner loss over the context's training targets, "sum" (the reference) or "mean".
        backward: "exact" (true backpropagation) or "reference" (the paper's approximate rule; see
            :mod:`hdopt.tint.backward`).
        attn_score_grad: backpropagate through the attention probabilities (None: True for exact,
            False for reference; the reference rule requires False).
        update_norm_gain: update norm gains too (None: True for exact, False for reference, which updates
            LayerNorm biases only).
        fd_scale: N of the finite-difference backward of the reference rule (the reference uses 1000).
        fd_float64: evaluate those finite differences in float64 (structured realization; the networks
            compute in the model's dtype). False reproduces the reference code's model-dtype differences,
            which in float32 lose most digits (docs/tint.md, "float32").
        realization: "structured" (index/einsum ops; every architecture), "explicit" (a transformer with
            fixed-pattern weights and one prefix token per auxiliary weight row; GPT-2/OPT and Llama-family
            auxiliaries, reference backward rule; tiny auxiliaries only) or "compact" (the same kind of
            network packed as the paper packs it, small enough to run on a real auxiliary:
            :mod:`hdopt.tint.compact`).
        max_len: longest input (tokens) the explicit realization is built for (sizes its position registers).
    """

    n_layers: int = 1
    n_steps: int = 1
    inner_lr: float = 1e-4
    reduction: str = "mean"
    backward: str = "exact"
    attn_score_grad: bool | None = None
    update_norm_gain: bool | None = None
    fd_scale: float = 1000.0
    fd_float64: bool = True
    realization: str = "structured"
    max_len: int = 64

    def __post_init__(self) -> None:
        if self.n_layers < 1 or self.n_steps < 0:
            raise ValueError(f"need n_layers >= 1 and n_steps >= 0, got {self.n_layers}, {self.n_steps}")
        if self.inner_lr < 0:
            raise ValueError(f"inner_lr must be >= 0, got {self.inner_lr}")
        for name, value, allowed in (("reduction", self.reduction, REDUCTIONS),
                                     ("backward", self.backward, BACKWARDS),
                                     ("realization", self.realization, REALIZATIONS)):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        exact = self.backward == "exact"
        if self.attn_score_grad is None:
            self.attn_score_grad = exact
        if self.update_norm_gain is None:
            self.update_norm_gain = exact
        if not exact and (self.attn_score_grad or self.update_norm_gain):
            raise ValueError("the reference rule stops gradients at attention scores and freezes norm gains; "
                             "use backward='exact' for attn_score_grad / update_norm_gain")
        if self.fd_scale <= 0:
            raise ValueError(f"fd_scale must be > 0, got {self.fd_scale}")
        if self.realization in ("explicit", "compact") and exact:
            raise ValueError(f"the {self.realization} realization implements the reference rule: "
                             "set backward='reference'"
                             " (or use realization='structured')")
        if self.max_len < 2:
            raise ValueError(f"max_len must be >= 2, got {self.max_len}")

    def to_dict(self) -> dict:
        return asdict(self)
