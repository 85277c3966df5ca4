"""How fast this box's host drives PyTorch: what a host-bound training step depends on.

    python -m bench.host_probe          # one JSON object on stdout

A training step of the 1B shape with the lab's 8 conversations is the host's, not the GPU's (docs/training.md,
session 10: ~1,400-1,900 kernel launches a step through unsloth's and PyTorch's Python), and the same code
measured 20,000-44,000 tokens/s on H200 machines of the same kind. This says how fast the host was, so runs on
different machines can be read together:

- `python_us`: one call of a small Python function with an attribute read and a dict write, best of 5 runs
  (the interpreter's speed);
- `torch_op_us`: one `add_` on a one-element CPU tensor (PyTorch's Python binding and dispatcher);
- `cuda_launch_us`: the host's time to queue one `add_` on a one-element CUDA tensor, the GPU kept ahead of
  (None without CUDA);
- `cpu`: the processor's name as the kernel reports it, and `cpus` the cores this process may use;
- `redis_parser`: "hiredis" when redis-py packs commands and parses replies in C (hiredis, a dependency of
  shallow's), "python" when hiredis is missing: every Redis command then costs the interpreter more, the worker's
  RQ bookkeeping (~57 commands a job) and the bots' enqueue (~13 a turn) too. The GPU machine's prepared
  site-packages lack it (no session recorded adding it before session 24's call 4).

Each figure is the best of several runs, so that a passing stall of the box does not count. `shallow bench
train` runs it (`measure`) in a process of its own before its presets (so that the bench's own process holds no
GPU memory) and keeps the result as `host` in its JSON; `shallow bench` keeps it in each row's `extra`, since
the pipeline's overhead is the host's Python too.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

RUNS = 5
ROOT = Path(__file__).resolve().parent.parent


def _best(fn, n: int) -> float:
    """Microseconds per call of fn over n calls, the best of RUNS runs."""
    best = float("inf")
    for _ in range(RUNS):
        start = time.perf_counter()
        fn(n)
        best = min(best, time.perf_counter() - start)
    return round(best / n * 1e6, 3)


def _python(n: int) -> None:
    class Box:
        value = 1

    box, seen = Box(), {}

    def step(i: int) -> None:
        seen[i & 255] = box.value + i

    for i in range(n):
        step(i)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def redis_parser() -> str:
    """How redis-py packs commands and reads replies in this interpreter: "hiredis" (C) or "python"."""
    try:
        from redis.utils import HIREDIS_AVAILABLE
    except ImportError:
        return "no redis-py"
    return "hiredis" if HIREDIS_AVAILABLE else "python"


def probe() -> dict:
    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    result: dict = {"cpu": cpu_name(), "cpus": cpus, "python_us": _best(_python, 200_000), "redis_parser": redis_parser()}
    x = torch.zeros(1)

    def cpu_ops(n: int) -> None:
        for _ in range(n):
            x.add_(1)

    result["torch_op_us"] = _best(cpu_ops, 20_000)
    result["cuda_launch_us"] = None
    if torch.cuda.is_available():
        y = torch.zeros(1, device="cuda")

        def launches(n: int) -> None:
            for _ in range(n):
                y.add_(1)  # queued: the host's cost of a launch (the GPU runs each in a few microseconds)

        launches(200)
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(RUNS):
            start = time.perf_counter()
            launches(2000)
            best = min(best, time.perf_counter() - start)
            torch.cuda.synchronize()
        result["cuda_launch_us"] = round(best / 2000 * 1e6, 3)
        result["gpu"] = torch.cuda.get_device_name()
    return result


def measure(who: str) -> dict | None:
    """`probe()` in a process of its own (the caller then holds no GPU memory), its result as a dict, and one line
    on stderr saying it (`who`: the command's name). None, and a line saying why, if it fails: a benchmark goes on."""
    try:
        proc = subprocess.run([sys.executable, "-m", "bench.host_probe"], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            host = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"{who}: host {host['cpu']} ({host['cpus']} CPUs): a Python call {host['python_us']} us, a torch op "
                  f"{host['torch_op_us']} us, a CUDA launch {host['cuda_launch_us']} us, Redis replies parsed by "
                  f"{host.get('redis_parser', '?')}", file=sys.stderr, flush=True)
            return host
        why = proc.stderr.strip()[-300:]
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        why = str(exc)
    print(f"{who}: the host probe failed (the runs go on without it): {why}", file=sys.stderr, flush=True)
    return None


def main() -> int:
    print(json.dumps(probe()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
