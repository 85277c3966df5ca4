"""A tiny `shallow sweep` on the CPU: every run, one plot per hyperparameter, the table; a rerun runs nothing again."""
from __future__ import annotations

import pytest

from tests.training.test_train import run_train, write_sharegpt

pytestmark = pytest.mark.slow


def test_a_tiny_sweep_writes_its_plots_and_table(model_dir, tmp_path):
    data = write_sharegpt(tmp_path / "data.jsonl", n=12)
    out = tmp_path / "sweep"
    args = ["sweep", "--base-model", model_dir, "--dataset", str(data), "--output-dir", str(out), "--subset", "8",
            "--max-steps", "2", "--save-steps", "2", "--per-device-train-batch-size", "2", "--gradient-accumulation-steps",
            "1", "--max-seq-length", "64", "--warmup-steps", "0", "--eval-fraction", "0.25",
            "--only", "learning_rate,lr_scheduler_type"]
    proc = run_train(args, tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert runs == ["baseline", "learning_rate=0.0001", "learning_rate=0.0004", "lr_scheduler_type=cosine"]
    for name in runs:
        assert (out / name / "adapter" / "adapter_model.safetensors").is_file()
    for plot in ("learning_rate.png", "lr_scheduler_type.png"):
        assert (out / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "results.md").read_text().splitlines()
    assert table[0].startswith("| run | changed |") and len(table) == 2 + len(runs)
    assert any(line.startswith("| learning_rate=0.0004 | learning_rate |") for line in table)
    # each run is resumable like any other: a finished sweep reruns nothing
    again = run_train(args, tmp_path, timeout=300)
    assert again.returncode == 0 and again.stderr.count("finished before, not run again") == len(runs)
