"""`shallow bench train` on the CPU with SmolLM2: both presets run, and the table and JSON carry real figures."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.training.test_train import write_sharegpt

pytestmark = pytest.mark.slow


def test_bench_train_runs_the_recipe_and_the_packed_preset(model_dir, tmp_path):
    data = write_sharegpt(tmp_path / "pirate.jsonl", 32)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "bench", "train", "--base-model", model_dir, "--data", str(data),
         "--max-seq-length", "96", "--epochs", "1", "--json", str(out), "--out", str(tmp_path / "runs"),
         "--", "--warmup-steps", "1", "--learning-rate", "1e-3"],
        cwd=ROOT, env=dict(os.environ, SHALLOW_HOME=str(tmp_path / "home")), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    recipe, fast = result["runs"]
    assert (recipe["preset"], fast["preset"]) == ("recipe", "fast")
    assert "--gradient-accumulation-steps 4" in recipe["settings"] and "--packing true" in fast["settings"]
    assert recipe["steps"] == 4  # 32 conversations, 8 a step
    for run in (recipe, fast):
        assert run["steps"] >= 2 and run["tokens_per_second"] > 0
        assert run["peak_memory_gib"] > 0 and len(run["curve"]) == run["steps"]
        assert 0 < run["final_loss"] < 20
    # one epoch each: packed or padded, both trained on exactly the same tokens (padding not counted)
    assert fast["real_tokens"] == recipe["real_tokens"] > 32 * 20
    assert set(result["loss_gap"]) == {"mean_abs_gap", "max_abs_gap", "final_gap", "from_share"}
    assert "| recipe |" in proc.stdout and "| fast |" in proc.stdout
