"""Reasoning oracles: the one rule for the thinking a model writes before its answer.

Qwen3, DeepSeek-R1 distills and similar models open their turn with ``<think>…</think>`` before they answer. The
thinking is not part of the rewrite: it must not reach the parsed fields or the gates (it is full of marker-like text,
drafts and half sentences). Like parsing, the rule runs when a cached raw text is *read*, whatever engine wrote it:
the cache keeps the oracle's text with its thinking, so a change here needs no regeneration.

Two ways a template opens the block: the model writes the opening tag itself, or the chat template already put it at
the end of the prompt (DeepSeek-R1's, Qwen3's thinking templates), so the generated text holds only the closing tag.
Both are recognised; nothing after the first closing tag is touched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

#: The tag pair Qwen3, DeepSeek-R1 and their distills write (``ReflectionConfig.oracle_thinking_tags``).
DEFAULT_THINKING_TAGS = ("<think>", "</think>")
#: Fallback reason: the output ends inside the thinking and the budget ran out, so the answer never started.
THINKING_TRUNCATED = "thinking_truncated"


@dataclass(frozen=True)
class Thought:
    """A generated text split at its thinking.

    Args:
        answer: What the oracle wrote after the thinking (the whole text when it did not think).
        thinking: The thinking without its tags (``""``: none).
        closed: False when the text ends inside the thinking: the answer never started.
    """

    answer: str
    thinking: str = ""
    closed: bool = True


def split_thinking(generated: str, tags: tuple[str, str] | list[str] | None = DEFAULT_THINKING_TAGS) -> Thought:
    """Split a leading thinking block off ``generated``; ``tags=None`` (or empty) leaves the text as it is.

    A block is leading when the text starts (after blanks) with the opening tag, or when a closing tag comes before
    any opening tag (the template opened the block in the prompt). An opening tag that is never closed runs to the
    end of the text: all of it is thinking, and there is no answer.
    """
    if not tags:
        return Thought(generated)
    opener, closer = tags
    body = generated.lstrip()
    if body.startswith(opener):
        body = body[len(opener):]
    else:
        close_at = generated.find(closer)
        if close_at < 0 or opener in generated[:close_at]:
            return Thought(generated)
        body = generated  # opened by the prompt: everything up to the closing tag is thinking
    close_at = body.find(closer)
    if close_at < 0:
        return Thought("", body, closed=False)
    return Thought(body[close_at + len(closer):].lstrip(), body[:close_at])


def chat_template_kwargs(value: dict | str | None) -> dict | None:
    """``ReflectionConfig.oracle_chat_template_kwargs`` as a dict (a JSON string from the command line is parsed);
    ``None`` when unset or empty, so the cache key stays what it was without it."""
    if isinstance(value, str):
        try:
            value = json.loads(value) if value.strip() else None
        except ValueError as err:
            raise ValueError(f"oracle_chat_template_kwargs must be a JSON object such as "
                             f'\'{{"enable_thinking": false}}\', got {value!r}: {err}') from None
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"oracle_chat_template_kwargs must be a mapping such as {{'enable_thinking': False}}, "
                         f"got {value!r}")
    return dict(value) if value else None


def join_thinking(thinking: str, answer: str, closed: bool = True) -> str:
    """The raw text of a server that returns the thinking apart (``reasoning_content``, vLLM's ``reasoning``): the
    thinking in the default tags, then the answer, as a local engine would have written it, so the cache keeps it
    and :func:`split_thinking` reads it. ``closed=False``: the budget ran out inside the thinking."""
    opener, closer = DEFAULT_THINKING_TAGS
    return f"{opener}{thinking}{closer}{answer}" if closed else f"{opener}{thinking}"
