"""IFEval instruction checkers: one function per verifiable instruction type of Zhou et al.
2023, "Instruction-Following Evaluation for Large Language Models" (arXiv:2311.07911, Table 1),
written from the paper's descriptions of each instruction.

A checker is ``check(response: str, kwargs: dict, prompt: str) -> bool``; `CHECKERS` maps the
instruction id (``group:name`` as in the data) to it. Relations ``"at least"`` mean ``>=``
and ``"less than"`` mean ``<``. Words are ``\\w+`` runs; sentences come from
`split_sentences` (an offline regex splitter); languages from ``langdetect`` (seeded, so
deterministic; a text langdetect cannot classify passes, as in the paper's evaluation).

Loose scoring (paper, Section 3): an instruction passes loosely when it passes on any
non-empty variant of `loose_variants` (the response with its first line, last line or both
removed, each with and without ``*`` characters).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any

Checker = Callable[[str, dict[str, Any], str], bool]

# Abbreviations whose trailing period does not end a sentence (lowercase, without the dot).
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof sr jr st vs etc inc ltd co corp e.g i.e approx dept est fig no vol "
    "jan feb mar apr jun jul aug sep sept oct nov dec mt ave blvd rd u.s u.k a.m p.m ph.d".split()
)
_SENTENCE_END = re.compile(r"([.!?]+)([\"')\]]*)(\s+|$)")
_WORD = re.compile(r"\w+")


def count_words(text: str) -> int:
    """Number of ``\\w+`` runs (letters, digits, underscore) in ``text``."""
    return len(_WORD.findall(text))


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences with a regex rule set (no model, no downloads).

    A sentence ends at a run of ``.``, ``!`` or ``?`` (plus closing quotes/brackets) followed
    by whitespace or the end of text, except after a known abbreviation (``Mr.``, ``e.g.``),
    a single capital letter (initials, ``J. R. R.``) or a list number at the start of a line
    (``1. First step``); ``3.5`` never matches (no whitespace after the dot). A blank line
    (paragraph break) also ends a sentence. Empty pieces are dropped.
    """
    sentences: list[str] = []
    for block in re.split(r"\n\s*\n", text):
        start = 0
        for m in _SENTENCE_END.finditer(block):
            end = m.end(2)
            piece = block[start:end]
            before = block[start:m.start(1)]
            last_word = re.search(r"(\S+)$", before)
            token = last_word.group(1).lower().lstrip("(\"'") if last_word else ""
            line_start = block.rfind("\n", 0, m.start(1)) + 1
            list_number = token.isdigit() and not block[line_start:m.start(1)].strip(" \t").replace(token, "", 1)
            if m.group(1) == "." and m.group(3) and (
                token in _ABBREVIATIONS
                or (re.fullmatch(r"[a-z]", token) and last_word.group(1)[-1].isupper())
                or list_number
            ):
                continue
            if piece.strip():
                sentences.append(piece.strip())
            start = m.end()
        rest = block[start:].strip()
        if rest:
            sentences.append(rest)
    return sentences


def _compare(value: int, relation: str, target: int) -> bool:
    if relation == "at least":
        return value >= target
    if relation == "less than":
        return value < target
    raise ValueError(f"unknown relation {relation!r}")


@functools.cache
def _language_factory():
    """A langdetect detector factory with its own seed (profiles loaded once; read-only after)."""
    from langdetect.detector_factory import PROFILES_DIRECTORY, DetectorFactory

    factory = DetectorFactory()
    factory.seed = 0
    factory.load_profile(PROFILES_DIRECTORY)
    return factory


def detect_language(text: str) -> str | None:
    """ISO 639-1 code langdetect assigns to ``text`` (deterministic), or None if it cannot."""
    from langdetect.lang_detect_exception import LangDetectException

    try:
        detector = _language_factory().create()
        detector.append(text)
        return detector.detect()
    except LangDetectException:
        return None


# ---- keywords ------------------------------------------------------------------------------

def keywords_existence(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Every keyword occurs in the response (case-insensitive substring)."""
    low = response.lower()
    return all(k.lower() in low for k in kw["keywords"])


def keywords_frequency(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The keyword occurs ``frequency`` times ("at least" / "less than"), case-insensitive,
    counted as a substring (as the paper's evaluation does, so "cat" also counts in "cats")."""
    n = len(re.findall(re.escape(kw["keyword"]), response, flags=re.IGNORECASE))
    return _compare(n, kw["relation"], kw["frequency"])


def keywords_forbidden_words(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """None of the forbidden words occurs as a whole word (case-insensitive)."""
    return not any(
        re.search(r"\b" + re.escape(w) + r"\b", response, flags=re.IGNORECASE) for w in kw["forbidden_words"])


def keywords_letter_frequency(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The letter (or symbol) occurs ``let_frequency`` times, case-insensitive."""
    n = response.lower().count(kw["letter"].lower())
    return _compare(n, kw["let_relation"], kw["let_frequency"])


# ---- language ------------------------------------------------------------------------------

def language_response_language(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The whole response is in ``language`` (ISO 639-1) according to langdetect."""
    lang = detect_language(response)
    return lang is None or lang == kw["language"]


# ---- length constraints --------------------------------------------------------------------

def length_number_sentences(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Sentence count ("at least" / "less than" ``num_sentences``)."""
    return _compare(len(split_sentences(response)), kw["relation"], kw["num_sentences"])


def length_number_words(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Word count ("at least" / "less than" ``num_words``)."""
    return _compare(count_words(response), kw["relation"], kw["num_words"])


def length_number_paragraphs(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by the markdown divider ``***``.

    An empty piece before the first or after the last divider is not a paragraph; an empty
    piece between two dividers fails the check.
    """
    pieces = re.split(r"\s?\*\*\*\s?", response)
    count = len(pieces)
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i in (0, len(pieces) - 1):
                count -= 1
            else:
                return False
    return count == kw["num_paragraphs"]


def length_nth_paragraph_first_word(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Exactly ``num_paragraphs`` paragraphs separated by blank lines (two newlines), and
    paragraph ``nth_paragraph`` (1-based) starts with ``first_word`` (case-insensitive,
    leading quotes and trailing punctuation ignored)."""
    paragraphs = [p for p in re.split(r"\n\n", response) if p.strip()]
    if len(paragraphs) != kw["num_paragraphs"]:
        return False
    nth = kw["nth_paragraph"]
    if not 1 <= nth <= len(paragraphs):
        return False
    words = paragraphs[nth - 1].split()
    if not words:
        return False
    m = re.match(r"[\"'*_#(\[]*([^\W_]+)", words[0])
    first = m.group(1).lower() if m else ""
    return first == kw["first_word"].lower()


# ---- detectable content --------------------------------------------------------------------

def content_number_placeholders(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """At least ``num_placeholders`` square-bracket placeholders like ``[address]``."""
    return len(re.findall(r"\[.*?\]", response)) >= kw["num_placeholders"]


def content_postscript(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The postscript marker (``P.S.``, ``P.P.S``, ...) occurs, case-insensitive; one space
    after each dot is tolerated (``P. S.``). Like the paper's evaluation, the marker is not
    required to begin a line."""
    marker = kw["postscript_marker"].strip().lower()
    pattern = "".join(re.escape(ch) + (r"\s?" if ch == "." else "") for ch in marker)
    return re.search(pattern, response.lower()) is not None


# ---- detectable format ---------------------------------------------------------------------

CONSTRAINED_OPTIONS = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


def format_constrained_response(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The response contains one of the fixed options ("My answer is yes." / "no." / "maybe.")."""
    text = response.strip()
    return any(opt in text for opt in CONSTRAINED_OPTIONS)


def format_json(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The whole response is valid JSON, optionally wrapped in a ```json fenced block."""
    text = response.strip()
    text = re.sub(r"^```(?:json)?\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*```$", "", text)
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def format_multiple_sections(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """At least ``num_sections`` sections, each begun by ``<section_spliter> <number>``
    (e.g. "SECTION 1")."""
    pattern = r"\s?" + re.escape(kw["section_spliter"]) + r"\s?\d+\s?"
    return len(re.split(pattern, response)) - 1 >= kw["num_sections"]


def format_number_bullet_lists(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Exactly ``num_bullets`` markdown bullet lines (``* item`` or ``- item``)."""
    stars = re.findall(r"^\s*\*[^\*].*$", response, flags=re.MULTILINE)
    dashes = re.findall(r"^\s*-.*$", response, flags=re.MULTILINE)
    return len(stars) + len(dashes) == kw["num_bullets"]


def format_number_highlighted_sections(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """At least ``num_highlights`` non-empty markdown highlights ``*text*`` (``**text**``
    counted too) on one line."""
    n = 0
    for pat in (r"\*[^\n\*]*\*", r"\*\*[^\n\*]*\*\*"):
        n += sum(1 for h in re.findall(pat, response) if h.strip("*").strip())
    return n >= kw["num_highlights"]


def format_title(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """A non-empty title in double angular brackets, ``<<title>>``, on one line."""
    return any(t.strip() for t in re.findall(r"<<([^\n]+?)>>", response))


# ---- combination ---------------------------------------------------------------------------

def combination_repeat_prompt(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The response begins with the request repeated word for word (case-insensitive)."""
    return response.strip().lower().startswith(kw["prompt_to_repeat"].strip().lower())


def combination_two_responses(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Exactly two different non-empty responses separated by six asterisks ``******``."""
    pieces = response.split("******")
    kept = []
    for i, piece in enumerate(pieces):
        if not piece.strip():
            if i not in (0, len(pieces) - 1):
                return False
            continue
        kept.append(piece.strip())
    return len(kept) == 2 and kept[0] != kept[1]


# ---- change case ---------------------------------------------------------------------------

def case_english_capital(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Entire response in English and in capital letters."""
    lang = detect_language(response)
    return response.isupper() and (lang is None or lang == "en")


def case_english_lowercase(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Entire response in English and in lowercase letters."""
    lang = detect_language(response)
    return response.islower() and (lang is None or lang == "en")


def case_capital_word_frequency(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """Number of all-capital words ("at least" / "less than" ``capital_frequency``)."""
    n = sum(1 for w in _WORD.findall(response) if w.isupper())
    return _compare(n, kw["capital_relation"], kw["capital_frequency"])


# ---- start / end ---------------------------------------------------------------------------

def startend_end_checker(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The response ends with the phrase, nothing after it (case-insensitive, surrounding
    whitespace ignored)."""
    return response.strip().lower().endswith(kw["end_phrase"].strip().lower())


def startend_quotation(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """The whole response is wrapped in double quotation marks."""
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


# ---- punctuation ---------------------------------------------------------------------------

def punctuation_no_comma(response: str, kw: dict[str, Any], prompt: str) -> bool:
    """No ASCII comma anywhere in the response."""
    return "," not in response


CHECKERS: dict[str, Checker] = {
    "keywords:existence": keywords_existence,
    "keywords:frequency": keywords_frequency,
    "keywords:forbidden_words": keywords_forbidden_words,
    "keywords:letter_frequency": keywords_letter_frequency,
    "language:response_language": language_response_language,
    "length_constraints:number_sentences": length_number_sentences,
    "length_constraints:number_paragraphs": length_number_paragraphs,
    "length_constraints:number_words": length_number_words,
    "length_constraints:nth_paragraph_first_word": length_nth_paragraph_first_word,
    "detectable_content:number_placeholders": content_number_placeholders,
    "detectable_content:postscript": content_postscript,
    "detectable_format:constrained_response": format_constrained_response,
    "detectable_format:json_format": format_json,
    "detectable_format:multiple_sections": format_multiple_sections,
    "detectable_format:number_bullet_lists": format_number_bullet_lists,
    "detectable_format:number_highlighted_sections": format_number_highlighted_sections,
    "detectable_format:title": format_title,
    "combination:repeat_prompt": combination_repeat_prompt,
    "combination:two_responses": combination_two_responses,
    "change_case:english_capital": case_english_capital,
    "change_case:english_lowercase": case_english_lowercase,
    "change_case:capital_word_frequency": case_capital_word_frequency,
    "startend:end_checker": startend_end_checker,
    "startend:quotation": startend_quotation,
    "punctuation:no_comma": punctuation_no_comma,
}
INSTRUCTION_IDS = tuple(CHECKERS)


def loose_variants(response: str) -> list[str]:
    """The paper's loose transformations: the response with its first line removed, its last
    line removed, both removed, and each of these four (including the original) with all
    ``*`` removed — 8 variants, the original first."""
    lines = response.split("\n")
    base = [
        response,
        "\n".join(lines[1:]),
        "\n".join(lines[:-1]),
        "\n".join(lines[1:-1]),
    ]
    return base + [v.replace("*", "") for v in base]


def check_instruction(instruction_id: str, response: str, kwargs: dict[str, Any], prompt: str = "",
                      loose: bool = False) -> bool:
    """Whether ``response`` follows instruction ``instruction_id`` with ``kwargs``.

    Strict: the checker on the raw response (an empty/blank response fails every instruction).
    Loose: passes if any non-blank `loose_variants` passes.

    Raises:
        KeyError: unknown instruction id.
    """
    checker = CHECKERS[instruction_id]
    candidates = loose_variants(response) if loose else [response]
    return any(c.strip() and checker(c, kwargs, prompt) for c in candidates)
