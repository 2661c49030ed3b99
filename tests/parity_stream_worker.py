"""Worker of test_parity's two-rank stream test (launched with torchrun): trains ReflectionSFTTrainer on a shuffled
5-row stream with gradient accumulation 2 and max_steps past one pass, and writes what this rank trained on."""

import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from reflect_trainer import ReflectionConfig
from reflect_trainer.embedded import default_oracle_path
from reflect_trainer.trainer import ReflectionSFTTrainer
from test_support.oracles import ScriptedOracle


def main(out: Path) -> None:
    path = str(default_oracle_path())
    rows = [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                          {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]} for i in range(5)]
    stream = Dataset.from_list(rows).to_iterable_dataset().shuffle(seed=0, buffer_size=5)
    args = SFTConfig(output_dir=str(out / "run"), max_steps=3, per_device_train_batch_size=1,
                     gradient_accumulation_steps=2, max_length=64, logging_steps=1, save_strategy="no",
                     report_to="none", use_cpu=True, bf16=False, gradient_checkpointing=False, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    for name, parameter in model.named_parameters():  # cheap steps: only the final norm trains
        parameter.requires_grad = name.startswith("model.norm")
    trainer = ReflectionSFTTrainer(
        model=model, args=args, train_dataset=stream,
        processing_class=tokenizer, oracle=ScriptedOracle(lambda conversation: "ok"),
        reflection_config=ReflectionConfig(cache_dir=str(out / "cache"), mode="response", buffer_batches=2,
                                           progress_bar=False, template_set="compact"))
    trained = []
    compute_loss = trainer.compute_loss

    def recording_compute_loss(model, inputs, *a, **k):  # test instrument: the rows this rank trained on
        trained.extend(tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(inputs["input_ids"],
                                                                               inputs["attention_mask"]))
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    exported = trainer.recycled_dataset()
    rank = trainer.accelerator.process_index
    (out / f"rank{rank}.json").write_text(json.dumps({
        "global_step": trainer.state.global_step, "trained": trained,
        "all": [tokenizer.apply_chat_template(r["messages"], tokenize=False) for r in rows],
        "exported": len(exported)}))
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
