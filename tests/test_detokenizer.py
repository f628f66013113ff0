"""`IncrementalDetokenizer` and `StopStringMatcher` (cases C01, C02).

Reference: ``tokenizer.decode(all_output_ids)`` of the real SmolLM2 tokenizer, cut before
the first stop string (brute force over the whole text). Random token sequences mix
multi-byte characters split across byte tokens (Chinese, emoji), special tokens and
arbitrary vocabulary ids; they are fed in random chunk sizes.
"""

from __future__ import annotations

import random

import pytest

from openmini.tokenizer.detokenizer import IncrementalDetokenizer
from openmini.tokenizer.stop_strings import StopStringMatcher
from openmini.tokenizer.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def smol(smollm2_gguf, tmp_path_factory) -> Tokenizer:
    """Converted once per test session (cache under the session's base temp dir)."""
    cache = tmp_path_factory.getbasetemp() / "tokenizer-cache" / "smollm2"
    return Tokenizer.from_gguf(smollm2_gguf, cache_dir=cache)


SNIPPETS = ["霓虹灯在夜里闪烁", " neon", "😀🎉", " façade", "Ελληνικά", "\n", " 12345",
            "，。", "🇳🇴", " A B C", " F G H", "<|im_end|>", "\ufffd"]


def byte_tokens(tok: Tokenizer, data: bytes) -> list[int]:
    """One token per byte (GPT-2 byte alphabet), splitting every multi-byte character."""
    from openmini.tokenizer.tokenizer import BYTE_LEVEL_DECODER

    char_of = {b: c for c, b in BYTE_LEVEL_DECODER.items()}
    return [tok.token_to_id(char_of[b]) for b in data]


def random_ids(tok: Tokenizer, rng: random.Random) -> list[int]:
    """A random output: encoded snippets, snippets cut into byte tokens, specials, noise."""
    ids: list[int] = []
    for _ in range(rng.randint(1, 10)):
        kind = rng.random()
        text = rng.choice(SNIPPETS)
        if kind < 0.4:
            ids += tok.encode(text)
        elif kind < 0.7:
            ids += byte_tokens(tok, text.encode())
        elif kind < 0.8:
            ids.append(rng.choice(sorted(tok.special_token_ids)))
        elif kind < 0.9:  # a lone piece of a multi-byte character (invalid UTF-8)
            ids += byte_tokens(tok, rng.choice(["中".encode()[:2], b"\x80", "😀".encode()[1:]]))
        else:
            ids.append(rng.randrange(tok.vocab_size))
    return ids


def ends_inside_character(tok, ids: list[int], skip: bool) -> bool:
    """Brute force: do the raw bytes of ``ids`` stop partway through a UTF-8 character?"""
    import codecs
    drop = tok.special_token_ids if skip else frozenset()
    data = b"".join(tok.token_bytes(i) for i in ids if i not in drop and i < tok.vocab_size)
    dec = codecs.getincrementaldecoder("utf-8")("replace")
    dec.decode(data, final=False)
    return bool(dec.getstate()[0])


def run(detok: IncrementalDetokenizer, ids: list[int], rng: random.Random
        ) -> tuple[list[str], str | None]:
    """Feed ``ids`` in random chunks; flush at the end unless a stop string matched."""
    deltas, matched, pos = [], None, 0
    while pos < len(ids) and matched is None:
        n = rng.randint(1, 3)
        d = detok.add_tokens(ids[pos:pos + n])
        pos += n
        deltas.append(d.text)
        matched = d.stop_matched
    if matched is None:
        deltas.append(detok.flush())
        matched = detok.stop_matched  # a stop string can end in the flushed tail
    return deltas, matched


def expected_with_stops(text: str, stops: list[str], include: bool) -> tuple[str, str | None]:
    """Brute force: the stop occurrence that ends first (ties: longer) cuts the text."""
    best = None
    for s in stops:
        i = text.find(s)
        if s and i >= 0:
            key = (i + len(s), -len(s), i, s)
            best = key if best is None or key < best else best
    if best is None:
        return text, None
    end, _, start, s = best
    return (text[:end] if include else text[:start]), s


# ---- C01: UTF-8 ---------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [True, False])
def test_joined_deltas_equal_decode(smol, skip):
    rng = random.Random(1 if skip else 2)
    for _ in range(400):
        ids = random_ids(smol, rng)
        detok = IncrementalDetokenizer(smol, [1, 2, 3], skip_special_tokens=skip)
        deltas, matched = run(detok, ids, rng)
        full = smol.decode(ids, skip_special_tokens=skip)
        if ends_inside_character(smol, ids, skip):
            assert full.endswith("\ufffd")
            full = full[:-1]  # a cut-off last character is dropped, never shown as U+FFFD
        assert matched is None
        assert "".join(deltas) == full == detok.text, ids
        if "\ufffd" not in full:
            assert not any("\ufffd" in d for d in deltas)


def test_multibyte_characters_never_split(smol):
    text = "霓虹灯在夜里闪烁，像梦一样。🌃✨ Neon 霓虹 😀"
    ids = byte_tokens(smol, text.encode())  # every character spans 3-4 tokens
    detok = IncrementalDetokenizer(smol, [])
    deltas = [detok.add_tokens([i]).text for i in ids]
    assert "".join(deltas) == text and detok.flush() == ""
    assert not any("\ufffd" in d for d in deltas)
    # each delta is released exactly when its character's last byte arrives
    assert sum(1 for d in deltas if d) == len(text)


def test_flush_drops_incomplete_character(smol):
    ids = smol.encode("ok ") + byte_tokens(smol, "中".encode()[:2])
    detok = IncrementalDetokenizer(smol, [])
    held = "".join(detok.add_tokens([i]).text for i in ids)
    assert held == "ok "
    assert smol.decode(ids) == "ok \ufffd"
    assert detok.flush() == "" and detok.text == "ok "


def test_real_replacement_character_is_not_held(smol):
    ids = smol.encode("a\ufffd")
    detok = IncrementalDetokenizer(smol, [])
    assert detok.add_tokens(ids).text == "a\ufffd"


def test_window_stays_small(smol):
    """O(window) per token: every decode call sees a handful of tokens, however long the
    output gets (counted, not timed)."""

    class CountingTokenizer:
        def __init__(self, inner):
            self.inner, self.longest = inner, 0
            self.special_token_ids = inner.special_token_ids

        def decode(self, ids, skip_special_tokens=True):
            self.longest = max(self.longest, len(ids))
            return self.inner.decode(ids, skip_special_tokens)

        def token_bytes(self, i):
            return self.inner.token_bytes(i)

    text = ("霓虹灯在夜里闪烁 neon lights 😀 " * 200)
    ids = smol.encode(text)
    assert len(ids) > 2000
    counting = CountingTokenizer(smol)
    detok = IncrementalDetokenizer(counting, [], stop=["never appears"])
    out = "".join(detok.add_tokens([i]).text for i in ids) + detok.flush()
    assert out == text
    assert counting.longest <= 8


# ---- C02: stop strings --------------------------------------------------------------------------


def test_c02_stop_string_spanning_tokens(smol):
    ids = smol.encode("A B C D E F G H I J")
    detok = IncrementalDetokenizer(smol, [], stop=[" F G H"])
    deltas = []
    for i in ids:
        d = detok.add_tokens([i])
        deltas.append(d.text)
        if d.stop_matched:
            break
    assert d.stop_matched == " F G H"
    assert "".join(deltas) == "A B C D E"
    assert not any("F" in x for x in deltas)
    assert detok.add_tokens(smol.encode(" more")).text == "" and detok.flush() == ""


def test_stop_string_ending_inside_a_token(smol):
    ids = smol.encode("Hello world, friends")
    assert smol.decode(ids[:2]) == "Hello world"  # " world" is one token
    for include, expected in [(False, "Hello"), (True, "Hello wor")]:
        detok = IncrementalDetokenizer(smol, [], stop=[" wor"], include_stop_str_in_output=include)
        d = detok.add_tokens(ids[:1])
        d2 = detok.add_tokens(ids[1:2])
        assert (d.text + d2.text, d2.stop_matched) == (expected, " wor")


def test_prefix_of_stop_is_held_then_flushed(smol):
    detok = IncrementalDetokenizer(smol, [], stop=[" F G H"])
    streamed = "".join(detok.add_tokens([i]).text for i in smol.encode("A B C D E F G"))
    assert streamed == "A B C D E"  # " F G" might still become " F G H"
    assert detok.flush() == " F G" and detok.stop_matched is None


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize("skip", [True, False])
def test_stop_strings_random(smol, include, skip):
    rng = random.Random(hash((include, skip)) & 0xFFFF)
    for _ in range(300):
        ids = random_ids(smol, rng)
        full = smol.decode(ids, skip_special_tokens=skip)
        if ends_inside_character(smol, ids, skip):
            full = full[:-1]  # the cut-off last character is never released
        stops = []
        for _ in range(rng.randint(1, 3)):
            if full and rng.random() < 0.8:  # a substring of the output, often across tokens
                a = rng.randrange(len(full))
                stops.append(full[a:a + rng.randint(1, 8)])
            else:
                stops.append(rng.choice(["zzz", "霓虹x", " F G H"]))
        detok = IncrementalDetokenizer(smol, [], skip_special_tokens=skip, stop=stops,
                                       include_stop_str_in_output=include)
        deltas, matched = run(detok, ids, rng)
        expected, expected_stop = expected_with_stops(full, stops, include)
        assert ("".join(deltas), matched) == (expected, expected_stop), (ids, stops)


def test_stop_matcher_rules():
    m = StopStringMatcher(["abcd", "c"], include_stop_str_in_output=False)
    assert m.feed("xab") == "x"  # "ab" may start "abcd"
    assert m.feed("c") == "ab" and m.matched == "c"  # "c" ends first
    m = StopStringMatcher(["bc", "abc"], include_stop_str_in_output=True)
    assert m.feed("xabcz") == "xabc" and m.matched == "abc"  # same end: the longer one
    m = StopStringMatcher(["", "ab"])
    assert m.feed("a") == "" and m.held == "a" and m.flush() == "a"
    assert StopStringMatcher([]).feed("abc") == "abc"
