"""`shallow demo` on the embedded defaults: its own Redis, its own worker, the terminal chat."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, TEST_GENERATION

pytestmark = pytest.mark.slow


def _processes_using(folder: Path) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if str(folder) in cmdline:
                pids.append(int(entry.name))
    return pids


def test_demo_starts_everything_answers_and_stops_everything(tmp_path, model_dir):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k != "REDIS_URL"}
    env.update(SHALLOW_HOME=str(home), SHALLOW_CACHE_DIR=str(Path(model_dir).parent), PYTHONUNBUFFERED="1", **TEST_GENERATION)
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "shared.cli", "demo"], env=env, cwd=ROOT, stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        out, err = proc.communicate("Hello, who are you?\n/story The Lost Crown\n1\n", timeout=400)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, err
    assert "Redis: embedded server" in out
    assert out.count("bot> ") == 3, out
    assert "== The Lost Crown ==" in out and "1. " in out
    assert "Traceback" not in err
    # its Redis kept its data in the local folder, append-only, and nothing it started is left running
    assert (home / "redis" / "appendonlydir").is_dir()
    assert not _processes_using(home), "the demo left processes running"
    print(f"demo: three replies in {elapsed:.1f}s")
