"""A tiny Llama with random weights and the offline model's tokenizer, for measuring the pipeline on a CPU.

    python -m bench.tiny_model /tmp/tiny
    SHALLOW_BASE_MODEL=/tmp/tiny SHALLOW_BACKEND=batched shallow bench --channels 16,32 --worker-args "--slots 32"

On a 2-core box SmolLM2 takes the cores for itself at a few channels, and every part of the pipeline then waits for
one. This model (2 layers, hidden size 64: ~3 M parameters, most of them the embeddings) writes nonsense quickly,
which leaves the bench, Redis and the worker's own Python most of the machine: what `shallow bench --as-bot` was
compared with in docs/serving.md (session 21). Its replies mean nothing; its figures say nothing of a real model's.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from shared.models import resolve_model
    from shared.settings import OFFLINE_BASE_MODEL, Settings

    p = argparse.ArgumentParser(prog="python -m bench.tiny_model")
    p.add_argument("out", type=Path, help="the folder to write the model to")
    args = p.parse_args(argv)
    source = resolve_model(OFFLINE_BASE_MODEL, Settings.from_env().cache_dir)  # fetched and converted once, then cached
    config = AutoConfig.from_pretrained(source)
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 2
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(args.out)
    AutoTokenizer.from_pretrained(source).save_pretrained(args.out)
    print(f"{args.out}: {sum(t.numel() for t in model.parameters()):,} parameters, {source}'s tokenizer")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
