"""CPU serving with llama.cpp (issue 10): SmolLM2 + a small trained adapter exported to GGUF by `shallow
export gguf`, served by the llamacpp backend through a real worker, and its greedy text compared with the
transformers backend's for the same prompts at f16, Q8_0 and Q4_K_M."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from shared.client import TurnClient
from shared.protocol import Mode
from shared.settings import GenerationSettings, Settings
from tests.conftest import ROOT
from tests.e2e.helpers import Done, chunks_of, collect
from tests.training.test_train import write_sharegpt

pytestmark = pytest.mark.slow

PROMPTS = ["Tell me about ships.", "Describe a lighthouse on a stormy night.", "What should I pack for a hike?"]
NEW_TOKENS = 24


def _need_llama_cpp() -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        pytest.fail("llama-cpp-python is not installed: ./scripts/setup --with-llamacpp (.ci/run does it)")


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory) -> dict[str, Path]:
    """A 4-step adapter trained here, merged and exported once as f16 by the CLI, then quantized as it quantizes."""
    _need_llama_cpp()
    from training.export import quantize
    from worker.llamacpp import tokenizer_dir

    tmp = tmp_path_factory.mktemp("llamacpp")
    env = dict(os.environ, SHALLOW_HOME=str(tmp / "home"))
    data = write_sharegpt(tmp / "pirate.jsonl", 16)
    train = subprocess.run(
        [sys.executable, "-m", "shared.cli", "train", "--base-model", model_dir, "--dataset", str(data),
         "--output-dir", str(tmp / "run"), "--max-steps", "4", "--per-device-train-batch-size", "4",
         "--max-seq-length", "96", "--warmup-steps", "1", "--learning-rate", "2e-3", "--save-steps", "100"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert train.returncode == 0, train.stderr[-3000:]
    adapter = tmp / "run" / "adapter"
    f16 = tmp / "smol-f16.gguf"
    proc = subprocess.run(
        [sys.executable, "-m", "shared.cli", "export", "gguf", "--base-model", model_dir, "--adapter", str(adapter),
         "--quant", "F16", "--out", str(f16)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["gguf"] == str(f16) and record["quant"] == "F16" and f16.stat().st_size > 200e6  # 135M x 2 bytes
    assert (tokenizer_dir(f16) / "tokenizer_config.json").is_file()
    files = {"F16": f16, "adapter": adapter}
    for quant in ("Q8_0", "Q4_K_M"):
        out = tmp / f"smol-{quant.lower()}.gguf"
        quantize(f16, out, quant)
        shutil.copytree(tokenizer_dir(f16), tokenizer_dir(out))
        files[quant] = out
    assert files["F16"].stat().st_size > files["Q8_0"].stat().st_size > files["Q4_K_M"].stat().st_size
    return files


def _greedy(settings: Settings) -> tuple[list[str], object]:
    from worker.backends import load_backend

    backend = load_backend(settings)
    gen = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, repetition_penalty=1.0)
    try:
        texts = ["".join(backend.stream([{"role": "user", "content": p}], gen, max_new_tokens=NEW_TOKENS, ignore_eos=True))
                 for p in PROMPTS]
        return texts, backend.tokenizer
    finally:
        backend.close()


def test_greedy_text_matches_transformers_and_the_gap_shrinks_with_precision(exported, model_dir, tmp_path):
    base = replace(Settings.from_env(), base_model=model_dir, home=tmp_path, device="cpu")
    reference, tokenizer = _greedy(replace(base, backend="transformers", adapter=str(exported["adapter"])))

    def agreed(texts: list[str]) -> list[int]:
        """Per prompt: how many of the reference's first tokens the text reproduces exactly."""
        out = []
        for ref, got in zip(reference, texts):
            a = tokenizer(ref, add_special_tokens=False)["input_ids"]
            b = tokenizer(got, add_special_tokens=False)["input_ids"]
            n = 0
            while n < min(len(a), len(b)) and a[n] == b[n]:
                n += 1
            out.append(n)
        return out

    agreement = {}
    for quant in ("F16", "Q8_0", "Q4_K_M"):
        texts, _ = _greedy(replace(base, backend="llamacpp", gguf=str(exported[quant])))
        assert all(t.strip() for t in texts)
        agreement[quant] = agreed(texts)
    print("tokens agreeing with transformers, per prompt:", agreement)
    # f16 is the same model as transformers' up to rounding: the replies agree token for token
    assert min(agreement["F16"]) >= 16, agreement
    # quantization moves the weights: Q8_0 follows at least as far as Q4_K_M, in all
    assert sum(agreement["Q8_0"]) >= sum(agreement["Q4_K_M"]), agreement
    assert sum(agreement["Q8_0"]) >= 2 * len(PROMPTS), agreement


def test_the_llamacpp_backend_answers_through_the_worker_and_auto_picks_it(exported, env, start_worker):
    proc = start_worker(SHALLOW_BACKEND="auto", SHALLOW_GGUF=str(exported["Q4_K_M"]), SHALLOW_DEVICE="auto")
    client = TurnClient(env.settings())
    sub = client.say("console:gguf", "Hello! What is the capital of France?")
    events, last = collect(client, sub.job_id)
    assert isinstance(last, Done), last
    assert len(chunks_of(events)) >= 2  # streamed
    assert "".join(chunks_of(events)).strip() == last.text and last.completion_tokens > 0
    second = client.say("console:gguf", "And of Spain?")  # the second turn: history in the prompt, prefix reused
    _, last2 = collect(client, second.job_id)
    assert isinstance(last2, Done) and last2.prompt_tokens > last.prompt_tokens
    assert len(client.store.history("console:gguf", Mode.CHAT)) == 4
    log = Path(proc.log_path).read_text()
    assert "loaded llamacpp backend" in log and "smol-q4_k_m.gguf" in log


def test_llamacpp_without_a_gguf_is_a_clear_error(env, processes):
    proc = processes.start(["worker", "--burst"], env.vars(SHALLOW_BACKEND="llamacpp", SHALLOW_GGUF=""), "no-gguf")
    assert proc.wait(120) != 0
    log = Path(proc.log_path).read_text()
    assert "SHALLOW_GGUF" in log and "Traceback" not in log


def test_export_refuses_bad_input_clearly(model_dir, tmp_path):
    def export(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "shared.cli", "export", "gguf", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=300, env=dict(os.environ, SHALLOW_HOME=str(tmp_path / "home")))

    quantized = tmp_path / "bnb-base"
    quantized.mkdir()
    config = json.loads((Path(model_dir) / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    cases = [
        (["--base-model", model_dir, "--out", str(tmp_path / "model.bin")], "should name a .gguf file"),
        (["--base-model", model_dir, "--quant", "Q3_X", "--out", str(tmp_path / "m.gguf")], "--quant must be one of"),
        (["--base-model", str(quantized), "--out", str(tmp_path / "m.gguf")], "quantized checkpoint"),
        (["--base-model", model_dir, "--adapter", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.gguf")], "nowhere"),
    ]
    for args, message in cases:
        proc = export(*args)
        assert proc.returncode != 0 and message in proc.stderr, (args, proc.stderr[-2000:])
        assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not list(tmp_path.glob("*.gguf"))
