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


def test_bench_train_defaults_learn_as_the_recipe_does(model_dir, tmp_path):
    """The recipe (2 x 4, padded), the new defaults (8 x 1) and the packed preset over one epoch of the same data."""
    data = write_sharegpt(tmp_path / "pirate.jsonl", 32)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "bench", "train", "--base-model", model_dir, "--data", str(data),
         "--max-seq-length", "96", "--epochs", "1", "--presets", "recipe,default,packed", "--json", str(out),
         "--out", str(tmp_path / "runs"), "--", "--warmup-steps", "1", "--learning-rate", "1e-3"],
        cwd=ROOT, env=dict(os.environ, SHALLOW_HOME=str(tmp_path / "home")), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    recipe, default, packed = result["runs"]
    assert [r["preset"] for r in result["runs"]] == ["recipe", "default", "packed"]
    assert "--gradient-accumulation-steps 4" in recipe["settings"] and "--packing true" in packed["settings"]
    assert default["settings"] == ""  # shallow train's own defaults
    assert recipe["steps"] == default["steps"] == 4  # 32 conversations, 8 a step either way
    for run in (recipe, default, packed):
        assert run["steps"] >= 2 and run["tokens_per_second"] > 0
        assert run["peak_memory_gib"] > 0 and len(run["curve"]) == run["steps"]
        assert 0 < run["final_loss"] < 20
        assert len(run["step_times"]) == run["steps"] and sum(n for n, _ in run["step_times"]) == run["real_tokens"]
        assert run["median_step_tokens_per_second"] > 0 and run["stalled_steps"] >= 0
        assert len(run["step_gc_pauses"]) == run["steps"] and min(run["step_gc_pauses"]) >= 0  # one per step
    # one epoch each: padded or packed, all trained on exactly the same tokens (padding not counted)
    assert packed["real_tokens"] == default["real_tokens"] == recipe["real_tokens"] > 32 * 20
    # the defaults see the same 8 conversations at each step as the recipe: the same loss, step for step
    # (the stated tolerance: 0.01 at every step; what differs is the summation order of the batch)
    assert result["loss_gaps"]["default"]["max_abs_gap"] < 0.01, result["loss_gaps"]
    assert set(result["loss_gaps"]["packed"]) == {"mean_abs_gap", "max_abs_gap", "final_gap", "from_share"}
    assert "| recipe |" in proc.stdout and "| default |" in proc.stdout and "| packed |" in proc.stdout
    # whether a run recomputed its activations, as `auto` resolved it (on the CPU: on), in the JSON and the table
    assert default["gradient_checkpointing"] == "true" and "| checkpointing |" in proc.stdout
    # whether the compiled calls' guards were skipped (`--skip-guards auto`: nothing is compiled on the CPU, so no)
    assert default["guards_skipped"] == {"enabled": False, "from_step": None, "steps": 0, "retried": 0}
    assert default["overlap_steps"] == {"enabled": False, "token_counts": None}  # auto: off without CUDA
    assert default["dequantized_base"] is None  # no 4-bit base without unsloth
    assert default["batches"]["collator"].endswith("DataCollatorForLanguageModeling") and default["batches"]["padding_free"] is False
    # --length-passes auto: without CUDA each step of 8 padded rows in 2 passes by length (the same loss: above);
    # the recipe's micro-batches of 2 in one pass each, and packed rows have no padding to save
    assert default["length_passes"] == {"asked": 2, "batches_split": 4, "passes": 8, "one_pass": {}}
    assert recipe["length_passes"]["asked"] == packed["length_passes"]["asked"] == 1
    assert "| guards skipped |" in proc.stdout
    # what padded batches of the data compute beyond its real tokens (8 a step, each the length of its longest)
    assert result["padding"]["rows"] == 8 and 0 < result["padding"]["real_share"] <= 1
    assert result["padding"]["real_tokens"] <= result["padding"]["padded_tokens"] and "real)" in proc.stderr
    # and in passes by length (`--length-passes`): less padded, never less than the real tokens
    two, four = result["padding"]["by_passes"]["2"], result["padding"]["by_passes"]["4"]
    assert result["padding"]["real_tokens"] <= four <= two <= result["padding"]["padded_tokens"] and "in 4 passes" in proc.stderr
    # and padded to what --block-cuda-graphs pads to (--max-seq-length 96: a multiple of 64): more tokens than one
    # pass to each step's longest row (no step's longest row here is a multiple of 64 long; the multiple ignored, equal)
    (multiple, widened), = result["padding"]["by_multiple"].items()
    assert multiple == "64" and f"a multiple of 64 (graphs)" in proc.stderr
    assert widened > result["padding"]["padded_tokens"]
    # the host the figures were measured on, by bench.host_probe in a process of its own
    import torch

    host = result["host"]
    assert host["cpu"] and host["cpus"] >= 1 and host["python_us"] > 0 and host["torch_op_us"] > 0
    assert host["redis_parser"] == "hiredis"  # a dependency: its absence (as on the GPU machine before session 24) shows
    assert (host["cuda_launch_us"] is None) == (not torch.cuda.is_available())
    assert f"a torch op {host['torch_op_us']} us" in proc.stderr


def test_presets_join_with_plus_and_an_unknown_one_is_refused_before_anything_runs(tmp_path):
    from bench.train import preset_args

    assert preset_args("sixteen+nogc", 2048, 500.0) == [
        "--per-device-train-batch-size", "16", "--gradient-accumulation-steps", "1", "--gradient-checkpointing", "false"]
    assert preset_args("default+workers", 2048, 500.0) == ["--dataloader-num-workers", "2"]
    assert preset_args("cpp+guarded", 2048, 500.0) == ["--cpp-wrapper", "true", "--skip-guards", "false"]
    assert preset_args("cpp+waiting", 2048, 500.0) == ["--cpp-wrapper", "true", "--overlap-steps", "false"]
    assert preset_args("cpp+quantized", 2048, 500.0) == ["--cpp-wrapper", "true", "--dequantize-base", "false"]
    assert preset_args("padfree", 2048, 500.0) == ["--padding-free", "true"]
    assert preset_args("padded", 2048, 500.0) == ["--padding-free", "false"]
    assert preset_args("cpp+pad256", 2048, 500.0) == ["--cpp-wrapper", "true", "--pad-to-multiple-of", "256"]
    assert preset_args("cpp+graphs", 2048, 500.0) == ["--cpp-wrapper", "true", "--block-cuda-graphs", "true"]
    data = write_sharegpt(tmp_path / "pirate.jsonl", 8)
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "bench", "train", "--base-model", "/nonexistent/model", "--data", str(data),
         "--presets", "default,sixteen+quick", "--out", str(tmp_path / "runs")],
        cwd=ROOT, env=dict(os.environ, SHALLOW_HOME=str(tmp_path / "home")), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "unknown preset 'quick'" in proc.stderr
    assert not (tmp_path / "runs" / "0-default").exists()  # nothing trained


def test_step_spread_tells_stalls_from_the_steady_rate():
    """The median step's rate ignores a few stalled steps; the stalls are counted with the time they cost."""
    from bench.train import step_spread, step_times

    history, t, n = [], 0.0, 0
    for i in range(12):
        tokens = 4000 + 100 * (i % 3)
        seconds = tokens / 40000 * (10 if i in (7, 9) else 1)  # 40k tokens/s, two steps stall 10x
        t, n = t + seconds, n + tokens
        history.append({"loss": 1.0, "elapsed_s": round(t, 3), "num_input_tokens_seen": n, "step": i + 1})
    history.append({"train_runtime": t})  # the Trainer's last record: no loss, left out
    steps = step_times(history)
    assert len(steps) == 12 and steps[0][0] == 4000 and abs(steps[0][1] - 0.1) < 0.002
    spread = step_spread(steps, skip=2)
    assert abs(spread["median_step_tokens_per_second"] - 40000) < 600
    assert spread["stalled_steps"] == 2
    assert abs(spread["stall_seconds"] - 9 * (4100 + 4000) / 40000) < 0.01  # step 8: 4,100 tokens; step 10: 4,000
    even = step_spread([(4000, 0.1)] * 10, skip=2)
    assert even["stalled_steps"] == 0 and even["stall_seconds"] == 0.0
    assert step_spread([], skip=5)["median_step_tokens_per_second"] is None


def test_each_steps_garbage_collector_pause_is_told_apart():
    """The cumulative pauses on each logged step become each step's own; records without them are skipped."""
    from bench.train import step_gc_pauses, step_times

    history = [{"loss": 1.0, "elapsed_s": 0.1 * (i + 1), "num_input_tokens_seen": 100 * (i + 1), "gc_pause_s": g}
               for i, g in enumerate([0.0, 0.002, 0.502, 0.503])]
    history.append({"train_runtime": 0.4})
    assert step_gc_pauses(history) == [0.0, 0.002, 0.5, 0.001]
    assert len(step_gc_pauses(history)) == len(step_times(history))


def test_the_host_probe_measures_this_host_and_a_failed_probe_is_said(monkeypatch, capsys):
    """bench.host_probe in a process of its own gives this host's figures; if it fails, the bench says so and
    goes on without them (None in the JSON)."""
    import subprocess as sp

    import bench.host_probe as host_probe

    host = host_probe.measure("bench train")
    assert host is not None and host["cpus"] >= 1 and 0 < host["python_us"] < 1000 and 0 < host["torch_op_us"] < 10000
    assert f"bench train: host {host['cpu']} ({host['cpus']} CPUs)" in capsys.readouterr().err
    monkeypatch.setattr(host_probe.subprocess, "run",
                        lambda *a, **k: sp.CompletedProcess(a[0], 1, stdout="", stderr="ImportError: no torch here"))
    assert host_probe.measure("bench train") is None
    assert "bench train: the host probe failed (the runs go on without it): ImportError: no torch here" in capsys.readouterr().err


def test_the_steady_rate_leaves_out_the_same_steps_whatever_the_logging_interval():
    """--skip-steps counts optimizer steps: with the loss logged every 10 steps the first 100 steps are still left out
    (not the first 100 logged points, which would leave 3 intervals of a 300-step run)."""
    from bench.train import logged_before, steady_rate

    def history(every: int) -> list[dict]:
        elapsed, out = 0.0, []
        for step in range(1, 301):
            elapsed += 1.0 if step <= 100 else 0.1  # slow first steps (compiles), then 1,000 tokens in 0.1 s
            if step % every == 0:
                out.append({"step": step, "loss": 1.0, "elapsed_s": round(elapsed, 3), "num_input_tokens_seen": step * 1000})
        return out

    assert logged_before(history(1), 100) == 100 and logged_before(history(10), 100) == 10
    assert steady_rate(history(1), 100) == steady_rate(history(10), 100) == 10000.0
    assert steady_rate(history(10), 0) < 10000.0  # the slow steps, counted
