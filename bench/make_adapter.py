"""A random LoRA adapter (r=16 on all 7 projections, non-zero B) for a base checkpoint, saved with the
base's tokenizer and the llama-3.1 chat template: what `shallow bench` serves on a machine with no hub.

    python -m bench.make_adapter BASE_DIR OUT_DIR
"""
from __future__ import annotations

import sys


def main(base: str, out: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    get_peft_model(model, config).save_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(base)
    if not getattr(tokenizer, "chat_template", None):
        from training.train import LLAMA31_TEMPLATE

        tokenizer.chat_template = LLAMA31_TEMPLATE
    tokenizer.save_pretrained(out)
    print(f"adapter for {base} in {out}")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
