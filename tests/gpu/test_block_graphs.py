"""`--block-cuda-graphs` with unsloth's trainer on the Llama-3.2-1B shape: the rows padded to a multiple of 256
tokens reach unsloth's collator, Inductor records CUDA graphs for unsloth's compiled blocks (and none without the
flag) and skips none, with Python wrappers and, from torch 2.12, with the C++ ones (`--cpp-wrapper true`, the
epoch's default on CUDA: `shallow train` turns Inductor's graph partition off for them; before 2.12 the pair is
refused), and the losses are those of the same steps without graphs. Needs CUDA, unsloth and SHALLOW_TEST_LLAMA_DIR."""
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
from training.train import cpp_wrapper_keeps_cuda_graphs

pytestmark = [pytest.mark.gpu, pytest.mark.slow]


def test_unsloth_blocks_replayed_as_cuda_graphs_train_as_without(llama_dir, tmp_path):  # noqa: F811
    data = write_finetome_like(tmp_path / "finetome-like.jsonl", 128)
    # Inductor's "cudagraphs" log: "Recording function=..." for each graph it records (cudagraph_trees), "skipping
    # cudagraphs due to ..." where it cannot record one (cudagraph_utils.log_cudagraph_skip_and_bump_counter, a warning
    # for graphs on CUDA; torch 2.13 only counts, silently, a skip of a graph with no CUDA part, which unsloth's blocks
    # are not). Without a positive count the test could not tell graphs recorded from a flag that never reached unsloth
    env = dict(os.environ, PYTHONUNBUFFERED="1", SHALLOW_HOME=str(tmp_path / "home"), TORCH_LOGS="cudagraphs",
               SHALLOW_CACHE_DIR=str(Settings.from_env().cache_dir))
    runs = {}
    for name, flags in (("plain", ["--block-cuda-graphs", "false"]), ("graphs", ["--block-cuda-graphs", "true"]),
                        ("graphs+cpp", ["--block-cuda-graphs", "true", "--cpp-wrapper", "true"])):
        out = tmp_path / f"run-{name}"
        proc = subprocess.run(
            [sys.executable, "-m", "shared.cli", "train", "--base-model", llama_dir, "--dataset", str(data),
             "--output-dir", str(out), "--max-steps", "12", "--save-steps", "100", "--warmup-steps", "2", *flags],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
        if name == "graphs+cpp" and not cpp_wrapper_keeps_cuda_graphs():  # torch 2.11, the GPU machine's: refused
            assert proc.returncode == 2 and "cannot go together with torch" in proc.stderr, proc.stderr[-3000:]
            print(name, "refused:", proc.stderr.strip().splitlines()[-1])
            continue
        assert proc.returncode == 0, proc.stderr[-3000:]
        record = json.loads((out / "run.json").read_text())
        history = json.loads((out / "history.json").read_text())
        runs[name] = record, [(h["step"], h["num_input_tokens_seen"], h["loss"]) for h in history if "loss" in h]
        said = proc.stdout + proc.stderr
        skips = [line for line in said.splitlines() if "skipping cudagraphs" in line]
        recorded = sum("Recording function=" in line for line in said.splitlines())
        print(name, record["config"]["block_cuda_graphs"], record["config"]["cpp_wrapper"],
              record["config"]["pad_to_multiple_of"], record["batches"], record["tokens_per_second"],
              record["peak_memory_bytes"], "graphs recorded:", recorded, skips[:3], runs[name][1])
        assert not skips, skips[:5]
        if name == "plain":
            assert recorded == 0
        else:
            assert "each compiled block replayed as a CUDA graph" in said
            assert recorded > 0, said[-3000:]
    assert runs["graphs"][0]["config"]["cpp_wrapper"] == "false"
    assert "graphs+cpp" not in runs or runs["graphs+cpp"][0]["config"]["cpp_wrapper"] == "true"
    plain, plain_losses = runs["plain"]
    assert plain["config"]["block_cuda_graphs"] == "false"
    for name in ("graphs", "graphs+cpp")[: len(runs) - 1]:
        graphed, graphed_losses = runs[name]
        assert graphed["config"]["block_cuda_graphs"] == "true"
        assert graphed["config"]["pad_to_multiple_of"] == 256 and graphed["batches"]["pad_to_multiple_of"] == 256
        assert graphed["batches"]["trainer"].endswith(".UnslothSFTTrainer")
        assert [s[:2] for s in graphed_losses] == [s[:2] for s in plain_losses] and len(plain_losses) == 12
        for (_, _, a), (_, _, b) in zip(plain_losses, graphed_losses):  # bf16, other kernels for other widths
            assert abs(a - b) <= 0.01 * abs(a), (name, plain_losses, graphed_losses)
