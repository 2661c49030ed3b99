"""Structured output: the shape a reflection step's output must have, for engines that can enforce it.

A step's output is optional free text (the critique), then each marked section in order, each closed by ``[End]``::

    <critique> [New Instruction] <text> [End] [New Answer] <text> [End]

With a pre-filled opener the first section is already open and there is no critique. :class:`SectionFormat` says
this once; each engine turns it into its own mechanism:

* transformers: a logits processor (:mod:`reflect_trainer.oracles.section_processor`) that watches the decoded text
  and forces markers, within token budgets, so the sections come out even when the oracle runs out of tokens;
* llama.cpp: a GBNF grammar (:meth:`SectionFormat.gbnf`);
* vLLM and OpenAI-compatible servers: a regular expression (:meth:`SectionFormat.regex`).

Section text may contain ``[`` (code, arrays, citations) but not a ``[`` followed by the first letter of a marker
name, so the oracle cannot open or close a section by accident. Grammars cannot count tokens: with them, an output
whose critique uses up ``max_new_tokens`` still fails to parse (and falls back, counted), so the local engines add
token budgets that force the next marker. Even then the markers are what is enforced, not a usable text between
them: a section holding only markup, "N/A" or "..." is parsed as ``empty`` and falls back (2026-11-25: 49 of 50
instruction reflections parsed, ``benchmarks/b5_structured_output.py``).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

END = "End"


@dataclass(frozen=True)
class SectionFormat:
    """The marked sections a step must produce.

    Args:
        sections: Marker names in order, e.g. ``("New Instruction", "New Answer")``.
        open_first: The pre-filled text already opened the first section (its marker is not generated).
        preamble: Free text (the critique) is allowed before the first marker.
        end_marker: Closes every section.
    """

    sections: tuple[str, ...]
    open_first: bool = False
    preamble: bool = True
    end_marker: str = END

    def __post_init__(self) -> None:
        if not self.sections:
            raise ValueError("a SectionFormat needs at least one section")
        if self.open_first and self.preamble:
            raise ValueError("a pre-opened first section leaves no room for a preamble")

    def to_dict(self) -> dict:
        return {**asdict(self), "sections": list(self.sections)}

    def marker(self, name: str) -> str:
        return f"[{name}]"

    @property
    def _blocked_initials(self) -> str:
        """First letters (both cases) of every marker name: ``[`` followed by one of them cannot appear in text."""
        letters = {n[0] for n in (*self.sections, self.end_marker)}
        return "".join(sorted({c for letter in letters for c in (letter.lower(), letter.upper())}))

    # ---- regular expression (vLLM guided decoding, OpenAI-compatible servers) -------------------------------------
    def regex(self) -> str:
        text = rf"(?:[^\[]|\[[^\[{self._blocked_initials}])*"
        parts = [text] if self.preamble else []
        for i, name in enumerate(self.sections):
            if not (i == 0 and self.open_first):
                parts.append(r"\s*" + _regex_literal(self.marker(name)))
            parts += [text, _regex_literal(self.marker(self.end_marker))]
        return "".join(parts)

    # ---- GBNF (llama.cpp) -------------------------------------------------------------------------------------------
    def gbnf(self) -> str:
        blocked = "".join(f"\\{c}" if c in "]\\^-" else c for c in self._blocked_initials)
        items = ["text"] if self.preamble else []
        for i, name in enumerate(self.sections):
            if not (i == 0 and self.open_first):
                items += ["ws", _gbnf_literal(self.marker(name))]
            items += ["text", _gbnf_literal(self.marker(self.end_marker))]
        return "\n".join(
            [
                "root ::= " + " ".join(items),
                rf"text ::= ( [^\[] | {_gbnf_literal('[')} [^\[{blocked}] )*",
                r"ws ::= [ \t\n]*",
            ]
        )


def _regex_literal(text: str) -> str:
    # Only the metacharacters: some guided-decoding regex engines reject escapes they do not need (an escaped space).
    return re.sub(r"([\\.^$|?*+()\[\]{}])", r"\\\1", text)


def _gbnf_literal(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def section_format_for(sections: dict[str, str], prefill_section: str | None) -> SectionFormat:
    """The format of a template step: its sections in order; pre-opened when the pre-fill opened the first one."""
    names = tuple(sections.values())
    opened = prefill_section is not None and prefill_section == names[0]
    return SectionFormat(sections=names, open_first=opened, preamble=not opened)
