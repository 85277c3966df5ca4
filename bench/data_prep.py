"""How long `shallow train` takes to prepare its data, and again from `datasets`' cache.

    python -m bench.data_prep FILE [--base-model M] [--num-proc N]

Times the three preparation steps over a conversation file: loading with every row checked and
standardised (`training.data.load_conversations`), rendering each with the llama-3.1 chat template, and
tokenizing the texts in batches. Run it twice to see the cache (a fresh `HF_DATASETS_CACHE` for a cold run).
"""
from __future__ import annotations

import argparse
import time


def main(argv: list[str] | None = None) -> int:
    from datasets.utils.logging import disable_progress_bar
    from transformers import AutoTokenizer

    from shared.models import resolve_model
    from shared.settings import OFFLINE_BASE_MODEL, Settings
    from training.data import load_conversations
    from training.train import LLAMA31_TEMPLATE

    p = argparse.ArgumentParser(prog="python -m bench.data_prep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--base-model", default=OFFLINE_BASE_MODEL, help="whose tokenizer (default: the offline SmolLM2)")
    p.add_argument("--num-proc", type=int, default=None, help="processes for the render and tokenize steps (default: this one)")
    args = p.parse_args(argv)
    disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.base_model, Settings.from_env().cache_dir, "base model"))
    tokenizer.chat_template = LLAMA31_TEMPLATE

    t0 = time.perf_counter()
    data = load_conversations(args.file)
    t1 = time.perf_counter()
    texts = data.map(lambda row: {"text": tokenizer.apply_chat_template(row["messages"], tokenize=False)},
                     remove_columns=["messages"], num_proc=args.num_proc)
    t2 = time.perf_counter()
    tokens = texts.map(lambda batch: tokenizer(batch["text"]), batched=True, num_proc=args.num_proc)
    t3 = time.perf_counter()
    total = sum(len(ids) for ids in tokens["input_ids"])
    print(f"{len(data):,} conversations, {total:,} tokens; load and check {t1 - t0:.1f} s, render {t2 - t1:.1f} s, "
          f"tokenize {t3 - t2:.1f} s (processes: {args.num_proc or 1})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
