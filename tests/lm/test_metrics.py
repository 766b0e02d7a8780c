"""SQuAD-style exact match and F1 on hand-computed cases."""

from __future__ import annotations

import pytest

from hdopt.lm.metrics import accuracy, exact_match, f1_score, normalize_answer


def test_normalize_answer():
    assert normalize_answer("The  Denver Broncos!") == "denver broncos"
    assert normalize_answer("an apple, a pear") == "apple pear"
    assert normalize_answer("  theory  ") == "theory"  # "the" inside a word stays


def test_exact_match_takes_any_gold():
    assert exact_match("Denver Broncos.", ["Broncos", "the Denver Broncos"]) == 1.0
    assert exact_match("Denver", ["Broncos", "Denver Broncos"]) == 0.0


@pytest.mark.parametrize(
    ("prediction", "answers", "f1"),
    [
        ("the cat sat", ["a cat sat down"], 0.8),  # P = 2/2, R = 2/3 -> 2PR/(P+R) = 0.8
        ("cat cat", ["cat"], 2 / 3),  # P = 1/2 (one "cat" matches), R = 1 -> 2/3
        ("dog", ["cat"], 0.0),
        ("", ["cat"], 0.0),
        ("Nobel Prize in physics", ["Nobel Prize", "physics"], 2 / 3),  # best gold: P = 2/4, R = 1
    ],
)
def test_f1_known_cases(prediction, answers, f1):
    assert f1_score(prediction, answers) == pytest.approx(f1)


def test_accuracy():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5
