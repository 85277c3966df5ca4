"""Following reply streams through one client's stream hub, against a real redis-server: every event in order to
its own follower, one Redis command for all of them, a stream that joins a blocked hub is read at once, the same
reply followed twice, and a Redis that goes away reaches the followers as the error it is."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from dataclasses import replace

import pytest
import redis

from shared.client import StreamHub, TurnClient
from shared.protocol import EVENT_FIELD, Chunk, Done, Start, encode_event, stream_key
from shared.settings import Settings
from tests.conftest import ROOT


def client_for(redis_proc) -> TurnClient:
    return TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, queue="follow-test"))


def add(r: redis.Redis, job_id: str, event) -> None:
    r.xadd(stream_key(job_id), {EVENT_FIELD: encode_event(event)})


def xreads(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_xread", {}).get("calls", 0))


def done(text: str) -> Done:
    return Done(text=text, prompt_tokens=1, completion_tokens=1)


def test_many_followers_get_their_own_events_in_order_over_few_connections(redis_proc):
    client, r = client_for(redis_proc), redis_proc.client()
    ids = [f"job-{i}" for i in range(40)]
    for job_id in ids:
        add(r, job_id, Start(attempt=1, worker="w"))  # started: a stream without a job is otherwise "lost"
    got: dict[str, list] = {}

    def follow(job_id: str) -> None:
        got[job_id] = [e for e in client.follow(job_id, poll=0.5)]

    threads = [threading.Thread(target=follow, args=(job_id,)) for job_id in ids]
    for t in threads:
        t.start()
    time.sleep(0.3)  # every follower waiting
    reads_before = xreads(r)
    for n in range(6):  # as a worker writes: every reply's new chunk in one pipeline, a wave every 30 ms
        with r.pipeline(transaction=False) as p:
            for job_id in ids:
                event = Chunk(text=f"{job_id}:{n}") if n < 5 else done(job_id)
                p.xadd(stream_key(job_id), {EVENT_FIELD: encode_event(event)})
            p.execute()
        time.sleep(0.03)
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    for job_id in ids:
        assert [type(e).__name__ for e in got[job_id]] == ["Start"] + ["Chunk"] * 5 + ["Done"]
        assert [e.text for e in got[job_id][1:]] == [f"{job_id}:{n}" for n in range(5)] + [job_id]
    # 240 events to 40 followers in 6 waves: a read for all the streams a wave (or a few), not one per follower
    reads = xreads(r) - reads_before
    assert reads <= 30, reads
    assert not client.hub.subs  # each follower let go of its stream


def test_a_stream_that_joins_while_the_hub_is_blocked_is_read_at_once(redis_proc):
    client, r = client_for(redis_proc), redis_proc.client()
    add(r, "first", Start(attempt=1, worker="w"))
    first = client.follow("first", poll=5)
    assert isinstance(next(first), Start)
    waiting = threading.Thread(target=lambda: list(first))
    waiting.start()
    time.sleep(0.3)  # the hub is now blocked in a read of "first" alone, for up to StreamHub.BLOCK_MS
    add(r, "second", Start(attempt=1, worker="w"))
    add(r, "second", done("hi"))
    t0 = time.monotonic()
    events = list(client.follow("second", poll=5))
    took = time.monotonic() - t0
    assert [type(e).__name__ for e in events] == ["Start", "Done"]
    assert took < StreamHub.BLOCK_MS / 1000 / 2, took  # woken, not left to its block's end
    add(r, "first", done("bye"))
    waiting.join(10)
    assert not waiting.is_alive()


def test_the_same_reply_followed_twice_at_once_reaches_both(redis_proc):
    client, r = client_for(redis_proc), redis_proc.client()
    add(r, "twice", Start(attempt=1, worker="w"))
    results: list[list] = [[], []]

    def follow(i: int) -> None:
        results[i] = [e for e in client.follow("twice", poll=0.5)]

    threads = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    add(r, "twice", Chunk(text="a"))
    add(r, "twice", done("a"))
    for t in threads:
        t.join(10)
    for events in results:
        assert [type(e).__name__ for e in events] == ["Start", "Chunk", "Done"]


def test_followers_raise_the_error_when_redis_goes_away(redis_proc):
    client, r = client_for(redis_proc), redis_proc.client()
    add(r, "gone", Start(attempt=1, worker="w"))
    failure: list[BaseException] = []

    def follow() -> None:
        try:
            for _ in client.follow("gone", poll=0.5):
                pass
        except redis.RedisError as exc:
            failure.append(exc)

    t = threading.Thread(target=follow)
    t.start()
    time.sleep(0.3)
    redis_proc.stop()
    t.join(15)
    assert not t.is_alive() and failure and isinstance(failure[0], redis.ConnectionError), failure


def test_follow_cost_bench_delivers_every_event(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.follow_cost", "--followers", "4,16", "--chunks", "3", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, SHALLOW_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    for n in (4, 16):
        line = re.search(rf"{n} followers: (\d+) of (\d+) events, delay p50 [\d.]+ ms, p95 [\d.]+ ms", proc.stdout)
        assert line and line.group(1) == line.group(2) == str(n * 4), proc.stdout
