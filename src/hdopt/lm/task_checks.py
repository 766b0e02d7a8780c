"""Checks of a task against a tokenizer: label words, and the room the context leaves.

Label words are the task's fixed options. A word that is several tokens is scored by its mean (or
summed) token log-likelihood and cannot be used by ``--lp-init``; a word without a leading space after a
prompt that ends in a letter is read glued to the last word (``It was`` + ``great`` = ``wasgreat``); two
words with the same tokens cannot be told apart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hdopt.lm.tasks import Example, Task, TaskError


@dataclass(frozen=True)
class WordTokens:
    """One label word and the tokens the tokenizer makes of it (as they are appended to a prompt)."""

    word: str
    ids: tuple[int, ...]
    pieces: tuple[str, ...]


def word_tokens(tokenizer, word: str) -> WordTokens:
    ids = tuple(tokenizer(word, add_special_tokens=False).input_ids)
    return WordTokens(word, ids, tuple(tokenizer.decode([i]) for i in ids))


def label_word_report(task: Task, tokenizer) -> list[WordTokens]:
    """The tokens of each label word of ``task`` (empty for per-example options and generation)."""
    return [word_tokens(tokenizer, w) for w in task.label_words]


def label_word_problems(task: Task, tokenizer, examples: Sequence[Example]) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` about ``task``'s label words with this tokenizer and these prompts."""
    errors, warnings = [], []
    words = label_word_report(task, tokenizer)
    by_ids: dict[tuple[int, ...], str] = {}
    for w in words:
        if not w.ids:
            errors.append(f"label word {w.word!r} has no tokens: give it some text")
        elif w.ids in by_ids:
            errors.append(f"label words {by_ids[w.ids]!r} and {w.word!r} are the same tokens; use others")
        by_ids.setdefault(w.ids, w.word)
        if len(w.ids) > 1:
            warnings.append(
                f"label word {w.word!r} is {len(w.ids)} tokens ({' + '.join(map(repr, w.pieces))}) for this "
                "tokenizer: it is scored by its mean token log-likelihood (the sum for lm-eval's acc), and "
                "--lp-init needs one-token words"
            )
    glued = [p for p in {e.prompt for e in examples} if p and not p[-1].isspace()]
    for w in words:
        if glued and w.word and not w.word[0].isspace():
            warnings.append(
                f"label word {w.word!r} has no leading space, and prompts end without one (e.g. "
                f"{glued[0][-20:]!r}): the model reads them glued together; write {' ' + w.word!r}"
            )
    return errors, warnings


def check_label_words(task: Task, tokenizer, examples: Sequence[Example]) -> list[str]:
    """Raise :class:`TaskError` for unusable label words; return the warnings."""
    errors, warnings = label_word_problems(task, tokenizer, examples)
    if errors:
        raise TaskError(f"task {task.name!r} ({task.source}): " + "; ".join(errors))
    return warnings


def longest_option(tokenizer, examples: Sequence[Example]) -> tuple[str, int]:
    """The option with the most tokens among ``examples`` and its length (``("", 0)`` if none)."""
    best = ("", 0)
    for option in {o for e in examples for o in e.options}:
        n = len(tokenizer(option, add_special_tokens=False).input_ids)
        if n > best[1]:
            best = (option, n)
    return best
