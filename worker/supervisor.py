"""`shallow worker --processes N` / `--gpus 0,1`: several worker processes on one box, one model each.

Each child is an ordinary `shallow worker` (its own process, so its own model and CUDA context), pinned
to one GPU through CUDA_VISIBLE_DEVICES when GPUs are given. SIGTERM and SIGINT are passed on to every
child, which then finishes its reply (see worker/main.py); a child that dies on its own is restarted,
unless it stopped for a reason a restart cannot mend (a setting, a missing model).
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time

logger = logging.getLogger(__name__)

FATAL_EXIT_CODES = {2, 3}  # bad settings, Redis unreachable, model not found: restarting would fail again
# how many model processes share this box's CPUs (set for every child; worker.main.resolve_fronts reads it.
# The fronts of `--fronts` get it too, and never read it: a front does not choose fronts)
SIBLINGS_ENV = "SHALLOW_MODEL_PROCESSES"


def plan(processes: int | None, gpus: list[str]) -> list[dict[str, str]]:
    """The environment overrides of each child: one per GPU, or N, spread round-robin over the GPUs."""
    count = processes or max(1, len(gpus))
    out = []
    for i in range(count):
        env = {SIBLINGS_ENV: str(count)}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = gpus[i % len(gpus)]
        out.append(env)
    return out


def supervise(processes: int | None, gpus: list[str], name: str | None = None, env: dict[str, str] | None = None,
              each: list[dict[str, str]] | None = None) -> int:
    """Run the children until they have all stopped after a signal (or one stopped for good); `env` is
    added to every child's environment (the fronts of `--fronts`: the engine's address), `each[i]` to
    child i's (a front's share of the slots)."""
    base = name or f"{socket.gethostname()}-{os.getpid()}"
    common = env or {}
    children: dict[int, tuple[subprocess.Popen, dict[str, str]]] = {}
    stopping = {"signals": 0}

    def spawn(i: int, extra: dict[str, str]) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", "--name", f"{base}-{i}"],
                                env=dict(os.environ, **common, **extra))
        children[i] = (proc, extra)
        logger.info("started worker %s-%d (pid %d%s)", base, i, proc.pid,
                    f", GPU {extra['CUDA_VISIBLE_DEVICES']}" if "CUDA_VISIBLE_DEVICES" in extra else "")

    def forward(signum, frame) -> None:
        stopping["signals"] += 1
        logger.info("passing %s on to %d workers", signal.Signals(signum).name, len(children))
        for proc, _ in children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for i, extra in enumerate(plan(processes, gpus)):
        spawn(i, {**extra, **(each[i] if each else {})})
    code = 0
    while children:
        time.sleep(0.5)
        for i, (proc, extra) in list(children.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del children[i]
            if stopping["signals"]:
                continue
            if rc in FATAL_EXIT_CODES:
                logger.error("worker %s-%d stopped with code %d; stopping the others", base, i, rc)
                code = rc
                forward(signal.SIGTERM, None)
                continue
            logger.warning("worker %s-%d exited with code %s; restarting it in 5s", base, i, rc)
            time.sleep(5)
            spawn(i, extra)
    return code
