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

GUESS_INSTRUCTION_PROMPT = (
    "Below is a response from an AI assistant. Guess the instruction that it answers.\n\nResponse:\n{response}\n\n"
    "Instruction:\n"
)


@dataclass(frozen=True)
class PairScores:
    ifd: float
    reverse_ifd: float


def mean_target_nll(model, sequences: list[tuple[list[int], list[int]]], batch_size: int = 8) -> list[float]:
    """Mean negative log-likelihood of each ``target`` given its ``context`` (token ids), batched, right-padded."""
    import torch  # here, not at the top: the recycler imports this module, and the CLI should start fast

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
        with torch.no_grad():
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


#: The four versions of a row, in the paper's names.
VERSIONS = ("original", "q", "a", "qa")
#: Bump when the scoring prompt or method changes: it is part of the cache key of every score.
SCORING_VERSION = "ifd@1"


class StudentScorer:
    """Scores ``(instruction, answer)`` pairs with the student: IFD and reverse-IFD from its forward passes.

    Args:
        model: The student (a ``transformers`` causal LM, optionally a PEFT model).
        tokenizer: Its tokenizer (its chat template frames the instruction, as in training).
        batch_size: Sequences per forward pass.
        max_length: Tokens kept per scored text.
        use_base_weights: With a PEFT student, score with the adapters disabled: the frozen pre-trained model, as
            in the paper (which scored with the student before fine-tuning), and the same scores whenever a pair
            is drawn. A fully fine-tuned student is scored as it is when the pair is first drawn.
        lockstep: The model is sharded across ranks (DeepSpeed ZeRO-3, FSDP): every forward pass is collective.
            Every rank then calls :meth:`score` at the same points (with an empty list when it has nothing to
            score), and all ranks run as many passes as the busiest one, the others on padding.
    """

    def __init__(self, model, tokenizer, batch_size: int = 8, max_length: int = 1024, use_base_weights: bool = True,
                 lockstep: bool = False):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.max_length = max_length
        self.lockstep = lockstep
        self.base_weights = use_base_weights and hasattr(model, "disable_adapter")
        self.identity = f"{student_identity(model)}:{'base' if self.base_weights else 'live'}:{max_length}"

    def score(self, pairs: list[tuple[str, str]]) -> list[PairScores]:
        from contextlib import nullcontext

        wanted = len(pairs)
        if self.lockstep:
            pairs = pairs + [_PADDING_PAIR] * (self._busiest_peer(wanted) - wanted)
        if not pairs:
            return []
        was_training = self.model.training
        self.model.eval()  # no dropout: a score must not depend on the draw
        try:
            with self.model.disable_adapter() if self.base_weights else nullcontext():
                return score_pairs(self.model, self.tokenizer, pairs, self.max_length, self.batch_size)[:wanted]
        finally:
            self.model.train(was_training)

    def _busiest_peer(self, count: int) -> int:
        import torch
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return count
        device = next(self.model.parameters()).device
        most = torch.tensor([count], device=device if device.type == "cuda" else "cpu")
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        return int(most.item())


_PADDING_PAIR = ("Say yes.", "Yes.")  # scored only to keep sharded ranks in step; the result is discarded


def student_identity(model) -> str:
    """Name, weights and numeric format of a student, for cache keys (a local folder is fingerprinted)."""
    from pathlib import Path

    from .fingerprint import weights_fingerprint

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = getattr(base.config, "name_or_path", "") or type(base).__name__
    path = Path(name)
    weights = weights_fingerprint(path) if path.is_dir() else name
    quantized = "4bit" if getattr(base, "is_loaded_in_4bit", False) else "8bit" if getattr(
        base, "is_loaded_in_8bit", False) else str(getattr(base, "dtype", ""))
    return f"{weights}:{quantized}"


def recycler_with_student(config, oracle, model, tokenizer, *, sharded: bool, max_length: int):
    """The trainer's :class:`~.recycler.Recycler`, where the student takes part: it scores the versions of each pair
    (``mode="selective"``) and, with ``oracle_engine="self"``, generates with its frozen base. ``sharded``: ZeRO-3 or
    FSDP, whose forward passes are collective (scoring runs in lockstep; the student cannot be the oracle)."""
    from .recycler import Recycler

    if config.oracle_engine == "self":
        from .oracles.self_oracle import SelfOracle

        if sharded:
            raise ValueError("oracle_engine='self' cannot generate with a sharded student (ZeRO-3/FSDP): ranks "
                             "generate out of step. Use ZeRO-2, or a separate oracle.")
        oracle = SelfOracle(model, tokenizer, batch_size=config.oracle_batch_size)
    scorer = None
    if config.mode == "selective":
        scorer = StudentScorer(model, tokenizer, batch_size=config.selection_batch_size, max_length=max_length,
                               lockstep=sharded)
    return Recycler(config, oracle=oracle, scorer=scorer)
