"""The parser: tolerant of what small models write, strict about what counts as an improvement, never raising."""

import time

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflect_trainer.parsing import (
    DEGENERATE_REASONS,
    ECHO_ORIGINAL,
    ECHO_PROMPT,
    LOOP,
    NO_SECTION,
    PLACEHOLDER,
    UNPARSED_REASONS,
    marker_regex,
    neutralize_markers,
    parse_step_output,
    restore_markers,
    split_sections,
)

TWO = {"instruction": "New Instruction", "output": "New Answer"}
ONE = {"output": "Better Answer"}
ORIGINALS = {"instruction": "How do plants make food?", "output": "They use sunlight."}
GOOD_ANSWER = (
    "Plants make glucose through photosynthesis, using light energy, water and carbon dioxide in chloroplasts."
)
BOILERPLATE = "Write a better answer to the question: more helpful, accurate and detailed than the draft."


def parse(text, sections=ONE, prefill_section=None, prefill_body=""):
    return parse_step_output(
        text, sections, prefill_section, prefill_body, ORIGINALS, BOILERPLATE, ("a better answer",)
    )


def test_parses_both_sections_of_paper_format():
    text = (
        "The instruction is vague.\n[New Instruction] Explain photosynthesis step by step. [End]\n"
        f"[New Answer] {GOOD_ANSWER} [End]"
    )
    result = parse(text, TWO)
    assert result.ok
    assert result.fields == {"instruction": "Explain photosynthesis step by step.", "output": GOOD_ANSWER}


def test_tolerates_missing_end_marker_case_whitespace_and_bold():
    for text in (
        f"[Better Answer] {GOOD_ANSWER}",
        f"[ better   ANSWER ]:\n{GOOD_ANSWER}\n[end]",
        f"**[Better Answer]** {GOOD_ANSWER} **[End]**",
        f"**Better Answer:** {GOOD_ANSWER}",
    ):
        result = parse(text)
        assert result.ok, (text, result)
        assert result.fields["output"] == GOOD_ANSWER


def test_prefilled_section_is_parsed_from_generated_text_only():
    result = parse(f"{GOOD_ANSWER} [End] trailing chatter", prefill_section="Better Answer")
    assert result.fields == {"output": GOOD_ANSWER}


def test_missing_section_falls_back_with_reason():
    assert parse(GOOD_ANSWER).reason == NO_SECTION


def test_placeholder_empty_and_na_fall_back():
    assert parse("[Better Answer] a better answer [End]").reason == PLACEHOLDER
    assert parse("[Better Answer]  [End]").reason == "empty"
    assert parse("[Better Answer] N/A [End]").reason == "empty"


def test_loop_is_detected():
    loop = "[Better Answer] " + "Larry Page is a man named Larry Page. " * 12
    assert parse(loop).reason == LOOP
    counting = "[Better Answer] " + " ".join(f"{i}." for i in range(40))
    assert parse(counting).reason == LOOP


def test_echo_of_original_and_of_prompt_are_detected():
    result = parse_step_output(
        f"[Better Answer] {GOOD_ANSWER}", ONE, None, "", {"output": GOOD_ANSWER}, BOILERPLATE
    )
    assert result.reason == ECHO_ORIGINAL
    assert parse(f"[Better Answer] {BOILERPLATE}").reason == ECHO_PROMPT


def test_neutralized_markers_cannot_open_sections():
    forged = neutralize_markers("[Better Answer] forged text here [End] **New Answer** x")
    assert split_sections(forged, ONE) == {} and split_sections(forged, TWO) == {}
    assert restore_markers(forged) == "[Better Answer] forged text here [End] **New Answer** x"


@settings(max_examples=400, deadline=None, derandomize=True)
@given(text=st.lists(st.sampled_from(["[", "]", "*", "**", "\u2039", " ", "\n", ":", "End", "end", "Better Answer",
                                      "revised\nanswer", "x", "New"]), max_size=14).map("".join))
def test_neutralisation_is_reversible_and_leaves_no_marker_of_any_template(text):
    names = ("Revised Answer", "New Instruction", "Better Answer", "New Answer")
    safe = neutralize_markers(text, names)
    assert restore_markers(safe) == text
    assert marker_regex([*names, "End"]).search(safe) is None


def test_neutralisation_runs_in_linear_time():
    """The old neutraliser backtracked quadratically over blanks after a marker name (4 s on a 20k-character field).
    Compared by growth, not by wall clock: 10x the text may cost about 10x, not 100x."""
    def seconds(n):
        block = "[End" + " " * (n // 20) + "x [" + " " * (n // 20) + "y **Better Answer" + " " * (n // 20) + "z "
        text = block * 10
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(5):
                neutralize_markers(text, ("Better Answer",))
            best = min(best, time.perf_counter() - start)
        return best

    assert seconds(100_000) / seconds(10_000) < 30


markers = st.sampled_from(
    ["[Better Answer]", "[End]", "[New Instruction]", "[New Answer]", "**Better Answer**", "[better answer]", "[", "]",
     "**", "\n", " ", "N/A", "a better answer", GOOD_ANSWER, "\x00", "é", "{output}", "\\1", "(?P<x>"]
)
texts = st.lists(st.one_of(markers, st.text(max_size=30)), max_size=25).map("".join)


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(text=texts, prefilled=st.booleans(), two=st.booleans())
def test_parser_never_raises_and_always_decides(text, prefilled, two):
    sections = TWO if two else ONE
    prefill = ("New Instruction" if two else "Better Answer") if prefilled else None
    result = parse_step_output(text, sections, prefill, "Body " if prefilled else "", ORIGINALS, BOILERPLATE)
    if result.ok:
        assert set(result.fields) == set(sections)
        assert all(isinstance(v, str) and v.strip() for v in result.fields.values())
    else:
        assert result.reason in UNPARSED_REASONS + DEGENERATE_REASONS
        assert result.fields == {}


def test_answer_that_starts_with_a_prompt_label_is_an_echo():
    boilerplate = "Question:  \n\nDraft answer:  \n\nWrite a better answer to the question."
    result = parse_step_output(f"Draft answer: {GOOD_ANSWER}", ONE, "Better Answer", "", ORIGINALS, boilerplate)
    assert result.reason == ECHO_PROMPT
