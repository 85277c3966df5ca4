"""The unsloth training path on the GPU: the lab's recipe on the Llama-3.2-1B shape, killed mid-run, resumed by
rerunning the same command, and the adapter served by a worker. Needs CUDA, unsloth and SHALLOW_TEST_LLAMA_DIR."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest

from shared.client import TurnClient
from shared.protocol import Done
from shared.settings import GenerationSettings, Settings
from tests.conftest import ROOT, launch_worker, wait_for
from tests.gpu.test_unsloth_worker import llama_dir  # noqa: F401 - the fixture
from training.synthetic import write_finetome_like
from training.train import complete

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_recipe_killed_resumed_and_served(llama_dir, redis_proc, processes, tmp_path):  # noqa: F811
    data = write_finetome_like(tmp_path / "finetome-like.jsonl", 400)
    out = tmp_path / "run"
    args = [sys.executable, "-m", "shared.cli", "train", "--base-model", llama_dir, "--dataset", str(data),
            "--output-dir", str(out), "--max-steps", "45", "--save-steps", "10", "--num-train-epochs", "1"]
    # the compiled kernels stay in the machine's cache (SHALLOW_CACHE_DIR/kernels), not in this test's folder
    env = dict(os.environ, PYTHONUNBUFFERED="1", SHALLOW_LOG_LEVEL="INFO", SHALLOW_HOME=str(tmp_path / "home"),
               SHALLOW_CACHE_DIR=str(Settings.from_env().cache_dir))
    log = open(tmp_path / "first.log", "wb")
    first = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for(lambda: ((out / "checkpoint-10").is_dir() and complete(out / "checkpoint-10") is None) or first.poll() is not None,
                 600, "checkpoint-10")
        assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    resumed = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout
    record = json.loads((out / "run.json").read_text())
    print("first run (killed):", (tmp_path / "first.log").read_text()[-600:])
    print("resumed:", resumed.stdout[-800:])
    print("run record:", json.dumps({k: record[k] for k in ("backend", "resumed_from", "steps_to_take", "global_step", "train_tokens",
                                                             "tokens_per_second", "train_seconds_this_process")}))
    assert record["backend"] == "unsloth" and record["global_step"] == 45 and record["resumed_from"]
    assert record["steps_to_take"] == 45 - int(record["resumed_from"].split("-")[1])  # what --cpp-wrapper auto weighed
    # --skip-guards auto: on with unsloth; the resumed run's 35 steps or so skip them after its quiet first 20 steps
    print("guards skipped:", record["guards_skipped"])
    assert record["config"]["skip_guards"] == "true" and record["guards_skipped"]["from_step"] is not None
    assert record["guards_skipped"]["steps"] > 0
    # --dequantize-base auto: on where checkpointing resolved off (an 80 GB card): the 7 LoRA targets of 16 layers
    print("dequantized:", record["dequantized_base"], "checkpointing:", record["config"]["gradient_checkpointing"])
    if record["config"]["gradient_checkpointing"] == "false":
        assert record["config"]["dequantize_base"] == "true" and record["dequantized_base"]["layers"] == 7 * 16
    print("overlap:", record["overlap_steps"], "batches:", record["batches"])
    # unsloth imported before trl, transformers and peft (until session 28 it came after them: trl's own SFTTrainer
    # ran); its trainer's batches padded by default (--padding-free auto: padding-free ones, unsloth's own choice on
    # an H100 or H200, were 2.1x slower there)
    for text in ((tmp_path / "first.log").read_text(), resumed.stdout, resumed.stderr):
        assert "Unsloth should be imported before" not in text
    assert record["batches"]["trainer"].endswith(".UnslothSFTTrainer")
    assert record["batches"]["padding_free"] is False and record["batches"]["config_padding_free"] is False

    worker = launch_worker(processes, dict(env, REDIS_URL=redis_proc.url, SHALLOW_BACKEND="unsloth", SHALLOW_BASE_MODEL=llama_dir,
                                           SHALLOW_ADAPTER=str(out / "adapter"), SHALLOW_MAX_NEW_TOKENS="32",
                                           SHALLOW_TEMPERATURE="0"), "gpu-trained-worker", redis_proc.client(), timeout=600)
    client = TurnClient(Settings(redis_url=redis_proc.url, generation=GenerationSettings(max_new_tokens=32, temperature=0.0)))
    sub = client.say("gpu:trained", "Hello!")
    events = list(client.follow(sub.job_id, timeout=300, poll=0.5))
    assert isinstance(events[-1], Done), (events[-1], worker.log_path.read_text()[-2000:])
    assert f"adapter {out / 'adapter'}" in worker.log_path.read_text()
    assert "Unsloth should be imported before" not in worker.log_path.read_text()
    # --overlap-steps auto: on with CUDA; padding-free batches (one a step) are counted on the host, padded ones the
    # Trainer's way (session 27 on an H100: unsloth's train_on_responses_only had swapped in a padding collator)
    assert record["config"]["overlap_steps"] == "true"
    steps = record["steps_to_take"]
    if record["batches"]["padding_free"]:
        assert record["overlap_steps"]["token_counts"] == {"on_the_host": steps, "by_the_trainer": 0, "why": {}}
    else:
        assert record["overlap_steps"]["token_counts"] == {"on_the_host": 0, "by_the_trainer": steps, "why": {"attention mask": steps}}
