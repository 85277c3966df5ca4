from __future__ import annotations

import subprocess
import sys

import pytest

from shared.errors import ConfigError, RedisUnavailable
from shared.redis_conn import connect, redact
from shared.settings import OFFLINE_BASE_MODEL, Settings


def test_defaults_work_offline(monkeypatch):
    for name in ("SHALLOW_BASE_MODEL", "SHALLOW_ADAPTER", "SHALLOW_BACKEND", "REDIS_URL"):
        monkeypatch.delenv(name, raising=False)
    s = Settings.from_env()
    assert s.base_model == OFFLINE_BASE_MODEL and s.adapter is None and s.backend == "auto" and s.redis_url is None


def test_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("REDIS_URL", "redis://example:6380/2")
    monkeypatch.setenv("SHALLOW_BASE_MODEL", "/models/base")
    monkeypatch.setenv("SHALLOW_ADAPTER", "me/adapter")
    monkeypatch.setenv("SHALLOW_BACKEND", "Transformers")
    monkeypatch.setenv("SHALLOW_MAX_NEW_TOKENS", "64")
    monkeypatch.setenv("SHALLOW_TEMPERATURE", "0")
    s = Settings.from_env()
    assert (s.redis_url, s.base_model, s.adapter, s.backend) == ("redis://example:6380/2", "/models/base", "me/adapter", "transformers")
    assert s.generation.max_new_tokens == 64 and s.generation.temperature == 0.0


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("SHALLOW_BACKEND", "tpu", "SHALLOW_BACKEND"),
        ("SHALLOW_BATCH_ENGINE", "vllm", "SHALLOW_BATCH_ENGINE must be slots or paged"),
        ("SHALLOW_MAX_NEW_TOKENS", "many", "whole number"),
        ("SHALLOW_MAX_NEW_TOKENS", "0", "at least 1"),
        ("SHALLOW_TEMPERATURE", "-1", "at least 0"),
        ("SHALLOW_WEIGHTS", "int3", "SHALLOW_WEIGHTS must be full or int4"),
    ],
)
def test_bad_settings_are_named(monkeypatch, name, value, message):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=message):
        Settings.from_env()


def test_redis_unreachable_names_redis_url_without_the_password():
    with pytest.raises(RedisUnavailable) as info:
        connect("redis://:s3cret@127.0.0.1:1/0")
    text = str(info.value)
    assert "REDIS_URL=redis://:***@127.0.0.1:1/0" in text and "s3cret" not in text
    assert redact("redis://localhost:6379/0") == "redis://localhost:6379/0"


@pytest.mark.parametrize("command", [["status"], ["chat"], ["worker"]])
def test_cli_with_redis_unreachable_prints_one_clear_line(command, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "REDIS_URL": "redis://127.0.0.1:1/0", "HOME": str(tmp_path), "SHALLOW_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "shared.cli", *command], env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "REDIS_URL=redis://127.0.0.1:1/0" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"backend": "batched"}, "needs a CUDA GPU"),  # this CPU machine
        ({"backend": "transformers"}, "is for the slot engine"),
        ({"backend": "batched", "batch_engine": "paged"}, "is for the slot engine"),
    ],
)
def test_int4_weights_where_they_cannot_run_are_refused_before_loading(monkeypatch, changes, message):
    import dataclasses

    from worker.backends import load_backend

    settings = dataclasses.replace(Settings.from_env(), base_model="/nonexistent/model", weights="int4", **changes)
    with pytest.raises(ConfigError, match=message):  # not ModelNotFound: refused before the model is looked for
        load_backend(settings)


def test_int4_weights_on_a_gpu_are_refused_with_the_nf4_mode():
    import dataclasses

    from worker.quantize import refuse_int4

    settings = dataclasses.replace(Settings.from_env(), weights="int4", backend="batched")
    with pytest.raises(ConfigError, match="set SHALLOW_LOAD_IN_4BIT=0 for int4"):
        refuse_int4(dataclasses.replace(settings, load_in_4bit=True), "batched", "cuda")
    refuse_int4(dataclasses.replace(settings, load_in_4bit=False), "batched", "cuda")  # what int4 needs: no refusal


def test_auto_picks_llamacpp_without_cuda_when_a_gguf_is_set(monkeypatch, tmp_path):
    import torch

    from worker.backends import pick_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on this CPU box, and said so for any box
    monkeypatch.setenv("SHALLOW_BACKEND", "auto")
    monkeypatch.delenv("SHALLOW_GGUF", raising=False)
    assert pick_backend(Settings.from_env()) == "transformers"
    monkeypatch.setenv("SHALLOW_GGUF", str(tmp_path / "m.gguf"))
    assert Settings.from_env().gguf == str(tmp_path / "m.gguf")
    assert pick_backend(Settings.from_env()) == "llamacpp"  # needs llama-cpp-python: ./scripts/setup --with-llamacpp
    monkeypatch.setenv("SHALLOW_BACKEND", "transformers")
    assert pick_backend(Settings.from_env()) == "transformers"  # a named backend is taken as named
    monkeypatch.setenv("SHALLOW_BACKEND", "llama")
    with pytest.raises(ConfigError, match="llamacpp"):
        Settings.from_env()


def test_compiled_kernels_are_kept_under_the_model_cache_unless_told_otherwise(monkeypatch, tmp_path):
    import os

    from shared.settings import keep_compiled_kernels

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "mine"))  # the user's own choice stays
    assert keep_compiled_kernels(tmp_path / "cache") == {
        "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "kernels" / "inductor"),
        "TRITON_CACHE_DIR": str(tmp_path / "mine"),
    }
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cache" / "kernels" / "inductor")


COMPILE_ONCE = """
import json, os, sys
from shared.cli import main
code = main(["status"])  # any command: the command line points the kernel caches first (here Redis is unreachable)
import torch
from torch._dynamo.utils import counters
f = torch.compile(lambda x: torch.nn.functional.silu(x) * x + 1)
f(torch.randn(64))
print(json.dumps({"code": code, "dir": os.environ["TORCHINDUCTOR_CACHE_DIR"], "triton": os.environ["TRITON_CACHE_DIR"],
                  "hit": counters["inductor"]["fxgraph_cache_hit"], "miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


@pytest.mark.slow
def test_a_new_process_over_the_same_cache_finds_the_kernels_compiled(tmp_path):
    """What a recreated container over the same volume gets: the second process compiles nothing (a cache hit)."""
    import json
    import os
    import shutil

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: PyTorch's compiler cannot build CPU kernels here")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env.update(REDIS_URL="redis://127.0.0.1:1/0", SHALLOW_HOME=str(tmp_path / "home"), SHALLOW_CACHE_DIR=str(tmp_path / "volume"))
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-c", COMPILE_ONCE], env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    first, second = runs
    assert first["code"] == second["code"] == 2
    assert first["dir"] == str(tmp_path / "volume" / "kernels" / "inductor")
    assert first["triton"] == str(tmp_path / "volume" / "kernels" / "triton")
    assert (first["miss"], first["hit"]) == (1, 0)  # compiled, and kept under the volume
    assert any((tmp_path / "volume" / "kernels" / "inductor").rglob("*.py"))
    assert (second["miss"], second["hit"]) == (0, 1)  # found compiled
