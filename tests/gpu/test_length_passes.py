"""`--length-passes` with unsloth's trainer on the Llama-3.2-1B shape: its batches are right-padded, the Trainer counts
the step's target tokens, so every step is split, and the losses are the one pass's. Needs CUDA, unsloth and
SHALLOW_TEST_LLAMA_DIR."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from shared.settings import Settings
from tests.conftest import ROOT
from tests.gpu.test_unsloth_worker import llama_dir  # noqa: F401 - the fixture
from training.synthetic import write_finetome_like

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_unsloth_steps_in_passes_by_length_train_as_one_pass(llama_dir, tmp_path):  # noqa: F811
    data = write_finetome_like(tmp_path / "finetome-like.jsonl", 64)
    env = dict(os.environ, PYTHONUNBUFFERED="1", SHALLOW_HOME=str(tmp_path / "home"),
               SHALLOW_CACHE_DIR=str(Settings.from_env().cache_dir))
    runs = {}
    for passes in (1, 2):
        out = tmp_path / f"run-{passes}"
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli", "train", "--base-model", llama_dir, "--dataset", str(data),
             "--output-dir", str(out), "--max-steps", "8", "--save-steps", "100", "--warmup-steps", "2",
             "--length-passes", str(passes)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        history = json.loads((out / "history.json").read_text())
        runs[passes] = record, [(h["step"], h["num_input_tokens_seen"], h["loss"]) for h in history if "loss" in h]
        print(passes, "pass(es):", record["length_passes"], record["batches"], record["tokens_per_second"], runs[passes][1])
    (one, one_losses), (two, two_losses) = runs[1], runs[2]
    assert one["backend"] == two["backend"] == "unsloth" and two["batches"]["trainer"].endswith(".UnslothSFTTrainer")
    assert two["length_passes"] == {"asked": 2, "batches_split": 8, "passes": 16, "one_pass": {}}
    assert [s[:2] for s in two_losses] == [s[:2] for s in one_losses] and len(one_losses) == 8  # the same tokens
    # the same steps in bf16: only the order of the sums differs
    for (_, _, a), (_, _, b) in zip(one_losses, two_losses):
        assert abs(a - b) <= 0.01 * abs(a), (one_losses, two_losses)
