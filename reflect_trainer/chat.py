"""The paper's Vicuna chat template, for base models without one (the CLI, evaluation, and Alpaca rows, which
SFTTrainer has no format for). Tokenization and loss masks are TRL's own (see ``trainer.py``)."""

from __future__ import annotations

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
