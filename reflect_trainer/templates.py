"""Prompt templates for the two reflection phases, written in our own words, named and versioned.

A phase (``instruction_reflection`` or ``response_reflection``) is one or more *steps*; each step is one oracle call.
The paper's templates do a phase in one call (critique, then marked sections). Small local oracles cannot follow
that, so the ``compact`` set splits instruction reflection into two short calls and pre-fills each section opener at
the start of the assistant turn, with stop strings, so the section is open before the oracle writes a word (it can
still leave it empty, which the parser counts).

A template's text is part of the cache key (see :mod:`reflect_trainer.cache`): editing a template regenerates,
editing the parser does not.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

INSTRUCTION_REFLECTION = "instruction_reflection"
RESPONSE_REFLECTION = "response_reflection"
PHASES = (INSTRUCTION_REFLECTION, RESPONSE_REFLECTION)
END_MARKER = "End"


@dataclass(frozen=True)
class ReflectionStep:
    """One oracle call.

    Args:
        name: Short name, unique within the template (part of the cache key).
        user: The user turn. Fields substituted by :func:`render`: ``{instruction}``, ``{input}``, ``{output}``,
            ``{input_block}`` (``"\\n\\n" + input`` or empty) and ``{request}`` (instruction and input merged).
        sections: Which pair field each marked section fills, e.g. ``{"output": "Better Answer"}``. In order.
        system: Optional system turn.
        prefill: Text put at the start of the assistant turn, same fields as ``user``. If it starts with a section
            marker, that section is open when the oracle starts writing.
        stop: Stop strings. Generation ends at the first one; it is not part of the stored text.
        placeholders: Texts that mean the oracle copied the template instead of answering.
        max_new_tokens: A fixed budget for this step (short steps need few tokens); the setting stays the
            ceiling. ``None``: a step that writes an ``output`` section gets a budget that follows the length of the
            answer it rewrites (``budget_base`` + ``length_budget_ratio`` x its estimated tokens).
        budget_base: Tokens a length-following budget allows beyond the answer: the critique, the markers, a new
            instruction.
    """

    name: str
    user: str
    sections: dict[str, str]
    system: str | None = None
    prefill: str = ""
    stop: tuple[str, ...] = ()
    placeholders: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    budget_base: int = 64


@dataclass(frozen=True)
class ReflectionTemplate:
    """A named, versioned prompt template for one reflection phase."""

    name: str
    version: str
    phase: str
    steps: tuple[ReflectionStep, ...]

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"template {self.name!r}: phase must be one of {PHASES}, got {self.phase!r}")
        if not self.steps:
            raise ValueError(f"template {self.name!r} has no steps")
        produced = {f for step in self.steps for f in step.sections}
        needed = {"instruction", "output"} if self.phase == INSTRUCTION_REFLECTION else {"output"}
        if not needed <= produced:
            raise ValueError(f"template {self.name!r} ({self.phase}) must produce sections for {sorted(needed)}")

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def step_fingerprint(self, step: ReflectionStep) -> str:
        """Hash of everything in the step that shapes the oracle's output."""
        payload = json.dumps({"template": self.id, "step": asdict(step)}, sort_keys=True, default=list)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def to_dict(self) -> dict:
        return {
            "name": self.name, "version": self.version, "phase": self.phase, "steps": [asdict(s) for s in self.steps]
        }

    @classmethod
    def from_dict(cls, data: dict) -> "ReflectionTemplate":
        steps = []
        for s in data["steps"]:
            s = dict(s)
            s["stop"] = tuple(s.get("stop", ()))
            s["placeholders"] = tuple(s.get("placeholders", ()))
            steps.append(ReflectionStep(**s))
        return cls(name=data["name"], version=str(data["version"]), phase=data["phase"], steps=tuple(steps))

    @classmethod
    def from_file(cls, path: str | Path) -> "ReflectionTemplate":
        """Load a user template from a ``.json`` or ``.yaml`` file with the fields of :meth:`to_dict`."""
        text = Path(path).read_text()
        if str(path).endswith((".yaml", ".yml")):
            import yaml

            return cls.from_dict(yaml.safe_load(text))
        return cls.from_dict(json.loads(text))


_PICKY = "You are a helpful, precise but picky assistant who improves the training data of AI assistants."

PAPER_INSTRUCTION_REFLECTION = ReflectionTemplate(
    name="paper-instruction",
    version="1",
    phase=INSTRUCTION_REFLECTION,
    steps=(
        ReflectionStep(
            name="critique_and_rewrite",
            system=_PICKY,
            user=(
                "Here is an instruction and the answer an assistant gave to it.\n\n"
                "Instruction:\n{request}\n\nAnswer:\n{output}\n\n"
                "First, critique the instruction: how complex its topic is, how much detail it asks for, what "
                "knowledge it requires, how ambiguous it is, and how much logical reasoning or problem solving it "
                "involves. Then critique the answer: its helpfulness, relevance, accuracy and level of detail. "
                "Explain how the weaknesses of the instruction led to the weaknesses of the answer.\n\n"
                "Then write a new, complete instruction on a related topic that is more challenging and can be "
                "answered without seeing the original, between [New Instruction] and [End]. Finally, answer the new "
                "instruction in as much detail as you can, between [New Answer] and [End]."
            ),
            sections={"instruction": "New Instruction", "output": "New Answer"},
            placeholders=("your new instruction", "the new instruction", "your new answer", "the new answer"),
            budget_base=512,  # critique (~300 tokens at the paper's scale) and the new instruction (~80)
        ),
    ),
)

PAPER_RESPONSE_REFLECTION = ReflectionTemplate(
    name="paper-response",
    version="1",
    phase=RESPONSE_REFLECTION,
    steps=(
        ReflectionStep(
            name="critique_and_improve",
            system=_PICKY,
            user=(
                "Here is an instruction and the answer an assistant gave to it.\n\n"
                "Instruction:\n{instruction}{input_block}\n\nAnswer:\n{output}\n\n"
                "Critique the answer: its helpfulness, relevance, accuracy and level of detail. Then write a better "
                "answer that is complete, accurate and as detailed as the instruction deserves, between "
                "[Better Answer] and [End]."
            ),
            sections={"output": "Better Answer"},
            placeholders=("your better answer", "the better answer", "a better answer"),
            budget_base=384,  # the critique (~250 tokens at the paper's scale)
        ),
    ),
)

# Compact templates for small oracles (measured with SmolLM2-135M: the one-call paper format is followed in about
# 1 of 8 cases; pre-filled openers plus stop strings make the section come out every time (only an empty one does
# not parse), leaving degeneration — loops, echoes — to the quality checks in reflect_trainer.parsing).
COMPACT_INSTRUCTION_REFLECTION = ReflectionTemplate(
    name="compact-instruction",
    version="1",
    phase=INSTRUCTION_REFLECTION,
    steps=(
        # The new instruction keeps the original request and the oracle appends concrete requirements: a small
        # model asked to rewrite freely drifts off topic or copies the few-shot example.
        ReflectionStep(
            name="demand_more",
            user=(
                "Make this request more demanding: keep its topic and add concrete requirements for the answer, "
                "such as details, examples, steps or reasoning.\n\nRequest: {request}"
            ),
            prefill="[New Instruction] {request}\nIn your answer,",
            stop=("\n", "[End]"),
            sections={"instruction": "New Instruction"},
            placeholders=("add concrete requirements", "more demanding"),
            max_new_tokens=48,
        ),
        ReflectionStep(
            name="answer_new_instruction",
            user="{instruction}",
            prefill="[New Answer] ",
            stop=("[End]",),
            sections={"output": "New Answer"},
        ),
    ),
)

COMPACT_RESPONSE_REFLECTION = ReflectionTemplate(
    name="compact-response",
    # v2: no "Question:" / "Draft answer:" labels. With them SmolLM2-135M began 19 of 32 answers by copying a label
    # (accepted 19% of 16 pairs); without them 56% of the same 16 pairs were accepted.
    version="2",
    phase=RESPONSE_REFLECTION,
    steps=(
        ReflectionStep(
            name="better_answer",
            user=(
                "{instruction}{input_block}\n\nHere is a draft reply:\n\n{output}\n\n"
                "Write a better reply: more helpful, accurate and detailed than the draft."
            ),
            prefill="[Better Answer] ",
            stop=("[End]",),
            sections={"output": "Better Answer"},
            placeholders=("a better reply", "better reply", "here is a draft reply"),
        ),
    ),
)

TEMPLATE_SETS: dict[str, dict[str, ReflectionTemplate]] = {
    "paper": {INSTRUCTION_REFLECTION: PAPER_INSTRUCTION_REFLECTION, RESPONSE_REFLECTION: PAPER_RESPONSE_REFLECTION},
    "compact": {
        INSTRUCTION_REFLECTION: COMPACT_INSTRUCTION_REFLECTION,
        RESPONSE_REFLECTION: COMPACT_RESPONSE_REFLECTION,
    },
}


def all_marker_names(templates: list[ReflectionTemplate]) -> list[str]:
    names = {END_MARKER}
    for t in templates:
        for step in t.steps:
            names.update(step.sections.values())
    return sorted(names, key=len, reverse=True)


def render_fields(instruction: str, input_text: str, output: str) -> dict[str, str]:
    input_block = f"\n\n{input_text}" if input_text else ""
    return {
        "instruction": instruction,
        "input": input_text,
        "output": output,
        "input_block": input_block,
        "request": instruction + input_block,
    }


_FIELD_RE = re.compile(r"\{(\w+)\}")


def render(text: str, fields: dict[str, str]) -> str:
    """Substitute ``{name}`` fields once. Unlike ``str.format`` it leaves braces in the *data* alone."""
    return _FIELD_RE.sub(lambda m: fields.get(m.group(1), m.group(0)), text)
