"""Tokenize a recycled pair with the *student's* chat template, loss on the response only."""

from __future__ import annotations

import numpy as np
from trl.data_utils import common_prefix_length

# The paper trained with the Vicuna/FastChat template; used when the student's tokenizer has none (a base model).
VICUNA_CHAT_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    "{{ \"A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. \" }}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> None:
    if getattr(tokenizer, "chat_template", None) is None:
        tokenizer.chat_template = VICUNA_CHAT_TEMPLATE


def tokenize_conversation(tokenizer, prompt: list[dict], completion: list[dict], max_length: int | None):
    """``(input_ids, completion_start)``: the training sequence and where the loss starts.

    The same rule as TRL's prompt–completion preparation, so that training here and plain ``SFTTrainer`` on the
    exported data see identical tokens: the completion starts where the tokenized prompt (with generation prompt)
    and the tokenized prompt+completion diverge. Truncated on the right to ``max_length``.
    """
    prompt_ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
    full_ids = tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    start = common_prefix_length(prompt_ids["input_ids"], full_ids)
    if max_length is not None:
        full_ids = full_ids[:max_length]
    return np.asarray(full_ids, dtype=np.int32), min(start, len(full_ids))


def features(input_ids: np.ndarray, completion_start: int) -> dict:
    labels = input_ids.astype(np.int64).copy()
    labels[:completion_start] = -100
    return {"input_ids": input_ids.astype(np.int64), "labels": labels}
