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

from .formats import (ALPACA, CONVERSATIONS, MESSAGES, PROMPT_COMPLETION, SHAREGPT_ROLES,  # noqa: F401
                      TEXT, TOKENIZED, BadRowError, Pair, _final_exchange, row_format)
from .formats import row_to_pair as exchange  # noqa: F401  (the one row codec, under the trainer's old name)
from .text import request_text


def training_format(columns, dataset_text_field: str = "text", formatting_func=None) -> str:
    """The format the trainer reflects (see :func:`reflect_trainer.formats.row_format`): Alpaca, prompt–completion,
    messages, ShareGPT conversations, or ``tokenized``/``text`` (passed through)."""
    return row_format(columns, dataset_text_field, formatting_func)


def alpaca_conversation(instruction: str, input_: str, output: str) -> dict[str, list[dict]]:
    """The conversational ``prompt``/``completion`` an Alpaca row trains as (no ``formatting_func``)."""
    user = request_text(instruction, input_)
    return {"prompt": [{"role": "user", "content": user}], "completion": [{"role": "assistant", "content": output}]}


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
    request = request_text(instruction, input_)
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
