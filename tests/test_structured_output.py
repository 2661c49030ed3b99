"""Structured output: the section format as regex / GBNF, and the transformers logits processor that makes the real
SmolLM2 oracle write the marked sections, even with the paper's one-call templates it cannot follow on its own."""

import re

import pytest

from reflect_trainer.oracles import GenerationSettings
from reflect_trainer.parsing import UNPARSED_REASONS, split_sections
from reflect_trainer.structured import SectionFormat, section_format_for
from test_support.recycling import recycle as recycle_with

TWO = SectionFormat(("New Instruction", "New Answer"))
OPENED = SectionFormat(("Better Answer",), open_first=True, preamble=False)


@pytest.mark.parametrize("text", [
    "The request is vague. [New Instruction] Sort [3, 1, 2] in Python. [End]\n"
    "[New Answer] Use sorted([3, 1, 2]). [End]",
    "[New Instruction] x [End][New Answer] y [End]",
])
def test_regex_accepts_well_formed_outputs_with_brackets_in_text(text):
    assert re.fullmatch(TWO.regex(), text, re.S)


@pytest.mark.parametrize("text", [
    "critique only, no sections",
    "[New Instruction] x [End]",  # the second section is missing
    "[New Instruction] x [End] [New Answer] y",  # not closed
    "[New Instruction] x [End] [New Answer] y [end] z [End]",  # a marker-like [end] inside the text
    "[New Answer] y [End] [New Instruction] x [End]",  # out of order
])
def test_regex_rejects_outputs_that_would_not_parse_as_intended(text):
    assert not re.fullmatch(TWO.regex(), text, re.S)


def test_a_preopened_section_has_no_marker_and_no_preamble():
    assert re.fullmatch(OPENED.regex(), " A fuller answer, see [1]. [End]", re.S)
    assert not re.fullmatch(OPENED.regex(), "[Better Answer] again [End]", re.S)
    assert section_format_for({"output": "Better Answer"}, "Better Answer") == OPENED
    assert section_format_for({"instruction": "New Instruction", "output": "New Answer"}, None) == TWO


def test_gbnf_grammar_names_every_marker_in_order():
    grammar = TWO.gbnf()
    root = grammar.splitlines()[0]
    assert root.index('"[New Instruction]"') < root.index('"[New Answer]"')
    assert root.count('"[End]"') == 2 and "text ::=" in grammar


def test_unconstrained_cache_keys_are_unchanged_and_constrained_ones_differ():
    assert "section_format" not in GenerationSettings().to_dict()  # keys written before this feature stay valid
    assert GenerationSettings(section_format=TWO).to_dict()["section_format"]["sections"] == list(TWO.sections)


def recycle(real_oracle, pairs, tmp_path, **config):
    out, recycler = recycle_with(pairs, real_oracle, tmp_path, **{"mode": "both", "template_set": "paper", **config})
    return out, recycler.stats()


@pytest.mark.slow
def test_paper_templates_with_structured_output_parse_every_one_of_four_real_pairs(real_oracle, alpaca_pairs, tmp_path):
    pairs = alpaca_pairs.select(range(100, 104))
    out, stats = recycle(real_oracle, pairs, tmp_path, max_new_tokens=64, structured_output=True)
    for phase in ("instruction_reflection", "response_reflection"):
        assert stats[f"{phase}/parse_rate"] == 1.0, stats
        assert all(reason not in UNPARSED_REASONS for reason in out[f"{phase}_fallback"])
    for raw in out["instruction_reflection_raw"]:
        found = split_sections(raw, {"instruction": "New Instruction", "output": "New Answer"})
        assert set(found) == {"New Instruction", "New Answer"} and all(v.strip() for v in found.values())
        assert raw.rstrip().endswith("[End]")  # closed, then ended: nothing generated after the last section


@pytest.mark.slow
def test_markers_are_forced_in_time_when_the_budget_is_tiny(real_oracle, alpaca_pairs, tmp_path):
    # 24 tokens for a critique and two sections: the processor must cut the critique and each section short.
    out, stats = recycle(real_oracle, alpaca_pairs.select(range(106, 110)), tmp_path, max_new_tokens=24,
                         structured_output=True, mode="instruction")
    assert stats["instruction_reflection/parse_rate"] == 1.0, out["instruction_reflection_raw"]
    # Control: the same prompts, same budget, unconstrained. The small oracle does not follow the paper's format on
    # its own, so here outputs go unparsed: the parse rate above is the processor's doing.
    free, free_stats = recycle(real_oracle, alpaca_pairs.select(range(106, 110)), tmp_path / "free",
                               max_new_tokens=24, structured_output=False, mode="instruction")
    assert free_stats["instruction_reflection/parse_rate"] < 1.0, free["instruction_reflection_raw"]
    assert any(reason in UNPARSED_REASONS for reason in free["instruction_reflection_fallback"])


@pytest.mark.parametrize("written, may_close", [("**", False), ("N/A", False), ("#:", False),
                                                ("Plants turn light into sugar.", True)])
def test_a_section_holding_only_markup_or_filler_is_not_let_close(written, may_close):
    """The processor used to let a section close once it held any non-blank text; the parser then called "**" or
    "N/A" empty: an unparsed output that structured output was there to prevent (B5's one miss in 50)."""
    import torch
    from transformers import AutoTokenizer

    from reflect_trainer.embedded import default_oracle_path
    from reflect_trainer.oracles.section_processor import SectionFormatProcessor

    tokenizer = AutoTokenizer.from_pretrained(default_oracle_path())
    eos = tokenizer.eos_token_id
    processor = SectionFormatProcessor(OPENED, tokenizer, prompt_length=0, max_new_tokens=64, eos_token_ids=[eos])
    ids = torch.tensor([tokenizer(written, add_special_tokens=False)["input_ids"]])
    scores = torch.zeros(1, len(tokenizer))
    scores[0, eos] = 10.0  # the model wants to stop here
    out = processor(ids, scores)
    close = tokenizer(" [End]", add_special_tokens=False)["input_ids"][0]
    if may_close:
        assert int(out[0].argmax()) == close  # it closes the section instead of stopping
    else:
        assert out[0, eos] == -float("inf") and out[0, close] == -float("inf")  # it must write something first
