"""The three data formats we accept, reduced to one instruction–response pair per row, and up-front validation.

* Alpaca: ``instruction``, optional ``input``, ``output``.
* Prompt–completion: ``prompt`` and ``completion``, plain strings or conversational (lists of messages).
* Conversations: ``messages``; the last user→assistant exchange is recycled, everything before it is kept as is.

ShareGPT ``conversations`` (``from``/``value``) and pre-tokenized rows (``input_ids``) are formats of the trainer
(:mod:`.exchange`); :data:`SHAREGPT_ROLES` says which ShareGPT speaker is which chat role.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

logger = logging.getLogger(__name__)

ALPACA, PROMPT_COMPLETION, MESSAGES = "alpaca", "prompt_completion", "messages"
#: ShareGPT speakers (``from``) as chat roles. A speaker not listed (``tool``, ``function_call``, ``observation``...)
#: has no role here: a conversation whose final exchange involves one is passed through, like a ``messages`` row
#: ending in a tool turn. The row keeps its own speakers: TRL trains ShareGPT with ``from`` renamed ``role`` and the
#: values unchanged (``maybe_convert_to_chatml``), so mapping them in the row would change the tokens.
SHAREGPT_ROLES = {"human": "user", "user": "user", "system": "system",
                  "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant",
                  "model": "assistant"}


class BadRowError(ValueError):
    """A row that cannot be recycled; the message names the row, the field and what to do.

    ``reason`` is a short tag (``missing``, ``not_string``, ``empty``, ``too_long``, ``encoding``, ``shape``) used to
    count skips; ``unknown_format`` when the data set as a whole has no format we know.
    """

    def __init__(self, message: str, reason: str = "shape"):
        super().__init__(message)
        self.reason = reason


@dataclass
class Pair:
    """One instruction–response pair, plus the conversation around it that recycling leaves alone."""

    instruction: str
    input: str
    output: str
    history: list[dict[str, str]] = field(default_factory=list)  # messages before the recycled user turn


def detect_format(columns: Iterable[str]) -> str:
    columns = set(columns)
    if "messages" in columns:
        return MESSAGES
    if "prompt" in columns or "completion" in columns:
        missing = {"prompt", "completion"} - columns
        if missing:
            raise BadRowError(f"data set has a prompt/completion format but no {sorted(missing)} column")
        return PROMPT_COMPLETION
    if "instruction" in columns or "output" in columns:
        missing = {"instruction", "output"} - columns
        if missing:
            raise BadRowError(f"data set has Alpaca columns but no {sorted(missing)} column")
        return ALPACA
    raise BadRowError(
        f"data set has columns {sorted(columns)}; expected Alpaca (instruction, input, output), "
        "prompt/completion, or messages",
        "unknown_format",
    )


def _text(row_index: int, name: str, value: Any, max_chars: int, allow_empty: bool = False) -> str:
    where = f"row {row_index}, field {name!r}"
    if value is None:
        raise BadRowError(f"{where} is missing (None); fill it or drop the row, or set on_bad_row='skip'", "missing")
    if not isinstance(value, str):
        raise BadRowError(
            f"{where} is a {type(value).__name__}, not a string; set on_bad_row='skip' to drop it", "not_string"
        )
    if not allow_empty and not value.strip():
        raise BadRowError(f"{where} is empty; fill it or drop the row, or set on_bad_row='skip'", "empty")
    if len(value) > max_chars:
        raise BadRowError(
            f"{where} has {len(value):,} characters, over max_field_chars={max_chars:,}; "
            "raise the limit or set on_bad_row='skip'",
            "too_long",
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:  # a lone surrogate (e.g. "\ud800" in JSON): no tokenizer or server takes it
        raise BadRowError(
            f"{where} is not valid Unicode (lone surrogate at character {err.start}); fix the text's encoding or set "
            "on_bad_row='skip'",
            "encoding",
        ) from None
    return value


def _history(row_index: int, name: str, messages: list[dict], max_chars: int) -> list[dict]:
    """Messages kept as they are around the recycled turn: each must be a role and a string (chat templates and
    tokenisation fail mid-run on ``None`` or a list of content parts)."""
    for j, message in enumerate(messages):
        if not isinstance(message.get("role"), str):
            raise BadRowError(f"row {row_index}, field '{name}[{j}].role' must be a string; fix it or set "
                              "on_bad_row='skip'")
        _text(row_index, f"{name}[{j}].content", message.get("content"), max_chars, allow_empty=True)
    return [dict(m) for m in messages]


def _messages(row_index: int, name: str, value: Any) -> list[dict]:
    if not isinstance(value, list) or not all(isinstance(m, dict) and "role" in m for m in value):
        raise BadRowError(f"row {row_index}, field {name!r} must be a list of {{role, content}} messages")
    return value


def alpaca_pair(row: dict[str, Any], label: Any, max_chars: int) -> Pair:
    """An Alpaca row (``instruction``, optional ``input``, ``output``) as a :class:`Pair`, checked field by field."""
    return Pair(
        instruction=_text(label, "instruction", row.get("instruction"), max_chars),
        input=_text(label, "input", row.get("input") if row.get("input") is not None else "", max_chars, True),
        output=_text(label, "output", row.get("output"), max_chars),
    )


def row_to_pair(row: dict[str, Any], fmt: str, row_index: int, max_chars: int) -> Pair:
    """Turn one row into a :class:`Pair`, or raise :class:`BadRowError` naming the row and the field."""
    if fmt == ALPACA:
        return alpaca_pair(row, row_index, max_chars)
    if fmt == PROMPT_COMPLETION:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, list) or isinstance(completion, list):
            prompt = _messages(row_index, "prompt", prompt)
            completion = _messages(row_index, "completion", completion)
            if not prompt or prompt[-1]["role"] != "user":
                raise BadRowError(f"row {row_index}, field 'prompt' must end with a user message")
            if len(completion) != 1 or completion[0]["role"] != "assistant":
                raise BadRowError(f"row {row_index}, field 'completion' must be exactly one assistant message")
            return Pair(
                instruction=_text(row_index, "prompt[-1].content", prompt[-1].get("content"), max_chars),
                input="",
                output=_text(row_index, "completion[0].content", completion[0].get("content"), max_chars),
                history=_history(row_index, "prompt", prompt[:-1], max_chars),
            )
        return Pair(
            instruction=_text(row_index, "prompt", prompt, max_chars),
            input="",
            output=_text(row_index, "completion", completion, max_chars),
        )
    messages = _messages(row_index, "messages", row.get("messages"))
    if len(messages) < 2 or messages[-1]["role"] != "assistant" or messages[-2]["role"] != "user":
        raise BadRowError(f"row {row_index}, field 'messages' must end with a user message and an assistant reply")
    return Pair(
        instruction=_text(row_index, "messages[-2].content", messages[-2].get("content"), max_chars),
        input="",
        output=_text(row_index, "messages[-1].content", messages[-1].get("content"), max_chars),
        history=_history(row_index, "messages", messages[:-2], max_chars),
    )


def pair_to_messages(pair: Pair) -> list[dict[str, str]]:
    """The pair as a conversation (history, then the user turn, then the assistant turn)."""
    user = pair.instruction + (f"\n\n{pair.input}" if pair.input else "")
    return [*pair.history, {"role": "user", "content": user}, {"role": "assistant", "content": pair.output}]


@dataclass
class ValidationReport:
    """Result of :func:`validate_rows`: which rows are usable and why the others were skipped."""

    fmt: str
    valid_indices: list[int]
    skipped: dict[int, BadRowError]

    @property
    def skip_counts(self) -> dict[str, int]:
        return dict(Counter(err.reason for err in self.skipped.values()))


def validate_rows(dataset, on_bad_row: str = "error", max_field_chars: int = 20_000) -> ValidationReport:
    """Check every row of a map-style data set before any oracle or training work.

    ``on_bad_row="error"`` raises :class:`BadRowError` at the first bad row; ``"skip"`` logs each bad row and
    returns the indices of the good ones.
    """
    if on_bad_row not in ("error", "skip"):
        raise ValueError(f"on_bad_row must be 'error' or 'skip', got {on_bad_row!r}")
    fmt = detect_format(dataset.column_names)
    valid, skipped = [], {}
    for i, row in enumerate(dataset):
        try:
            row_to_pair(row, fmt, i, max_field_chars)
            valid.append(i)
        except BadRowError as err:
            if on_bad_row == "error":
                raise
            skipped[i] = err
            logger.warning("skipping bad row: %s", err)
    if skipped:
        logger.warning("skipped %d of %d rows as bad input", len(skipped), len(dataset))
    return ValidationReport(fmt=fmt, valid_indices=valid, skipped=skipped)
