import numpy as np
import pytest

from jaxret.eval.qa import has_answer, hits_matrix, simple_tokens, top_k_accuracy


@pytest.mark.parametrize(
    "answers,text,expected",
    [
        (["Denver Broncos"], "The Denver Broncos won.", True),
        (["denver broncos"], "THE DENVER BRONCOS", True),  # casing
        (["Broncos"], "Denver-Broncos!", True),  # punctuation is its own token
        (["Bronco"], "The Broncos", False),  # no sub-word matches
        (["Pelé"], "pele scored", False),  # NFD keeps the accent as a mark
        (["Pelé"], "Pele\u0301 scored", True),  # composed vs decomposed accent
        (["café"], "Café au lait", True),
        (["Beyoncé Knowles"], "singer beyoncé knowles-carter", True),  # multi-token
        (["New York City"], "New York's City Hall", False),  # not contiguous
        (["3.5"], "about 3.5 million", True),  # "3", ".", "5"
        (["3.5"], "about 35 million", False),
        (["U.S."], "the u.s. army", True),
        (["x", "Paris"], "in paris, france", True),  # any answer suffices
        (["$1,000"], "costs $1,000 today", True),
    ],
)
def test_has_answer_string(answers, text, expected):
    assert has_answer(answers, text) is expected


def test_simple_tokenizer():
    assert simple_tokens("Hello, World! 3.5%") == ["hello", ",", "world", "!", "3", ".", "5", "%"]


@pytest.mark.parametrize(
    "pattern,text,expected",
    [
        (r"20\s?,?\s?(32|40)0\s?-?\s?f(ee|oo)t", "Mount McKinley is 20,320 feet tall", True),
        (r"\bparis\b", "PARIS is big", True),  # case-insensitive
        (r"^second", "first line\nsecond line", True),  # multiline
        (r"lions?", "tigers only", False),
        (r"(unclosed", "anything", False),  # an invalid pattern never matches
    ],
)
def test_has_answer_regex(pattern, text, expected):
    assert has_answer([pattern], text, "regex") is expected


def test_hits_and_top_k_accuracy():
    texts = ["the cat sat", "a dog ran", "cats and dogs", "paris 1889"]
    rows = np.array([[1, 0, 2], [2, 1, -1], [3, 1, 0]])
    hits = hits_matrix(
        [["cat"], ["elephant"], [r"18\d\d"]], ["string", "string", "regex"], rows, texts
    )
    np.testing.assert_array_equal(
        hits, [[False, True, False], [False, False, False], [True, False, False]]
    )
    acc = top_k_accuracy(hits, (1, 2, 3))
    assert acc == {
        "top1": pytest.approx(1 / 3),
        "top2": pytest.approx(2 / 3),
        "top3": pytest.approx(2 / 3),
    }
    # hits_matrix agrees with has_answer pair by pair
    for i, ans in enumerate([["cat"], ["elephant"]]):
        for j, r in enumerate(rows[i]):
            assert hits[i, j] == (r >= 0 and has_answer(ans, texts[r]))
    with pytest.raises(ValueError, match="fuzzy"):
        has_answer(["a"], "a", "fuzzy")
