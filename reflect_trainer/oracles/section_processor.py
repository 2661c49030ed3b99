"""Structured output for the transformers engine: a logits processor that makes the marked sections come out.

Grammar engines forbid tokens; this processor lets the model write freely and steps in only when the format is at
risk. It decodes each sequence's text so far, works out where it is in the format (critique, inside section *i*,
between sections, done) with the parser's own marker regex, and asks the section budget
(:class:`~reflect_trainer.oracles.section_budget.SectionBudget`, shared with the llama.cpp engine) what to do. It
forces the next marker when the model wants to stop (end-of-sequence is its top choice) before the last section is
closed, when the current part has used its token budget, or when the tokens left only just fit the remaining
markers.

After the last ``[End]`` it forces end-of-sequence. Until the model has written something into a section, it can
neither end the sequence nor write a token with ``[`` (which could close the section empty): an empty section would
not parse. "Something" is judged by the parser's own rule (:func:`reflect_trainer.parsing.is_empty_field`: markup
only or "N/A" is empty too). What the processor cannot ensure is content the parser accepts (a loop, an echo).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import LogitsProcessor

from ..parsing import marker_regex
from ..structured import SectionFormat
from .section_budget import DONE, FORCE, HOLD, MIN_SECTION_TOKENS, SectionBudget, SequenceBudget  # noqa: F401


@dataclass
class _SequenceState(SequenceBudget):
    forced: list[int] = field(default_factory=list)  # token ids still to force, in order


class SectionFormatProcessor(LogitsProcessor):
    """Args:
        section_format: The sections to produce.
        tokenizer: The oracle's tokenizer (to decode and to encode the forced markers).
        prompt_length: Width of the (left-padded) prompt batch: generated tokens start there.
        max_new_tokens: The generation budget the format must fit in.
        eos_token_ids: Every id that ends a sequence; the first is the one forced (the id ``generate`` stops on).
        preamble_share: Most of ``max_new_tokens`` the critique may use.
    """

    def __init__(self, section_format: SectionFormat, tokenizer, prompt_length: int, max_new_tokens: int,
                 eos_token_ids: list[int], preamble_share: float = 0.35):
        self.format = section_format
        self.tokenizer = tokenizer
        self.prompt_length = prompt_length
        self.max_new_tokens = max_new_tokens
        self.eos_token_ids = list(dict.fromkeys(eos_token_ids))
        self.preamble_share = preamble_share
        names = [*section_format.sections, section_format.end_marker]
        self._names = sorted(set(names), key=len, reverse=True)
        self._regex = marker_regex(self._names)

        def encode(text: str) -> list[int]:
            return tokenizer(text, add_special_tokens=False)["input_ids"]

        self._open = [encode(f"\n{section_format.marker(n)} ") for n in section_format.sections]
        self._close = encode(f" {section_format.marker(section_format.end_marker)}")
        # The end-of-sequence forced after the last [End] is one more token to keep free.
        self.budget = SectionBudget(section_format, self._open, self._close, max_new_tokens, tail_tokens=1,
                                    preamble_share=preamble_share)
        self._bracket_ids = [i for token, i in tokenizer.get_vocab().items() if "[" in token]
        self._states: list[_SequenceState] = []
        #: Rows whose section text was cut because a budget ran out (their finish reason is ``length``).
        self.cut_rows: set[int] = set()

    # ---- where a sequence is in the format -----------------------------------------------------------------------
    def _locate(self, text: str) -> tuple[str, int]:
        sections, end = self.format.sections, self.format.end_marker
        part = ("in", 0) if self.format.open_first else ("pre", -1)
        for match in self._regex.finditer(text):
            name = self._names[int(match.lastgroup[1:])]
            if name == end:
                if part[0] == "in":
                    part = ("after", part[1])
            elif name in sections:
                index = sections.index(name)
                if index > part[1] or (index == part[1] and part[0] != "in"):  # in order; repeats are text
                    part = ("in", index)
        if part[0] == "after" and part[1] == len(sections) - 1:
            return ("done", part[1])
        return part

    # ---- the processor ----------------------------------------------------------------------------------------------
    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if not self._states:
            self._states = [_SequenceState() for _ in range(input_ids.shape[0])]
        generated = input_ids[:, self.prompt_length :].tolist()
        for row, (ids, state) in enumerate(zip(generated, self._states)):
            if state.forced:
                self._force(scores, row, state.forced.pop(0))
                continue
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            part = self._locate(text)
            k = self.budget.part_of(*part)
            section_text = text[self._section_start(text) :] if self.budget.in_section(k) else ""
            wants_to_stop = int(scores[row].argmax()) in self.eos_token_ids
            action, _ = self.budget.step(state, k, len(ids), section_text, wants_to_stop)
            if action == DONE:
                self._force(scores, row, self.eos_token_ids[0])
            elif action == HOLD:
                # An empty section would not parse; "empty" is the parser's rule (markup or "N/A" count as empty).
                scores[row, self.eos_token_ids + self._bracket_ids] = -float("inf")
            elif action == FORCE:
                if part[0] == "in" and not wants_to_stop:
                    self.cut_rows.add(row)  # the section is closed mid-text by the budget, not by the model
                state.forced = self._next_markers(part)
                self._force(scores, row, state.forced.pop(0))
        return scores

    def _section_start(self, text: str) -> int:
        """Offset where the text of the open section begins (after its marker, or 0 when pre-opened)."""
        last = None
        for last in self._regex.finditer(text):
            pass
        return last.end() if last is not None else 0

    def _next_markers(self, part: tuple[str, int]) -> list[int]:
        kind, index = part
        if kind == "in":
            following = index + 1
            tail = self._open[following] if following < len(self.format.sections) else [self.eos_token_ids[0]]
            return [*self._close, *tail]
        return list(self._open[index + 1])  # "pre" (index -1) or "after" a section

    @staticmethod
    def _force(scores: torch.FloatTensor, row: int, token_id: int) -> None:
        scores[row, :] = -float("inf")
        scores[row, token_id] = 0.0
