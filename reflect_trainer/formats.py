"""The data formats we accept, one codec for all of them: a row becomes the instruction–response pair to recycle
(:func:`row_to_pair`), or ``None`` when it has none and is passed through untouched. The trainer and the offline CLI
(through :class:`~reflect_trainer.recycler.Recycler`) call the same function, so a row means the same to both.

* Alpaca: ``instruction``, optional ``input``, ``output``.
* Prompt–completion: ``prompt`` and ``completion``, plain strings or conversational (lists of messages).
* Conversations: ``messages``; the final user→assistant exchange is recycled, everything before it is kept as is.
* ShareGPT ``conversations`` (``from``/``value``): as ``messages``, speakers read through :data:`SHAREGPT_ROLES`.
* Pre-tokenized rows (``input_ids``): no text to reflect; passed through.

How the recycled pair goes back into a row is :func:`reflect_trainer.exchange.with_recycled`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

from .text import request_text

logger = logging.getLogger(__name__)

ALPACA, PROMPT_COMPLETION, MESSAGES = "alpaca", "prompt_completion", "messages"
CONVERSATIONS = "conversations"  # ShareGPT: ``conversations`` of ``{from, value}``
TOKENIZED = "tokenized"  # ``input_ids`` given: TRL trains them as they are, rows pass through
TEXT = "text"  # the trainer's ``dataset_text_field`` or ``formatting_func``: no instruction/response split
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


def alpaca_pair(row: dict[str, Any], label: Any, max_chars: int) -> Pair:
    """An Alpaca row (``instruction``, optional ``input``, ``output``) as a :class:`Pair`, checked field by field."""
    return Pair(
        instruction=_text(label, "instruction", row.get("instruction"), max_chars),
        input=_text(label, "input", row.get("input") if row.get("input") is not None else "", max_chars, True),
        output=_text(label, "output", row.get("output"), max_chars),
    )


def row_format(columns: Iterable[str], dataset_text_field: str | None = None, formatting_func=None) -> str:
    """The format of a data set with these columns, for the trainer and the offline recycler alike.

    Pre-tokenized (``input_ids``, SFTTrainer's own test: with them it ignores every text column) first, then Alpaca,
    prompt–completion, messages (:func:`detect_format`), ShareGPT ``conversations``, and, for the trainer only,
    ``text`` (a ``dataset_text_field`` column or a ``formatting_func``). Anything else raises :class:`BadRowError`
    saying what is expected.
    """
    columns = set(columns)
    if "input_ids" in columns:
        return TOKENIZED
    try:
        return detect_format(columns)
    except BadRowError as err:
        if "conversations" in columns:
            return CONVERSATIONS
        if (dataset_text_field is not None and dataset_text_field in columns) or formatting_func is not None:
            return TEXT
        if err.reason != "unknown_format":
            raise  # a format with a column missing: the message names it
        text = (f", or text in a {dataset_text_field!r} column (dataset_text_field) or through a formatting_func"
                if dataset_text_field is not None else "")
        raise BadRowError(
            f"data set has columns {sorted(columns)}; expected Alpaca (instruction, input, output), prompt/completion, "
            f"messages, ShareGPT conversations, or pre-tokenized input_ids{text}", "unknown_format") from None


def _is_text_message(message: Any, role: str) -> bool:
    return isinstance(message, dict) and message.get("role") == role and isinstance(message.get("content"), str)


def _is_sharegpt_message(message: Any, role: str) -> bool:
    return (isinstance(message, dict) and SHAREGPT_ROLES.get(message.get("from")) == role
            and isinstance(message.get("value"), str))


def _final_exchange(messages: Any, sharegpt: bool = False) -> tuple[int, int] | None:
    """Positions ``(user, assistant)`` of a conversation's final exchange, or ``None`` if it has none."""
    if not isinstance(messages, list) or len(messages) < 2:
        return None
    is_message = _is_sharegpt_message if sharegpt else _is_text_message
    if not (is_message(messages[-2], "user") and is_message(messages[-1], "assistant")):
        return None
    return len(messages) - 2, len(messages) - 1


def sharegpt_as_chat(message: dict) -> dict:
    """A ShareGPT turn as a chat message (``human`` → ``user``; a speaker without a role keeps its name)."""
    return {"role": SHAREGPT_ROLES.get(message.get("from"), message.get("from")), "content": message.get("value")}


def _history(row_index: Any, name: str, messages: list, max_chars: int, sharegpt: bool = False) -> list[dict]:
    """Turns kept as they are before the recycled exchange: each must have a speaker and a string (chat templates and
    tokenisation fail mid-run on ``None`` or a list of content parts), so a bad one is a :class:`BadRowError` naming
    the row and the turn, for the trainer and the offline recycler alike. ShareGPT turns come back as chat messages."""
    speaker, text = ("from", "value") if sharegpt else ("role", "content")
    for j, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get(speaker), str):
            raise BadRowError(f"row {row_index}, field '{name}[{j}].{speaker}' must be a string; fix it or set "
                              "on_bad_row='skip'", "not_string")
        _text(row_index, f"{name}[{j}].{text}", message.get(text), max_chars, allow_empty=True)
    return [sharegpt_as_chat(m) if sharegpt else dict(m) for m in messages]


def row_to_pair(row: dict[str, Any], fmt: str, row_index: Any, max_chars: int) -> Pair | None:
    """The one row codec: the pair of ``row`` to recycle, or ``None`` when the row has none.

    ``None`` (the row is passed through untouched and counted, by the trainer and the offline recycler alike): a
    pre-tokenized or ``text`` row; a conversation (``messages``, ShareGPT ``conversations``, a conversational
    ``prompt``/``completion``) that does not end user → assistant with text, e.g. one ending with a user turn, a tool
    result or multimodal content. Raises :class:`BadRowError`, naming the row and the field, when the exchange exists
    but a text in it is missing, empty, not a string, too long or not valid Unicode. Earlier turns are kept as they
    are (``Pair.history``; ShareGPT turns as chat messages): recycling does not touch them.
    """
    if fmt == ALPACA:
        return alpaca_pair(row, row_index, max_chars)
    if fmt == PROMPT_COMPLETION:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) or isinstance(completion, str):
            return Pair(instruction=_text(row_index, "prompt", prompt, max_chars), input="",
                        output=_text(row_index, "completion", completion, max_chars))
        if not (isinstance(prompt, list) and prompt and _is_text_message(prompt[-1], "user")):
            return None
        if not (isinstance(completion, list) and len(completion) == 1 and _is_text_message(completion[0], "assistant")):
            return None
        return Pair(instruction=_text(row_index, "prompt[-1].content", prompt[-1]["content"], max_chars), input="",
                    output=_text(row_index, "completion[0].content", completion[0]["content"], max_chars),
                    history=_history(row_index, "prompt", prompt[:-1], max_chars))
    if fmt in (MESSAGES, CONVERSATIONS):
        column, text = ("messages", "content") if fmt == MESSAGES else ("conversations", "value")
        messages = row.get(column)
        where = _final_exchange(messages, sharegpt=fmt == CONVERSATIONS)
        if where is None:
            return None
        user, assistant = where
        history = _history(row_index, column, messages[:user], max_chars, sharegpt=fmt == CONVERSATIONS)
        return Pair(instruction=_text(row_index, f"{column}[{user}].{text}", messages[user][text], max_chars),
                    input="", output=_text(row_index, f"{column}[{assistant}].{text}", messages[assistant][text],
                                           max_chars), history=history)
    return None  # TOKENIZED, TEXT


def read_row(row: dict[str, Any], fmt: str, label: Any, max_chars: int, on_bad_row: str) -> Pair | BadRowError | None:
    """:func:`row_to_pair` under the ``on_bad_row`` policy: ``"error"`` raises the :class:`BadRowError`, ``"skip"``
    logs it and returns it (the caller counts it and leaves the row out)."""
    try:
        return row_to_pair(row, fmt, label, max_chars)
    except BadRowError as err:
        if on_bad_row == "error":
            raise
        logger.warning("skipping bad row: %s", err)
        return err


def pair_to_messages(pair: Pair) -> list[dict[str, str]]:
    """The pair as a conversation (history, then the user turn, then the assistant turn)."""
    user = request_text(pair.instruction, pair.input)
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
    fmt = row_format(dataset.column_names)
    valid, skipped = [], {}
    for i, row in enumerate(dataset):
        pair = read_row(row, fmt, i, max_field_chars, on_bad_row)
        if isinstance(pair, BadRowError):
            skipped[i] = pair
        else:
            valid.append(i)  # a pair to recycle, or a row passed through untouched
    if skipped:
        logger.warning("skipped %d of %d rows as bad input", len(skipped), len(dataset))
    return ValidationReport(fmt=fmt, valid_indices=valid, skipped=skipped)
