"""Projection to the paper's scale: 52,002 Alpaca pairs, a 7B student, a 13B 4-bit oracle, `both` mode, 3 epochs.

What is measured here: the token overhead of our `paper` templates (system + user turn + chat template, fields
empty), with the embedded SmolLM2 tokenizer (a 49k BPE vocabulary, close to Llama-2's 32k for English prose: a few
percent fewer tokens). What is measured elsewhere and used as a structural fact: B2 and B3 show the trainer adds
nothing over plain SFTTrainer once pairs are cached, and that recycling and training run one after the other when
they share a device (a colocated oracle sleeps while the student trains), so wall time = recycling + training.
Everything else is an assumption, stated in ASSUMED below with its derivation; change a line and rerun. No GPU was
available to measure per-token costs on one: the GPU rates are roofline estimates with stated efficiencies.

    .venv/bin/python benchmarks/projection.py
"""

from __future__ import annotations

from _common import machine
from transformers import AutoTokenizer

from reflect_trainer.embedded import default_oracle_path
from reflect_trainer.templates import PAPER_INSTRUCTION_REFLECTION, PAPER_RESPONSE_REFLECTION, render, render_fields

PAIRS = 52_002
EPOCHS = 3
STUDENT_PARAMS = 6.7e9
ORACLE_PARAMS = 13.0e9

ASSUMED = {
    # Alpaca (Taori et al. 2023): short instructions, ~45-word answers.
    "alpaca_request_tokens": 25,
    "alpaca_output_tokens": 65,
    # What the oracle writes, per pair. Instruction reflection: critique, new instruction, detailed answer.
    # Response reflection of the new pair: critique, better answer. (The paper's recycled answers are several times
    # Alpaca's; its trained models answer with 1.35-1.58k tokens.)
    "ir_critique": 300, "new_instruction": 80, "new_answer": 550,
    "rr_critique": 250, "better_answer": 600,
    # Training sequence of a recycled pair: new instruction + better answer + Vicuna template.
    "train_template_tokens": 40,
}

# Decode rates (generated tokens/s, whole machine) and prefill/training efficiencies, derived in the comments.
SETUPS = {
    "1x RTX 4090 24 GB, transformers+bnb NF4 oracle (batch 4), QLoRA student": {
        # bnb dequantizes every NF4 weight to fp16 at each decode step when batch > 1: read 6.9 GB + write/read
        # 26 GB fp16 at ~1 TB/s ~ 33 ms, plus ~12 ms of Python and kernel launches for 40 layers: ~45 ms a step.
        # Batch 4 is the most the 24 GB budget allows (README, QLoRA memory budget).
        "decode_tok_s": 4 / 0.045, "gpus": 1, "peak_flops": 165e12, "prefill_mfu": 0.30,
        # QLoRA: forward + backward + recompute (gradient checkpointing) = 8 N per token; NF4 dequant in every
        # matmul keeps utilisation low.
        "train_flops_per_token": 8 * STUDENT_PARAMS, "train_mfu": 0.25,
    },
    "1x RTX 4090 24 GB, vLLM AWQ 4-bit oracle colocated (sleep level 1), QLoRA student": {
        # gpu_memory_utilization 0.6 next to the QLoRA student: 14.4 GB - 6.9 GB weights = ~7 GB of KV cache, at
        # 0.8 MB per token (Llama-2-13B, no GQA) ~9k tokens: ~6 sequences of 1.5k. A step reads the weights at 70%
        # of 1 TB/s (10 ms) plus ~4.8 GB of KV (5 ms): 15 ms for 6 tokens.
        "decode_tok_s": 6 / 0.015, "gpus": 1, "peak_flops": 165e12, "prefill_mfu": 0.50,
        "train_flops_per_token": 8 * STUDENT_PARAMS, "train_mfu": 0.25,
    },
    "8x A100 80 GB, vLLM AWQ 4-bit oracle colocated per GPU, ZeRO-3 full fine-tuning": {
        # gpu_memory_utilization 0.5 next to the ZeRO-3 shard (16 B/param / 8 = 14 GB + activations): 40 GB - 6.9
        # GB = 33 GB of KV, ~41k tokens: ~27 sequences. A step: weights 3.5 ms at 70% of 2 TB/s -> 5 ms, plus
        # 27 x 1k x 0.8 MB = 22 GB of KV at 2 TB/s = 11 ms: 16 ms for 27 tokens, per GPU.
        "decode_tok_s": 8 * 27 / 0.016, "gpus": 8, "peak_flops": 312e12, "prefill_mfu": 0.50,
        # Full fine-tuning, gradient checkpointing: 8 N per token at 40% of bf16 peak (ZeRO-3 communication).
        "train_flops_per_token": 8 * STUDENT_PARAMS, "train_mfu": 0.40,
    },
}


def template_overhead(tokenizer, template) -> int:
    step = template.steps[0]
    fields = render_fields("", "", "")
    messages = [{"role": "system", "content": step.system}, {"role": "user", "content": render(step.user, fields)}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def hours(seconds: float) -> str:
    return f"{seconds / 3600:7.1f} h" if seconds < 72 * 3600 else f"{seconds / 86400:7.1f} d"


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(default_oracle_path()))
    ir_overhead = template_overhead(tokenizer, PAPER_INSTRUCTION_REFLECTION)
    rr_overhead = template_overhead(tokenizer, PAPER_RESPONSE_REFLECTION)
    a = ASSUMED
    prompt = (ir_overhead + a["alpaca_request_tokens"] + a["alpaca_output_tokens"]
              + rr_overhead + a["new_instruction"] + a["new_answer"])
    generated = a["ir_critique"] + a["new_instruction"] + a["new_answer"] + a["rr_critique"] + a["better_answer"]
    train_tokens = EPOCHS * PAIRS * (a["new_instruction"] + a["better_answer"] + a["train_template_tokens"])
    print(f"Projection (measured here on {machine()}: template overhead only)")
    print(f"  paper templates, measured overhead: instruction reflection {ir_overhead} tokens, "
          f"response reflection {rr_overhead} tokens")
    print(f"  per pair, mode both: {prompt} prompt tokens, {generated} generated tokens (assumed lengths)")
    print(f"  {PAIRS} pairs: {PAIRS * prompt / 1e6:.0f}M prompt tokens, {PAIRS * generated / 1e6:.0f}M generated "
          f"tokens; training {train_tokens / 1e6:.0f}M tokens over {EPOCHS} epochs")
    print(f"  {'setup':84s} {'decode tok/s':>12s} {'recycling':>9s} {'training':>9s} {'total':>9s}")
    for name, s in SETUPS.items():
        prefill_s = PAIRS * prompt * 2 * ORACLE_PARAMS / (s["gpus"] * s["peak_flops"] * s["prefill_mfu"])
        recycle_s = PAIRS * generated / s["decode_tok_s"] + prefill_s
        train_s = train_tokens * s["train_flops_per_token"] / (s["gpus"] * s["peak_flops"] * s["train_mfu"])
        print(f"  {name:84s} {s['decode_tok_s']:12.0f} {hours(recycle_s)} {hours(train_s)} "
              f"{hours(recycle_s + train_s)}")


if __name__ == "__main__":
    main()
