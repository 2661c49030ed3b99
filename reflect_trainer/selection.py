"""Selective Reflection-Tuning (Li et al., 2024): the *student* scores each version of a pair and picks one.

* IFD(Q, A) = PPL(A | Q) / PPL(A): how much the instruction helps predict the answer (higher: harder instruction).
* Reverse-IFD = PPL(Q | A) / PPL(Q), with Q scored after a prompt that asks to guess the instruction from the
  response (lower: the answer fits the instruction).

Both are forward passes of the model being trained, no extra model. Versions of a row: ``original``, ``q``
(instruction-reflected), ``a`` (response-reflected original) and ``qa`` (response-reflected ``q``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

GUESS_INSTRUCTION_PROMPT = (
    "Below is a response from an AI assistant. Guess the instruction that it answers.\n\nResponse:\n{response}\n\n"
    "Instruction:\n"
)


@dataclass(frozen=True)
class PairScores:
    ifd: float
    reverse_ifd: float


@torch.no_grad()
def mean_target_nll(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Mean negative log-likelihood of each ``target`` given its ``context`` (token ids), batched, right-padded."""
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(c) + len(t) for c, t in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        labels = torch.full((len(chunk), width), -100, dtype=torch.long)
        for row, (context, target) in enumerate(chunk):
            full = context + target
            ids[row, : len(full)] = torch.tensor(full)
            mask[row, : len(full)] = 1
            labels[row, len(context) : len(full)] = torch.tensor(target)
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        shift_logits, shift_labels = logits[:, :-1], labels[:, 1:].to(device)
        nll = torch.nn.functional.cross_entropy(shift_logits.transpose(1, 2), shift_labels, reduction="none",
                                                ignore_index=-100)
        counts = (shift_labels != -100).sum(dim=1).clamp(min=1)
        out.extend((nll.sum(dim=1) / counts).tolist())
    return out


def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], max_length: int = 1024,
                batch_size: int = 8) -> list[PairScores]:
    """IFD and reverse-IFD of ``(instruction, answer)`` pairs under ``model`` (perplexity = exp(mean NLL))."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []

    def enc(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    sequences = []
    for instruction, answer in pairs:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": instruction}], tokenize=False,
                                               add_generation_prompt=True)
        a, q = enc(answer)[:max_length], enc(instruction)[:max_length]
        guess = enc(GUESS_INSTRUCTION_PROMPT.format(response=answer))[:max_length]
        # A needs at least one context token to be scored from its first token on: BOS, or else the prompt's
        # first token is dropped from the target instead.
        sequences += [(enc(prompt)[-max_length:], a), (bos, a) if bos else (a[:1], a[1:]),
                      (guess, q), (bos, q) if bos else (q[:1], q[1:])]
    nll = mean_target_nll(model, sequences, batch_size)
    return [
        PairScores(ifd=math.exp(nll[i] - nll[i + 1]), reverse_ifd=math.exp(nll[i + 2] - nll[i + 3]))
        for i in range(0, len(nll), 4)
    ]


def select_version(scores: dict[str, PairScores], threshold: float = 1.0, drop_instead: bool = False) -> str | None:
    """The paper's rule. ``scores`` has ``original``, ``q``, ``a`` and ``qa``.

    If the reflected instruction is harder (IFD(q) > IFD(original)), keep ``qa`` when its reverse-IFD is below
    ``q``'s and both its scores are below ``threshold``. Otherwise keep ``a`` when its reverse-IFD is below the
    original's and both its scores are below ``threshold``. Otherwise keep ``original`` — or ``None`` (drop the row)
    with ``drop_instead``, as the released code does.
    """
    original, q, a, qa = scores["original"], scores["q"], scores["a"], scores["qa"]
    if q.ifd > original.ifd:
        if qa.reverse_ifd < q.reverse_ifd and qa.reverse_ifd < threshold and qa.ifd < threshold:
            return "qa"
    elif a.reverse_ifd < original.reverse_ifd and a.reverse_ifd < threshold and a.ifd < threshold:
        return "a"
    return None if drop_instead else "original"
