"""The section budget of structured output: one state machine that both local engines adapt.

Grammars and regexes keep an output in shape but cannot count tokens: a small oracle writes its critique until
``max_new_tokens`` runs out and never opens a section. So a local engine asks this machine, after each token, whether
to force the next marker: when the current part has used its share (the critique: ``preamble_share`` of
``max_new_tokens``; a section: an equal share of what is free when it opens; the gap between sections: nothing), or
when the tokens left only just fit the markers still to come. One exception comes first: a section with nothing
usable in it yet (:func:`reflect_trainer.parsing.is_empty_field`) is never closed — the engine keeps the model from
ending or closing it — because an empty section would not parse.

An output's parts are counted by the markers written so far: part ``k`` follows the ``k``-th marker of
``[New Instruction] [End] [New Answer] [End]`` (without the first when the pre-fill opened it). Each engine finds
``k`` its own way (the llama.cpp grammar keeps markers in order, so it counts them; the transformers processor reads
the text with the parser's regex) and encodes the markers with its own tokenizer:

* transformers: :class:`~reflect_trainer.oracles.section_processor.SectionFormatProcessor` (a logits processor);
* llama.cpp: ``LlamaCppOracle`` (:mod:`reflect_trainer.oracles.llama_cpp_engine`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..parsing import is_empty_field
from ..structured import SectionFormat

PREAMBLE_SHARE = 0.35  # most of max_new_tokens the critique may use
MIN_SECTION_TOKENS = 4  # kept free for each section still to write: enough for a few words

WRITE, FORCE, HOLD, DONE = "write", "force", "hold", "done"


@dataclass
class SequenceBudget:
    """Where one sequence is: its part, when that part began and the tokens it may use."""

    part: int | None = None  # None before the first step
    part_start: int = 0
    part_budget: int = 0


class SectionBudget:
    """Args:
        fmt: The sections to produce.
        open_tokens: Per section, the token ids of the marker that opens it (as the engine writes it).
        close_tokens: The token ids of the marker that closes a section (``[End]``).
        max_new_tokens: The generation budget the format must fit in.
        tail_tokens: Tokens the engine must still write after the last marker (an end-of-sequence it forces).
        preamble_share: Most of ``max_new_tokens`` the critique may use.
    """

    def __init__(self, fmt: SectionFormat, open_tokens: list[list[int]], close_tokens: list[int],
                 max_new_tokens: int, tail_tokens: int = 0, preamble_share: float = PREAMBLE_SHARE):
        self.format = fmt
        self.max_new = max_new_tokens
        self.tail = tail_tokens
        self.preamble_share = preamble_share
        #: The markers in order, as token ids, and whether each opens a section (else it closes one).
        self.markers: list[list[int]] = []
        self.opens: list[bool] = []
        for i in range(len(fmt.sections)):
            if not (i == 0 and fmt.open_first):
                self.markers.append(list(open_tokens[i]))
                self.opens.append(True)
            self.markers.append(list(close_tokens))
            self.opens.append(False)

    # ---- where an output is --------------------------------------------------------------------------------------
    def part_of(self, kind: str, section: int) -> int:
        """The part index of a located position: ``("pre", -1)``, ``("in", i)``, ``("after", i)`` or ``("done", i)``."""
        if kind == "pre":
            return 0
        if kind == "done":
            return len(self.markers)
        close = 2 * section + (0 if self.format.open_first else 1)  # index of section i's [End] among the markers
        return close if kind == "in" else close + 1

    def in_section(self, k: int) -> bool:
        """Part ``k`` is the text of a section (its next marker closes it)."""
        return k < len(self.markers) and not self.opens[k]

    def reserve(self, k: int) -> int:
        """Tokens needed to write every marker from the ``k``-th on, with a few words in each section still to open."""
        return sum(len(t) for t in self.markers[k:]) + MIN_SECTION_TOKENS * sum(self.opens[k:])

    def must_not_close(self, k: int, section_text: str) -> bool:
        """The section being written holds nothing usable yet: closing it (or ending the output) would not parse."""
        return self.in_section(k) and is_empty_field(section_text)

    # ---- the decision ----------------------------------------------------------------------------------------------
    def step(self, state: SequenceBudget, k: int, used: int, section_text: str = "",
             wants_to_stop: bool = False) -> tuple[str, list[int]]:
        """What to do after ``used`` generated tokens, in part ``k``: ``(WRITE, [])`` the model writes on;
        ``(FORCE, ids)`` write the next marker now; ``(HOLD, [])`` the section is empty: the model must write, and must
        not end or close it; ``(DONE, [])`` every marker is written. ``section_text``: the text of the open section
        so far; ``wants_to_stop``: end-of-sequence is the model's top choice (an engine without a grammar)."""
        if k >= len(self.markers):
            return DONE, []
        if k != state.part:  # a new part began: give it its budget
            state.part, state.part_start = k, used
            if self.opens[k]:
                state.part_budget = int(self.preamble_share * self.max_new) if k == 0 and self.format.preamble else 0
            else:
                sections_left = 1 + sum(self.opens[k:])
                state.part_budget = max(MIN_SECTION_TOKENS, (self.max_new - used - self.reserve(k)) // sections_left)
        if self.must_not_close(k, section_text):
            return HOLD, []
        over_budget = used - state.part_start >= state.part_budget
        no_room = self.max_new - used <= self.reserve(k) + self.tail
        if wants_to_stop or over_budget or no_room:  # a gap between sections has no budget: forced at once
            return FORCE, list(self.markers[k])
        return WRITE, []
