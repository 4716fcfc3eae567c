"""attention/tokens.py: word -> CLIP token positions, with a fake word tokenizer (no ComfyUI)."""
from __future__ import annotations

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from attention.tokens import CHUNK, Prompt, PromptError, Word, parse_prompt, prompt_from_tokens, split_words  # noqa: E402

START, END = 49406, 49407
# A word -> ids vocabulary; "hippopotamus" is three BPE tokens, punctuation is its own token
# (as CLIP does: "cat," -> "cat</w>", ",</w>").
VOCAB = {"a": [1], "red": [2], "circle": [3], "on": [4], "black": [5], "background": [6], "cat": [7],
         "dog": [8], "sitting": [9], "smiling": [10], "bunny": [11], "doll": [12], "tiger": [13],
         "hippopotamus": [20, 21, 22], ",": [40], ".": [41]}
PUNCTUATION = {40, 41}


def tok(word: str) -> list[int]:
    core = word.rstrip(",.")
    return VOCAB[core.lower()] + [VOCAB[c][0] for c in word[len(core):]]


def P(text: str) -> Prompt:
    return parse_prompt(text, tok, punctuation=lambda t: t in PUNCTUATION)


def test_words_keys_and_tail_with_a_multi_token_word():
    p = P("a hippopotamus on a cat")
    assert [w.text for w in p.words] == ["a", "hippopotamus", "on", "a", "cat"]
    assert [w.positions for w in p.words] == [(1,), (2, 3, 4), (5,), (6,), (7,)]
    assert [w.core for w in p.words] == [(1,), (2, 3, 4), (5,), (6,), (7,)]  # no punctuation: core = all
    assert p.keys[:8] == (START, 1, 20, 21, 22, 4, 1, 7)
    assert p.keys[8:] == (END,) * (CHUNK - 8)  # end token, then padding with the end id
    assert p.length == CHUNK == 77 and len(p.keys) == 77
    assert p.starts == (0,)
    assert p.tails == (tuple(range(8, 77)),) and p.tails[0][0] == 8  # the end token: start + seven word tokens
    assert p.content == (1, 2, 3, 4, 5, 6, 7)


def test_empty_prompt():
    p = P("")
    assert p.words == () and p.content == ()
    assert p.keys[0] == START and p.keys[1:] == (END,) * 76
    assert p.tails[0][0] == 1 and p.length == 77


def test_positions_single_multi_and_repeated_words():
    p = P("a hippopotamus on a cat")
    assert p.positions("hippopotamus") == [2, 3, 4]
    assert p.positions("cat") == [7]
    assert p.positions("a") == [1, 6]  # every occurrence
    assert p.positions("cat a") == [1, 6, 7]  # several words: sorted union
    assert p.positions("a a") == [1, 6]  # no duplicates
    assert p.positions("Hippopotamus") == [2, 3, 4]  # case-insensitive
    assert p.positions("") == []


def test_positions_are_core_tokens_without_edge_punctuation():
    p = P("a cat, sitting on a red circle.")
    assert [w.text for w in p.words] == ["a", "cat", "sitting", "on", "a", "red", "circle"]
    assert [w.positions for w in p.words] == [(1,), (2, 3), (4,), (5,), (6,), (7,), (8, 9)]
    assert p.words[1] == Word("cat", (2, 3), (2,)) and p.words[6] == Word("circle", (8, 9), (8,))
    assert p.keys[1:11] == (1, 7, 40, 9, 4, 1, 2, 3, 41, END)
    assert p.tails[0][0] == 10
    assert p.content == tuple(range(1, 10))  # the punctuation tokens are content, not tail
    # the prompt's "cat," and "circle." are found by their bare words and address the word's token
    # only (the ',' and '.' are positions of their own); the query's punctuation is ignored too
    assert p.positions("cat") == [2]
    assert p.positions("cat,") == [2]
    assert p.positions("circle") == [8]
    assert p.positions("(circle)") == [8]
    assert p.positions("red,circle") == [7, 8]
    assert p.positions("cat, red") == [2, 7]
    assert split_words("red,circle  cat") == ["red", "circle", "cat"]


def test_positions_exclude_a_comma_and_a_full_stop():
    # (a): "a smiling, bunny doll." -> 'smiling' is token 2 (the ',' is 3), 'doll' is 5 (the '.' is 6)
    p = P("a smiling, bunny doll.")
    assert p.keys[1:8] == (1, 10, 40, 11, 12, 41, END)
    assert p.positions("smiling") == [2]
    assert p.positions("doll") == [5]
    assert p.positions("smiling doll") == [2, 5]
    assert p.positions("bunny") == [4]
    assert p.words[1].positions == (2, 3) and p.words[3].positions == (5, 6)


def test_has():
    p = P("a cat, sitting")
    assert p.has("cat") and p.has("Cat,") and p.has("sitting")
    assert not p.has("dog") and not p.has(",")


def test_unknown_word_raises_prompt_error_naming_it():
    p = P("a red circle")
    with pytest.raises(PromptError) as e:
        p.positions("dog")
    assert "'dog'" in str(e.value)
    assert "a red circle" in str(e.value)
    # the first missing word of several is named
    with pytest.raises(PromptError, match="'cat'"):
        p.positions("red cat")
    assert issubclass(PromptError, ValueError)


def test_parse_prompt_builds_one_chunk_of_75_word_tokens():
    ok = P(" ".join(["a"] * 75))
    assert len(ok.content) == 75 and ok.tails == ((76,),) and ok.length == CHUNK
    with pytest.raises(PromptError) as e:
        P(" ".join(["a"] * 76))
    assert "76 tokens" in str(e.value) and "one chunk" in str(e.value)
    # multi-token words count by their tokens: 25 x 3 = 75 fits, one more word does not
    P(" ".join(["hippopotamus"] * 25))
    with pytest.raises(PromptError, match="76 tokens"):
        P(" ".join(["hippopotamus"] * 25 + ["a"]))


def test_prompt_is_frozen():
    p = P("a cat")
    assert isinstance(p, Prompt)
    with pytest.raises(Exception):
        p.text = "x"  # type: ignore[misc]


# ---------------------------------------------------------------- prompt_from_tokens
# ComfyUI's tokenize_with_weights(return_word_ids=True): (token, weight, word id) per position,
# word id 0 for start/end/padding, one id per whitespace word; CLIP's pieces end a pre-token in '</w>'.
PIECES = {1: "a</w>", 7: "cat</w>", 20: "hippo", 21: "pot", 22: "amus</w>", 40: ",</w>", 41: ".</w>",
          10: "smiling</w>", 12: "doll</w>"}


def chunk(entries: list[tuple[int, int]]) -> list[tuple]:
    """[start, (token, word id)..., end, padding] as one 77-token chunk."""
    out = [(START, 1.0, 0)] + [(t, 1.0, w) for t, w in entries] + [(END, 1.0, 0)]
    return out + [(END, 1.0, 0)] * (CHUNK - len(out))


def test_prompt_from_tokens_one_chunk_with_punctuation_and_bpe():
    text = "a hippopotamus, cat."
    p = prompt_from_tokens(text, [chunk([(1, 1), (20, 2), (21, 2), (22, 2), (40, 2), (7, 3), (41, 3)])],
                           PIECES.get, text)
    assert [w.text for w in p.words] == ["a", "hippopotamus", "cat"]
    assert [w.positions for w in p.words] == [(1,), (2, 3, 4, 5), (6, 7)]
    assert [w.core for w in p.words] == [(1,), (2, 3, 4), (6,)]
    assert p.positions("hippopotamus") == [2, 3, 4] and p.positions("cat") == [6]
    assert p.starts == (0,) and p.tails == (tuple(range(8, 77)),) and p.length == 77
    assert p.keys[:9] == (START, 1, 20, 21, 22, 40, 7, 41, END)


def test_prompt_from_tokens_two_chunks():
    # 75 'a' fill the first chunk; "cat" opens the second one at position 77 + 1
    text = " ".join(["a"] * 75 + ["cat"])
    c0 = chunk([(1, i + 1) for i in range(75)])
    c1 = chunk([(7, 76)])
    p = prompt_from_tokens(text, [c0, c1], PIECES.get, text)
    assert p.length == 2 * CHUNK == 154
    assert p.starts == (0, 77)
    assert p.tails == ((76,), tuple(range(79, 154)))
    assert len(p.words) == 76 and p.positions("cat") == [78]
    assert p.positions("a") == list(range(1, 76))
    assert p.keys[76:80] == (END, START, 7, END)


def test_prompt_from_tokens_words_follow_whitespace_of_the_plain_text():
    # "smiling,doll" is one whitespace word, although it is three pre-tokens
    text = "a smiling,doll"
    p = prompt_from_tokens(text, [chunk([(1, 1), (10, 2), (40, 2), (12, 2)])], PIECES.get, text)
    assert [w.positions for w in p.words] == [(1,), (2, 3, 4)]
    assert p.words[1].core == (2, 3, 4)  # the ',' is inside the word, not at its edge


def test_t5_sentencepiece_words_and_edge_punctuation():
    """T5's pieces as ComfyUI's T5 tokenizer gives "a (red:1.2) ice-cream circle." (no start token,
    '</s>' then padding): '▁' starts a word, a lone '▁' joins the next piece, punctuation is a
    piece of its own, so "ice-cream" is one word and "circle." has the '.' at its edge."""
    vocab = {3: "\u2581", 9: "a", 1131: "\u2581red", 867: "ice", 18: "-", 11763: "cream", 8196: "\u2581circle",
             5: ".", 1: "</s>", 0: "<pad>"}
    ids = [(3, 1), (9, 1), (1131, 2), (3, 3), (867, 3), (18, 3), (11763, 3), (8196, 3), (5, 3)]
    chunk = [(t, 1.0, w) for t, w in ids] + [(1, 1.0, 0)] + [(0, 1.0, 0)] * 4
    p = prompt_from_tokens("a (red:1.2) ice-cream circle.", [chunk], vocab.get, "a red ice-cream circle.",
                           sentencepiece=True)
    assert [w.text for w in p.words] == ["a", "red", "ice-cream", "circle"]
    assert p.positions("a") == [0, 1] and p.positions("red") == [2] and p.positions("ice-cream") == [3, 4, 5, 6]
    assert p.positions("circle") == [7] and p.words[-1].positions == (7, 8)  # the '.' is at its edge
    assert p.starts == () and p.tails == ((9, 10, 11, 12, 13),) and p.length == 14
