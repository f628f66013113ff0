"""IFEval checkers (one passing and one failing response per instruction type), strict vs
loose scoring, the four aggregate numbers, and the data file's instruction ids."""

from __future__ import annotations

import pytest

from openmini.evals import ifeval
from openmini.evals.ifeval_checkers import (
    CHECKERS,
    check_instruction,
    count_words,
    loose_variants,
    split_sentences,
)

LONG_EN = ("The quick brown fox jumps over the lazy dog while the farmer watches from the porch "
           "and drinks his morning coffee before going to work in the fields. ")

# instruction id -> (kwargs, passing response, failing response)
CASES = {
    "keywords:existence": (
        {"keywords": ["Banana", "train"]}, "A banana rode the TRAIN.", "A banana rode the bus."),
    "keywords:frequency": (
        {"keyword": "cat", "relation": "at least", "frequency": 2}, "Cat and cat.", "One cat."),
    "keywords:forbidden_words": (
        {"forbidden_words": ["bad", "ugly"]}, "A badge is fine.", "That was Bad."),
    "keywords:letter_frequency": (
        {"letter": "z", "let_relation": "less than", "let_frequency": 2}, "Zoo.", "Zigzag."),
    "language:response_language": (
        {"language": "de"},
        "Der schnelle braune Fuchs springt über den faulen Hund, während der Bauer auf der Veranda sitzt.",
        LONG_EN),
    "length_constraints:number_sentences": (
        {"relation": "less than", "num_sentences": 3}, "One. Two!", "One. Two! Three?"),
    "length_constraints:number_paragraphs": (
        {"num_paragraphs": 2}, "First part.\n***\nSecond part.", "First.\n***\n\n***\nThird."),
    "length_constraints:number_words": (
        {"relation": "at least", "num_words": 5}, "one two three four five", "one two three four"),
    "length_constraints:nth_paragraph_first_word": (
        {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "elm"},
        "Trees are nice.\n\n\"Elm, the tree, is tall.", "Trees are nice.\n\nOak is tall."),
    "detectable_content:number_placeholders": (
        {"num_placeholders": 2}, "Dear [name], at [address].", "Dear [name]."),
    "detectable_content:postscript": (
        {"postscript_marker": "P.S."}, "Hello.\n\nP.S. See you.", "Hello. See you."),
    "detectable_format:constrained_response": (
        {}, "My answer is maybe.", "Maybe."),
    "detectable_format:json_format": (
        {}, "```json\n{\"a\": 1}\n```", "Here is JSON: {\"a\": 1}"),
    "detectable_format:multiple_sections": (
        {"section_spliter": "SECTION", "num_sections": 2}, "SECTION 1\nIntro\nSECTION 2\nBody",
        "SECTION 1\nIntro only"),
    "detectable_format:number_bullet_lists": (
        {"num_bullets": 2}, "Items:\n* one\n- two", "Items:\n* one\n* two\n* three"),
    "detectable_format:number_highlighted_sections": (
        {"num_highlights": 2}, "*first* and **second**", "*first* and ** **"),
    "detectable_format:title": (
        {}, "<<Poem of Joy>>\nLines.", "Poem of Joy\nLines."),
    "combination:repeat_prompt": (
        {"prompt_to_repeat": "Write a poem."}, "write a poem. Roses are red.", "Roses are red."),
    "combination:two_responses": (
        {}, "Answer one.\n******\nAnswer two.", "Answer one.\n******\nAnswer one."),
    "change_case:english_capital": (
        {}, LONG_EN.upper(), LONG_EN),
    "change_case:english_lowercase": (
        {}, LONG_EN.lower(), LONG_EN),
    "change_case:capital_word_frequency": (
        {"capital_relation": "at least", "capital_frequency": 2}, "NASA and ESA fly.", "NASA flies."),
    "startend:end_checker": (
        {"end_phrase": "Is there anything else?"}, "Done. is there anything else?  ", "Is there anything else? Bye."),
    "startend:quotation": (
        {}, '"All quoted."', '"Half quoted.'),
    "punctuation:no_comma": (
        {}, "No commas here.", "Yes, one."),
}


def test_every_checker_has_a_case():
    assert set(CASES) == set(CHECKERS)
    assert len(CHECKERS) == 25


@pytest.mark.parametrize("iid", sorted(CASES))
def test_checker_pass_and_fail(iid):
    kwargs, good, bad = CASES[iid]
    assert check_instruction(iid, good, kwargs, prompt="p") is True
    assert check_instruction(iid, bad, kwargs, prompt="p") is False


def test_data_instruction_ids_all_have_checkers():
    rows = ifeval.load_prompts()
    assert len(rows) == 541
    ids = {i for r in rows for i in r["instruction_id_list"]}
    assert ids <= set(CHECKERS)
    # every kwargs dict has exactly the arguments its checker reads (no None placeholders)
    for r in rows:
        for iid, kw in zip(r["instruction_id_list"], r["kwargs"]):
            assert None not in kw.values()
            check_instruction(iid, "Some response.", kw, prompt=r["prompt"], loose=True)


def test_blank_response_fails_everything():
    for iid, (kwargs, _, _) in CASES.items():
        assert not check_instruction(iid, "  \n", kwargs)


def test_strict_vs_loose():
    # A chatty first line ("Sure!") breaks the quotation rule strictly, not loosely.
    resp = 'Sure, here you go:\n"The whole answer in quotes."'
    assert not check_instruction("startend:quotation", resp, {})
    assert check_instruction("startend:quotation", resp, {}, loose=True)
    # Markdown bold around the end phrase: only the '*'-free loose variants pass.
    resp2 = "Text.\n**Any other questions?**"
    kw = {"end_phrase": "Any other questions?"}
    assert not check_instruction("startend:end_checker", resp2, kw)
    assert check_instruction("startend:end_checker", resp2, kw, loose=True)


def test_loose_variants():
    v = loose_variants("a*\nb\nc*")
    assert v[:4] == ["a*\nb\nc*", "b\nc*", "a*\nb", "b"]
    assert v[4:] == ["a\nb\nc", "b\nc", "a\nb", "b"]


def test_sentences_and_words():
    text = "Dr. Smith paid 3.50 dollars. Was it e.g. cheap? Yes!\n1. First item.\n\nNo final dot"
    assert split_sentences(text) == [
        "Dr. Smith paid 3.50 dollars.", "Was it e.g. cheap?", "Yes!", "1. First item.", "No final dot"]
    assert count_words("It's 3.5 km, isn't it?") == 8


def test_language_detection_is_deterministic():
    text = "Bonjour tout le monde, ceci est une phrase en français."
    results = {check_instruction("language:response_language", text, {"language": "fr"}) for _ in range(5)}
    assert results == {True}


def test_aggregate_four_numbers():
    scored = [
        (["a", "b"], {"strict": [True, True], "loose": [True, True]}),
        (["a", "c"], {"strict": [True, False], "loose": [True, True]}),
        (["b"], {"strict": [False], "loose": [False]}),
        (["c"], {"strict": [False], "loose": [True]}),
    ]
    s = ifeval.aggregate(scored)
    assert s["prompt_level_strict"] == pytest.approx(25.0)
    assert s["instruction_level_strict"] == pytest.approx(100 * 3 / 6)
    assert s["prompt_level_loose"] == pytest.approx(75.0)
    assert s["instruction_level_loose"] == pytest.approx(100 * 5 / 6)
    assert s["per_instruction"]["c"] == {"n": 2, "strict": 0.0, "loose": 100.0}


def test_score_record():
    rec = {"prompt": "p", "response": "Hi, there.\n*Bye*",
           "instruction_id_list": ["punctuation:no_comma", "detectable_format:number_highlighted_sections"],
           "kwargs": [{}, {"num_highlights": 1}]}
    assert ifeval.score_record(rec) == {"strict": [False, True], "loose": [True, True]}
