"""`shallow worker --fronts N`: the model in one process, the RQ jobs in N front processes over it (worker/remote.py)."""
from __future__ import annotations

import os
import re
import signal
import time

import pytest
from rq import Worker

from shared.client import TurnClient
from shared.protocol import Chunk, Done, Mode, Start
from tests.conftest import wait_for
from tests.e2e.test_batching import events_of

pytestmark = pytest.mark.slow


def start_fronts(env, processes, shares: list[int], name: str):
    """`shallow worker --fronts N --slots S`: the model in one process, N front processes of RQ slots over it;
    `shares`: the slots each front is expected to run (all S of them shared out)."""
    proc = processes.start(["worker", "--fronts", str(len(shares)), "--slots", str(sum(shares)), "--name", name],
                           env.vars(SHALLOW_BACKEND="batched", SHALLOW_MAX_NEW_TOKENS="160"), name)
    conn = env.redis.client()
    # a front of one slot is a plain worker, named as the supervisor names its processes
    names = {f"{name}-{i}.{k}" if per > 1 else f"{name}-{i}" for i, per in enumerate(shares) for k in range(per)}

    def ready():
        if proc.poll() is not None:
            raise AssertionError(proc.log_path.read_text()[-3000:])
        return {w.name for w in Worker.all(connection=conn)} >= names

    wait_for(ready, 180, f"the {len(shares)} fronts of {name}")
    registered = [w for w in Worker.all(connection=conn) if w.name.startswith(f"{name}-")]
    assert sorted(w.name for w in registered) == sorted(names)  # every slot, none twice, no more
    pids = {w.pid for w in registered}
    return proc, names, pids


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_fronts_run_the_jobs_over_one_model_process(env, processes):
    proc, names, pids = start_fronts(env, processes, [3, 2], "fr")  # 5 slots: the first front takes one more
    assert len(pids) == 2 and proc.pid not in pids  # two front processes, neither the one that holds the model
    client = TurnClient(env.settings())
    # one slot of each front waits on Redis at a time (a turnstile): jobs go round the fronts instead of
    # filling the slots of the front that queued first. Sampled for a while, since each wait times out
    # every few seconds and is made again; without the turnstile all 5 slots wait at once.
    waiting = []
    for _ in range(40):
        waiting.append(sum(1 for c in client.r.client_list() if c.get("cmd") in ("blpop", "blmove") and "b" in c.get("flags", "")))
        time.sleep(0.05)
    assert 1 <= max(waiting) <= 2, waiting
    subs = [client.chat(f"console:f{i}", f"Tell me about the number {i}.", max_new_tokens=16, ignore_eos=True)
            for i in range(4)]
    long = client.chat("console:flong", "Tell me a long story about a clockmaker.", max_new_tokens=150, ignore_eos=True)
    wait_for(lambda: any(isinstance(e, Chunk) for e in events_of(client, long.job_id)), 120, "the long reply to start")
    client.cancel(long.job_id)
    for sub in subs:
        events = list(client.follow(sub.job_id, timeout=300, poll=0.2))
        assert isinstance(events[-1], Done) and events[-1].completion_tokens == 16, events[-1]
        stream = events_of(client, sub.job_id)
        starts = [e for e in stream if isinstance(e, Start)]
        assert [e.attempt for e in starts] == [1] and starts[0].worker in names
        assert "".join(e.text for e in stream if isinstance(e, Chunk)).strip() == events[-1].text
        assert len(client.store.history(sub.request.channel, Mode.CHAT)) == 2  # written once
    ended = list(client.follow(long.job_id, timeout=120, poll=0.2))[-1]
    assert isinstance(ended, Done) and ended.finish_reason == "cancelled" and ended.completion_tokens < 150
    log = proc.log_path.read_text()
    assert "2 fronts (3+2 slots)" in log and log.count("loaded batched backend") == 1  # one model, in one process
    # the model process and each front keep what they loaded out of the garbage collector's full passes
    frozen = [int(n) for n in re.findall(r"(\d+) objects kept out of the garbage collector's full passes", log)]
    assert len(frozen) == 3 and min(frozen) > 10_000, frozen  # torch, transformers, RQ: hundreds of thousands

    # SIGTERM to the model process: the fronts finish the reply being written, then everything leaves
    last = client.chat("console:flast", "Name a colour.", max_new_tokens=30, ignore_eos=True)
    wait_for(lambda: any(isinstance(e, Chunk) for e in events_of(client, last.job_id)), 120, "the last reply to start")
    proc.send_signal(signal.SIGTERM)
    events = list(client.follow(last.job_id, timeout=120, poll=0.2))
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == 30
    proc.wait(90)
    assert proc.returncode == 0
    wait_for(lambda: not any(alive(p) for p in pids), 30, "the fronts to exit")
    assert not {w.name for w in Worker.all(connection=client.r)} & names


def test_fronts_stop_when_the_model_process_dies(env, processes):
    proc, names, pids = start_fronts(env, processes, [1, 1], "fd")
    os.kill(proc.pid, signal.SIGKILL)  # no chance to tell anyone
    proc.wait(30)
    wait_for(lambda: not any(alive(p) for p in pids), 60, "the orphaned fronts to stop by themselves")
    client = TurnClient(env.settings())
    wait_for(lambda: not {w.name for w in Worker.all(connection=client.r)} & names, 30, "the fronts to deregister")
