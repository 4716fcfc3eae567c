"""attention/tokens.py: word -> CLIP token positions, with a fake word tokenizer (no ComfyUI)."""
from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.tokens import MAX_TOKENS, Prompt, PromptError, parse_prompt, split_words  # noqa: E402

# A word -> ids vocabulary; "hippopotamus" is three BPE tokens, punctuation is its own token
# (as CLIP does: "cat," -> "cat</w>", ",</w>").
VOCAB = {"a": [1], "red": [2], "circle": [3], "on": [4], "black": [5], "background": [6], "cat": [7],
         "dog": [8], "sitting": [9], "hippopotamus": [20, 21, 22], ",": [40], ".": [41]}


def tok(word: str) -> list[int]:
    core = word.rstrip(",.")
    return VOCAB[core.lower()] + [VOCAB[c][0] for c in word[len(core):]]


def test_spans_ids_and_end_with_a_multi_token_word():
    p = parse_prompt("a hippopotamus on a cat", tok)
    assert p.words == ("a", "hippopotamus", "on", "a", "cat")
    assert p.spans == ((1,), (2, 3, 4), (5,), (6,), (7,))
    assert p.ids == (1, 20, 21, 22, 4, 1, 7)
    assert p.end == 8  # start token 0, seven word tokens, then the end token


def test_empty_prompt():
    p = parse_prompt("", tok)
    assert p.words == () and p.spans == () and p.ids == ()
    assert p.end == 1


def test_positions_single_multi_and_repeated_words():
    p = parse_prompt("a hippopotamus on a cat", tok)
    assert p.positions("hippopotamus") == [2, 3, 4]
    assert p.positions("cat") == [7]
    assert p.positions("a") == [1, 6]  # every occurrence
    assert p.positions("cat a") == [1, 6, 7]  # several words: sorted union
    assert p.positions("a a") == [1, 6]  # no duplicates
    assert p.positions("Hippopotamus") == [2, 3, 4]  # case-insensitive
    assert p.positions("") == []


def test_positions_ignores_punctuation_on_both_sides():
    p = parse_prompt("a cat, sitting on a red circle.", tok)
    assert p.words == ("a", "cat,", "sitting", "on", "a", "red", "circle.")
    assert p.spans == ((1,), (2, 3), (4,), (5,), (6,), (7,), (8, 9))
    assert p.ids == (1, 7, 40, 9, 4, 1, 2, 3, 41)
    assert p.end == 10
    # the prompt's "cat," and "circle." are found by their bare words, and the query's own
    # punctuation (and commas between query words) is ignored
    assert p.positions("cat") == [2, 3]
    assert p.positions("cat,") == [2, 3]
    assert p.positions("circle") == [8, 9]
    assert p.positions("(circle)") == [8, 9]
    assert p.positions("red,circle") == [7, 8, 9]
    assert p.positions("cat, red") == [2, 3, 7]
    assert split_words("red,circle  cat") == ["red", "circle", "cat"]


def test_unknown_word_raises_prompt_error_naming_it():
    p = parse_prompt("a red circle", tok)
    with pytest.raises(PromptError) as e:
        p.positions("dog")
    assert "'dog'" in str(e.value)
    assert "a red circle" in str(e.value)
    # the first missing word of several is named
    with pytest.raises(PromptError, match="'cat'"):
        p.positions("red cat")
    assert issubclass(PromptError, ValueError)


def test_token_limit_75_words_tokens():
    ok = parse_prompt(" ".join(["a"] * 75), tok)
    assert len(ok.ids) == 75 and ok.end == 76 == MAX_TOKENS - 1
    with pytest.raises(PromptError) as e:
        parse_prompt(" ".join(["a"] * 76), tok)
    assert "76 tokens" in str(e.value) and "75" in str(e.value)
    # multi-token words count by their tokens: 25 x 3 = 75 fits, one more word does not
    parse_prompt(" ".join(["hippopotamus"] * 25), tok)
    with pytest.raises(PromptError, match="76 tokens"):
        parse_prompt(" ".join(["hippopotamus"] * 25 + ["a"]), tok)


def test_custom_max_tokens():
    parse_prompt("a red circle", tok, max_tokens=5)  # 3 + start + end
    with pytest.raises(PromptError, match="at most 2"):
        parse_prompt("a red circle", tok, max_tokens=4)


def test_prompt_is_frozen():
    p = parse_prompt("a cat", tok)
    assert isinstance(p, Prompt)
    with pytest.raises(Exception):
        p.text = "x"  # type: ignore[misc]
