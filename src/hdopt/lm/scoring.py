"""Option scoring: per-token log-likelihoods of candidate continuations, and the losses built on them.

Every (prompt, option) pair is one right-padded row (one-token options of an example share a row). The
transformer body runs once over the batch; the LM head (a ``hidden x vocab`` matmul, the largest
activation of a small model) is applied only at the positions that predict option tokens.

    score(prompt, option) = (1/|option|) * sum_t log p(option_t | prompt, option_<t)

Classification: argmax over options of the score; the training loss is cross-entropy over the options'
scores (MeZO's "length-normalised" classification loss). Generation/multiple-choice training uses the
teacher-forced answer loss: mean negative log-likelihood of the gold continuation's tokens.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hdopt.lm.tasks.base import Example


@dataclass
class OptionBatch:
    """Token sequences and the option tokens they predict.

    Shapes: S sequences of T tokens, M option tokens, R options (one per (example, option) pair), E
    examples. A sequence is a prompt followed by all but the last token of an option; options of one
    example with the same such tokens (one-token label words: " terrible"/" great", Yes/No) share one
    sequence, so a two-way one-token task runs one row per example. Option token m is predicted by the
    output at ``(target_seq[m], target_pos[m])``.
    """

    input_ids: torch.Tensor  # [S, T] long, right-padded
    attention_mask: torch.Tensor  # [S, T] long
    target_seq: torch.Tensor  # [M] long
    target_pos: torch.Tensor  # [M] long, the position whose output predicts the token
    target_token: torch.Tensor  # [M] long
    target_option: torch.Tensor  # [M] long, in 0..R-1
    option_example: torch.Tensor  # [R] long, the example an option belongs to
    option_index: torch.Tensor  # [R] long, its index among that example's options
    option_length: torch.Tensor  # [R] long, its number of tokens
    labels: torch.Tensor  # [E] long, gold option per example (-100 when unknown)

    @property
    def num_examples(self) -> int:
        return int(self.labels.numel())

    @property
    def num_options(self) -> int:
        return int(self.option_example.numel())

    def to(self, device: torch.device | str) -> OptionBatch:
        return OptionBatch(**{k: v.to(device) for k, v in vars(self).items()})


def truncate_left(prompt_ids: list[int], budget: int, keep_first: bool) -> list[int]:
    """Keep the last ``budget`` tokens of a prompt (and its first token, a BOS, when ``keep_first``)."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    if keep_first and budget > 1:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - budget + 1 :]
    return prompt_ids[len(prompt_ids) - budget :] if budget > 0 else []


def starts_with_bos(tokenizer, ids: Sequence[int]) -> bool:
    """True when ``ids`` begin with the tokenizer's BOS token (kept by left truncation)."""
    return bool(ids) and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id


def encode_options(
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    labels: Sequence[int | None] | None = None,
    max_length: int = 2048,
    add_special_tokens: bool = True,
) -> OptionBatch:
    """Tokenise every ``prompt + option`` pair into one batch.

    The prompt is tokenised with the tokenizer's special tokens (a BOS where the model uses one; pass
    ``add_special_tokens=False`` when a :class:`Prefix` supplies it), each option without; prompts longer
    than ``max_length - len(option)`` lose tokens on the left (the BOS is kept). Options are tokenised on
    their own, so their leading space belongs to them (``" great"``).
    """
    assert len(prompts) == len(options)
    sequences: list[list[int]] = []
    targets: list[tuple[int, int, int, int]] = []  # (sequence, position, token, option)
    option_rows: list[tuple[int, int, int]] = []  # (example, option index, length)
    for e, (prompt, opts) in enumerate(zip(prompts, options, strict=True)):
        prompt_ids = tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
        keep_first = starts_with_bos(tokenizer, prompt_ids)
        shared: dict[tuple[int, ...], int] = {}  # this example's sequences
        for o, option in enumerate(opts):
            if max_length < 2:
                raise ValueError(
                    f"max_length {max_length} leaves no room: a row needs at least one prompt token and one "
                    "option token (max_length >= 2)"
                )
            option_ids = tokenizer(option, add_special_tokens=False).input_ids[: max_length - 1]
            if not option_ids:
                raise ValueError(f"option {option!r} has no tokens")
            kept = truncate_left(prompt_ids, max_length - len(option_ids), keep_first)
            if not kept:
                raise ValueError(f"prompt {prompt!r} has no tokens to condition the option on")
            key = tuple(kept + option_ids[:-1])  # the last option token is predicted, never fed
            if key not in shared:
                shared[key] = len(sequences)
                sequences.append(list(key))
            r = len(option_rows)
            option_rows.append((e, o, len(option_ids)))
            targets += [(shared[key], len(kept) - 1 + t, tok, r) for t, tok in enumerate(option_ids)]
    width = max(len(ids) for ids in sequences)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(sequences), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, ids in enumerate(sequences):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention_mask[i, : len(ids)] = 1
    target = torch.tensor(targets, dtype=torch.long).T
    option = torch.tensor(option_rows, dtype=torch.long).T
    gold = [-100 if label is None else label for label in (labels or [None] * len(prompts))]
    return OptionBatch(
        input_ids=input_ids,
        attention_mask=attention_mask,
        target_seq=target[0],
        target_pos=target[1],
        target_token=target[2],
        target_option=target[3],
        option_example=option[0],
        option_index=option[1],
        option_length=option[2],
        labels=torch.tensor(gold, dtype=torch.long),
    )


def encode_examples(
    tokenizer, examples: Sequence[Example], max_length: int = 2048, prefix: str = ""
) -> OptionBatch:
    """Classification rows: every option of every example (``prefix`` is prepended to each prompt)."""
    return encode_options(
        tokenizer,
        [prefix + e.prompt for e in examples],
        [e.options for e in examples],
        [e.label for e in examples],
        max_length,
    )


def encode_answers(
    tokenizer, examples: Sequence[Example], max_length: int = 2048, prefix: str = ""
) -> OptionBatch:
    """Teacher-forcing rows: one ``prompt + gold continuation`` row per example (``Example.target``)."""
    return encode_options(
        tokenizer,
        [prefix + e.prompt for e in examples],
        [[e.target] for e in examples],
        [0] * len(examples),
        max_length,
    )


# ---------------------------------------------------------------------------------------------------------
# the model side


def unwrap_peft(model):
    """The transformers model under a PEFT wrapper (LoRA layers are injected in place, so it runs them)."""
    config = getattr(model, "active_peft_config", None)
    if config is None:
        return model
    if getattr(config, "is_prompt_learning", False):
        return None  # prefix/prompt tuning lives in the wrapper's forward: use the full forward
    return model.get_base_model()


def _can_split(inner) -> bool:
    """True when the model has a separate body (``base_model``) and an output embedding (the head)."""
    return getattr(inner, "base_model", inner) is not inner and inner.get_output_embeddings() is not None


def head_transform(config, logits: torch.Tensor) -> torch.Tensor:
    """The output transforms some families apply to the LM head's logits (elementwise)."""
    scaling = getattr(config, "logits_scaling", None)  # Granite
    if scaling:
        logits = logits / scaling
    cap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def _head_logits(model, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the LM head (and the output transforms some families add) to hidden states [M, H]."""
    return head_transform(model.config, model.get_output_embeddings()(hidden))


def _check_head(inner) -> bool:
    """Once per model: the split body+head path must reproduce the model's own logits."""
    flag = getattr(inner, "_hdopt_split_head_ok", None)
    if flag is not None:
        return flag
    was_training = inner.training
    inner.eval()
    ids = torch.arange(1, 6, device=inner.get_output_embeddings().weight.device).unsqueeze(0)
    with torch.no_grad():
        full = inner(input_ids=ids, use_cache=False).logits[0].float()
        split = _head_logits(inner, inner.base_model(input_ids=ids, use_cache=False)[0][0]).float()
    inner.train(was_training)
    flag = bool(torch.allclose(full, split, atol=1e-4, rtol=1e-4))
    inner._hdopt_split_head_ok = flag
    return flag


@dataclass
class Prefix:
    """A context shared by every row (the ICL demonstrations), run through the model once.

    ``cache`` is the model's key/value cache for the ``length`` prefix tokens (batch 1); scoring copies
    and repeats it per batch, so each row only runs its own tokens.
    """

    length: int
    cache: object


@torch.no_grad()
def encode_prefix(model, prefix_ids: Sequence[int]) -> Prefix:
    """Run ``prefix_ids`` (with the BOS, if the model uses one) once and keep the key/value cache."""
    device = model.get_input_embeddings().weight.device
    ids = torch.tensor([list(prefix_ids)], device=device)
    out = model(input_ids=ids, use_cache=True)
    cache = getattr(out, "cache", None) or out.past_key_values  # renamed in transformers 5.x
    return Prefix(length=len(prefix_ids), cache=cache)


def _cache_argument(module) -> str:
    """``cache`` (transformers >= 5.x) or ``past_key_values`` (older), whichever ``forward`` takes."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def _model_inputs(module, batch: OptionBatch, prefix: Prefix | None) -> dict:
    if prefix is None:
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask, "use_cache": False}
    rows = batch.input_ids.shape[0]
    cache = copy.deepcopy(prefix.cache)
    cache.batch_repeat_interleave(rows)
    ones = torch.ones(rows, prefix.length, dtype=batch.attention_mask.dtype, device=batch.input_ids.device)
    mask = torch.cat([ones, batch.attention_mask], dim=1)  # [S, P + T]
    return {
        "input_ids": batch.input_ids,
        "attention_mask": mask,
        _cache_argument(module): cache,
        "use_cache": True,
    }


def logprobs_from_states(model, batch: OptionBatch, states: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every option token [M] from the body's output at the positions that predict
    them, ``states`` [M, H] (the LM head is applied there only)."""
    logits = _head_logits(model, states)  # [M, V]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, batch.target_token[:, None])[:, 0]


def logprobs_from_hidden(model, batch: OptionBatch, hidden: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every option token [M] from the body's output ``hidden`` [S, T, H]."""
    return logprobs_from_states(model, batch, hidden[batch.target_seq, batch.target_pos])


def token_logprobs(model, batch: OptionBatch, prefix: Prefix | None = None) -> torch.Tensor:
    """Log-probabilities of every option token (after the shared ``prefix``, when given).

    Returns:
        ``logp`` of shape [M]: ``logp[m] = log p(target_token[m] | the tokens before it)``.
        Differentiable with respect to the model's parameters.
    """
    inner = unwrap_peft(model)
    if inner is not None and _can_split(inner) and _check_head(inner):
        hidden = inner.base_model(**_model_inputs(inner.base_model, batch, prefix))[0]  # [S, T, H]
        return logprobs_from_hidden(inner, batch, hidden)
    # full-vocabulary logits at every position, then gather (any model, slower)
    logits = model(**_model_inputs(model, batch, prefix)).logits[batch.target_seq, batch.target_pos]
    return torch.log_softmax(logits.float(), dim=-1).gather(1, batch.target_token[:, None])[:, 0]


def option_scores_from_logprobs(batch: OptionBatch, logp: torch.Tensor, reduce: str = "mean") -> torch.Tensor:
    """Option scores [R] from the option tokens' log-probabilities [M]: their ``mean`` or ``sum``."""
    assert reduce in ("mean", "sum"), reduce
    total = logp.new_zeros(batch.num_options).index_add(0, batch.target_option, logp)
    return total if reduce == "sum" else total / batch.option_length.to(logp.dtype)


def option_scores(
    model, batch: OptionBatch, prefix: Prefix | None = None, reduce: str = "mean"
) -> torch.Tensor:
    """Log-likelihood of each option, shape [R] (differentiable): the per-token ``mean`` (MeZO's score)
    or the ``sum`` over its tokens (lm-evaluation-harness's ``acc``)."""
    return option_scores_from_logprobs(batch, token_logprobs(model, batch, prefix), reduce)


def scores_by_example(batch: OptionBatch, scores: torch.Tensor) -> torch.Tensor:
    """Option scores [R] -> [E, max options], missing options filled with -inf."""
    width = int(batch.option_index.max()) + 1
    table = torch.full((batch.num_examples, width), float("-inf"), dtype=scores.dtype, device=scores.device)
    return table.index_put((batch.option_example, batch.option_index), scores)


def classification_loss(model, batch: OptionBatch) -> torch.Tensor:
    """Cross-entropy over the options' mean log-likelihoods, averaged over examples (a scalar).

    loss = -(1/E) * sum_e log softmax_o(score(e, o))[label_e]
    """
    logits = scores_by_example(batch, option_scores(model, batch))
    return F.cross_entropy(logits, batch.labels, ignore_index=-100)


def answer_loss(model, batch: OptionBatch) -> torch.Tensor:
    """Teacher-forced LM loss: mean negative log-likelihood over all gold-continuation tokens (a scalar).

    Build the batch with :func:`encode_answers` (one row per example, the row's option = the answer).
    """
    return -token_logprobs(model, batch).mean()


@torch.no_grad()
def predict(
    model, batch: OptionBatch, prefix: Prefix | None = None, reduce: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(predictions [E], scores [E, max options])``: argmax of the option log-likelihood (per-token
    ``mean`` or ``sum``, see :func:`option_scores`)."""
    table = scores_by_example(batch, option_scores(model, batch, prefix, reduce))
    return table.argmax(dim=1), table
