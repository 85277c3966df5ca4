"""The unsloth backend through a real worker process, on the Llama-3.2-1B shape with a LoRA adapter.

Runs on a CUDA machine with the gpu extra. The checkpoint is SHALLOW_TEST_LLAMA_DIR when set (on the GPU
machine: `python .gpu/make_llama1b.py DIR` writes the exact Llama-3.2-1B-Instruct shape with the real
tokenizer and random weights); the LoRA adapter (r=16 on all seven projections, non-zero weights) is made
here with peft and saved with the llama-3.1 chat-templated tokenizer, as the lab's adapter was.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from shared.client import TurnClient
from shared.protocol import Mode
from shared.settings import GenerationSettings, Settings
from tests.conftest import launch_worker
from tests.e2e.helpers import Done, chunks_of, collect

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


@pytest.fixture(scope="module")
def llama_dir() -> str:
    path = os.environ.get("SHALLOW_TEST_LLAMA_DIR")
    if not path or not (Path(path) / "config.json").exists():
        pytest.fail("set SHALLOW_TEST_LLAMA_DIR to a Llama-3.2-1B-shaped checkpoint (python .gpu/make_llama1b.py DIR)")
    return path


@pytest.fixture(scope="module")
def adapter_dir(llama_dir, tmp_path_factory) -> str:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("adapter")
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16)
    config = LoraConfig(
        r=16, lora_alpha=16, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out)
    from unsloth.chat_templates import get_chat_template

    # the lab trained with the llama-3.1 chat template and saved the tokenizer beside the adapter
    get_chat_template(AutoTokenizer.from_pretrained(llama_dir), chat_template="llama-3.1").save_pretrained(out)
    del model, peft_model
    return str(out)


def test_unsloth_worker_streams_replies_through_redis(redis_proc, processes, llama_dir, adapter_dir, tmp_path):
    env = dict(
        os.environ, REDIS_URL=redis_proc.url, SHALLOW_BACKEND="unsloth", SHALLOW_BASE_MODEL=llama_dir,
        SHALLOW_ADAPTER=adapter_dir, SHALLOW_MAX_NEW_TOKENS="64", SHALLOW_TEMPERATURE="0", SHALLOW_HOME=str(tmp_path),
        PYTHONUNBUFFERED="1", SHALLOW_LOG_LEVEL="INFO", SHALLOW_CACHE_DIR=str(Settings.from_env().cache_dir),  # compiled kernels: the machine's cache
    )
    worker = launch_worker(processes, env, "gpu-worker", redis_proc.client(), timeout=600)
    log = worker.log_path.read_text()
    assert "loaded unsloth backend" in log and f"adapter {adapter_dir}" in log, log[-2000:]

    settings = Settings(redis_url=redis_proc.url, generation=GenerationSettings(max_new_tokens=64, temperature=0.0))
    client = TurnClient(settings)
    sub = client.say("gpu:1", "Hello there!")
    events, last = collect(client, sub.job_id, timeout=300)
    assert isinstance(last, Done), (last, worker.log_path.read_text()[-3000:])
    assert len(chunks_of(events)) >= 2 and "".join(chunks_of(events)).strip() == last.text
    assert last.completion_tokens > 0
    assert len(client.store.history("gpu:1", Mode.CHAT)) == 2

    story = client.start_story("gpu:2", "The Lost Crown")
    events, last = collect(client, story.job_id, timeout=300)
    assert isinstance(last, Done), last
    assert client.store.get("gpu:2", Mode.STORY).turns == 1
    print(f"unsloth worker: chat {events and last.completion_tokens} tokens; log tail:\n" + worker.log_path.read_text()[-1500:])
