"""Which exchange of a training row is reflected, and how the reflected texts go back into the row.

``ReflectionSFTTrainer`` hands TRL rows in the user's own format, so that TRL's data preparation (chat template,
loss masks, truncation, ``formatting_func``, ``dataset_text_field``, tools) decides what is trained on, exactly as in
``SFTTrainer``. This module only takes one instruction–response exchange out of a row (:func:`exchange`) and puts the
recycled version back (:func:`with_recycled`), touching nothing else: every other turn, the system prompt, ``tools``,
``chat_template_kwargs``, a final ``tool_calls`` and any extra column stay as they were.

What is reflected, per format:

* ``messages`` (single- or multi-turn): the final exchange, i.e. the last message (an assistant reply with text) and
  the user message right before it. Earlier turns are history: later turns were written against them, so rewriting
  them would make the conversation incoherent; they are kept verbatim (and trained on as TRL decides, e.g. with
  ``assistant_only_loss``). A conversation that does not end user → assistant-with-text (it ends in a tool result, a
  tool call without text, or multimodal content) is passed through untouched and counted.
* ShareGPT ``conversations`` (``from``/``value``): as ``messages``, with the speakers read through
  :data:`.formats.SHAREGPT_ROLES` (``human`` is the user, ``gpt`` the assistant...). The recycled texts go back into
  ``value``; ``from`` and every other key stay, so TRL converts the row to ChatML itself (``maybe_convert_to_chatml``)
  exactly as for the original. A final exchange with another speaker (``tool``, ``observation``...) is passed through.
* ``prompt``/``completion`` as conversations: the last user message of the prompt and the (single) assistant message
  of the completion; other shapes are passed through, counted.
* ``prompt``/``completion`` as plain strings: the prompt is the instruction, the completion the response; TRL then
  trains on raw text + EOS as it always does. The completion keeps its original leading whitespace.
* Alpaca (``instruction``, ``input``, ``output``): SFTTrainer has no such format. Without a ``formatting_func`` the
  trainer adds conversational ``prompt``/``completion`` columns (user: instruction, a blank line, input; assistant:
  output); with one, the function reads the recycled Alpaca columns.
* Pre-tokenized rows (``input_ids``, with or without ``labels``, ``assistant_masks``, ``completion_mask``): TRL skips
  its text preparation for them (whatever other columns they have), so there is no text to reflect; passed through.
* ``text`` (``dataset_text_field``) and any other shape TRL accepts: no instruction/response split to reflect; the
  row is passed through untouched and counted (``rows_passed_through``).
"""

from __future__ import annotations

from typing import Any

from .formats import (ALPACA, MESSAGES, PROMPT_COMPLETION, SHAREGPT_ROLES, BadRowError, Pair, _text, alpaca_pair,
                      detect_format)

TEXT = "text"  # no instruction/response split: rows pass through
TOKENIZED = "tokenized"  # ``input_ids`` given: TRL trains them as they are, rows pass through
CONVERSATIONS = "conversations"  # ShareGPT: ``conversations`` of ``{from, value}``


def training_format(columns, dataset_text_field: str = "text", formatting_func=None) -> str:
    """The format the trainer reflects: Alpaca, prompt–completion, messages, ShareGPT conversations, or
    ``tokenized``/``text`` (passed through).

    A data set that is none of these and has no ``dataset_text_field`` column and no ``formatting_func`` is
    something SFTTrainer cannot train on either: the :class:`BadRowError` says what is expected.
    """
    columns = set(columns)
    if "input_ids" in columns:  # SFTTrainer's test too: with input_ids it ignores every text column
        return TOKENIZED
    try:
        return detect_format(columns)
    except BadRowError as err:
        if "conversations" in columns:
            return CONVERSATIONS
        if dataset_text_field in columns or formatting_func is not None:
            return TEXT
        if err.reason != "unknown_format":
            raise  # a format with a column missing: the message names it
        raise BadRowError(
            f"data set has columns {sorted(columns)}; expected Alpaca (instruction, input, output), prompt/completion, "
            f"messages, ShareGPT conversations, pre-tokenized input_ids, or text in a {dataset_text_field!r} column "
            "(dataset_text_field) or through a formatting_func", "unknown_format") from None


def alpaca_conversation(instruction: str, input_: str, output: str) -> dict[str, list[dict]]:
    """The conversational ``prompt``/``completion`` an Alpaca row trains as (no ``formatting_func``)."""
    user = instruction + (f"\n\n{input_}" if input_ else "")
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": output}]}


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


def exchange(row: dict[str, Any], fmt: str, label: Any, max_chars: int) -> Pair | None:
    """The exchange of ``row`` to reflect, or ``None`` when the row has none (it is passed through untouched).

    Raises :class:`BadRowError`, naming the row and the field, when the exchange exists but a text in it is empty,
    not a string or too long.
    """
    if fmt == ALPACA:
        return alpaca_pair(row, label, max_chars)
    if fmt == PROMPT_COMPLETION:
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) or isinstance(completion, str):
            return Pair(instruction=_text(label, "prompt", prompt, max_chars), input="",
                        output=_text(label, "completion", completion, max_chars))
        if not (isinstance(prompt, list) and prompt and _is_text_message(prompt[-1], "user")):
            return None
        if not (isinstance(completion, list) and len(completion) == 1 and _is_text_message(completion[0], "assistant")):
            return None
        return Pair(instruction=_text(label, "prompt[-1].content", prompt[-1]["content"], max_chars), input="",
                    output=_text(label, "completion[0].content", completion[0]["content"], max_chars))
    if fmt in (MESSAGES, CONVERSATIONS):
        column, text = ("messages", "content") if fmt == MESSAGES else ("conversations", "value")
        messages = row.get(column)
        where = _final_exchange(messages, sharegpt=fmt == CONVERSATIONS)
        if where is None:
            return None
        user, assistant = where
        return Pair(instruction=_text(label, f"{column}[{user}].{text}", messages[user][text], max_chars), input="",
                    output=_text(label, f"{column}[{assistant}].{text}", messages[assistant][text], max_chars))
    return None


def _with_content(message: dict, content: str, key: str = "content") -> dict:
    return {**message, key: content}


def _keep_leading_space(original: str, new: str) -> str:
    """Raw-text completions often start with the space that separates them from the prompt: keep it."""
    if new == original:
        return new
    return original[: len(original) - len(original.lstrip())] + new.lstrip()


def with_recycled(row: dict[str, Any], fmt: str, instruction: str, input_: str, output: str,
                  alpaca_as_conversation: bool) -> dict[str, Any]:
    """``row`` with its exchange replaced by the recycled texts; every other key, turn and field unchanged.

    The recycled instruction is self-contained (an ``input``, if any, is merged into it by the oracle), so formats
    without an input field get ``instruction`` + a blank line + ``input``, as the oracle saw it.
    """
    request = instruction + (f"\n\n{input_}" if input_ else "")
    out = dict(row)
    if fmt == ALPACA:
        out.update(instruction=instruction, input=input_, output=output)
        if alpaca_as_conversation:
            out.update(alpaca_conversation(instruction, input_, output))
    elif fmt == PROMPT_COMPLETION:
        if isinstance(row["prompt"], str):
            out["prompt"] = request
            out["completion"] = _keep_leading_space(row["completion"], output)
        else:
            out["prompt"] = [*row["prompt"][:-1], _with_content(row["prompt"][-1], request)]
            out["completion"] = [_with_content(row["completion"][0], output)]
    elif fmt == MESSAGES:
        user, assistant = _final_exchange(row["messages"])
        messages = list(row["messages"])
        messages[user] = _with_content(messages[user], request)
        messages[assistant] = _with_content(messages[assistant], output)
        out["messages"] = messages
    elif fmt == CONVERSATIONS:
        user, assistant = _final_exchange(row["conversations"], sharegpt=True)
        messages = list(row["conversations"])
        messages[user] = _with_content(messages[user], request, "value")
        messages[assistant] = _with_content(messages[assistant], output, "value")
        out["conversations"] = messages
    return out
