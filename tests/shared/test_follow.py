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


def test_follow_cost_bench_follows_as_the_bots_do(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench.follow_cost", "--followers", "16", "--chunks", "3", "--rounds", "1",
                           "--bots"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, SHALLOW_HOME=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    line = re.search(r"16 followers: (\d+) of (\d+) events", proc.stdout)
    assert line and line.group(1) == line.group(2) == "64", proc.stdout


def test_many_coroutines_follow_their_replies_in_one_loop_without_a_thread_each(redis_proc):
    """`follow_async` (the chat bots): each follower gets its own events in order, delivered by the hub to the
    asyncio loop; no thread is started per reply (the hub's own, and a few of asyncio's for the wake-ups)."""
    import asyncio

    client, r = client_for(redis_proc), redis_proc.client()
    ids = [f"async-{i}" for i in range(60)]
    for job_id in ids:
        add(r, job_id, Start(attempt=1, worker="w"))
    threads_before = threading.active_count()
    most_threads = 0

    def write() -> None:
        for n in range(6):
            with r.pipeline(transaction=False) as p:
                for job_id in ids:
                    p.xadd(stream_key(job_id), {EVENT_FIELD: encode_event(Chunk(text=f"{job_id}:{n}") if n < 5 else done(job_id))})
                p.execute()
            time.sleep(0.03)

    async def main() -> dict:
        nonlocal most_threads
        got: dict[str, list] = {}

        async def follow(job_id: str) -> None:
            got[job_id] = [e async for e in client.follow_async(job_id, poll=0.5)]

        tasks = [asyncio.create_task(follow(job_id)) for job_id in ids]
        await asyncio.sleep(0.5)  # every follower subscribed
        most_threads = threading.active_count()
        await asyncio.to_thread(write)
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return got

    got = asyncio.run(main())
    for job_id in ids:
        assert [type(e).__name__ for e in got[job_id]] == ["Start"] + ["Chunk"] * 5 + ["Done"]
        assert [e.text for e in got[job_id][1:]] == [f"{job_id}:{n}" for n in range(5)] + [job_id]
    assert most_threads - threads_before < 15, (threads_before, most_threads)  # not 60
    assert not client.hub.subs


def test_a_coroutine_follower_gets_the_error_of_a_lost_reply_and_of_redis_going_away(redis_proc):
    """The look-up of a silent reply's job runs for coroutines too (a reply with neither stream nor job is lost),
    the same reply followed twice reaches both, and a Redis that goes away is raised in each follower."""
    import asyncio

    from shared.protocol import Error

    client, r = client_for(redis_proc), redis_proc.client()

    async def lost() -> list:
        return [e async for e in client.follow_async("nowhere", poll=0.2)]

    events = asyncio.run(lost())
    assert isinstance(events[-1], Error) and events[-1].code == "lost", events

    add(r, "twice", Start(attempt=1, worker="w"))

    async def twice() -> list:
        async def one() -> list:
            return [type(e).__name__ async for e in client.follow_async("twice", poll=0.3)]

        both = asyncio.gather(one(), one())
        await asyncio.sleep(0.4)
        await asyncio.to_thread(add, r, "twice", Chunk(text="a"))
        await asyncio.to_thread(add, r, "twice", done("a"))
        return await asyncio.wait_for(both, 10)

    assert asyncio.run(twice()) == [["Start", "Chunk", "Done"]] * 2

    add(r, "gone", Start(attempt=1, worker="w"))

    async def gone() -> BaseException | None:
        async def one():
            async for _ in client.follow_async("gone", poll=0.5):
                pass

        task = asyncio.create_task(one())
        await asyncio.sleep(0.4)
        await asyncio.to_thread(redis_proc.stop)
        try:
            await asyncio.wait_for(task, 15)
        except redis.RedisError as exc:
            return exc
        return None

    failure = asyncio.run(gone())
    assert isinstance(failure, redis.ConnectionError), failure


def calls(r: redis.Redis, *names: str) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{n}", {}).get("calls", 0)) for n in names)


def test_a_follower_looks_its_job_up_only_once_its_stream_is_silent(redis_proc):
    """A reply being written is alive: its follower does not look its job up (RQ's job hash, the stream's length)
    while events come. Once the stream has been silent for two polls, it does (a job that died without a word
    ends its reply that way)."""
    client, r = client_for(redis_proc), redis_proc.client()
    add(r, "alive", Start(attempt=1, worker="w"))
    got: list = []
    follower = threading.Thread(target=lambda: got.extend(client.follow("alive", poll=0.2)))
    before = calls(r, "hgetall", "xlen")
    follower.start()
    for n in range(15):  # 1.5 s of text, a chunk every 0.1 s: more than 3 check periods (2 polls: 0.4 s)
        add(r, "alive", Chunk(text=f"{n} "))
        time.sleep(0.1)
    assert calls(r, "hgetall", "xlen") == before  # looked up not once
    time.sleep(1.0)  # silent
    assert calls(r, "hgetall", "xlen") > before
    add(r, "alive", done("".join(f"{n} " for n in range(15))))
    follower.join(5)
    assert not follower.is_alive() and isinstance(got[-1], Done) and len([e for e in got if isinstance(e, Chunk)]) == 15


def test_the_bench_reader_looks_up_only_the_turns_whose_streams_are_silent(redis_proc, tmp_path):
    """`shallow bench`'s reader looked every turn's job up every 3 s, one round trip each, reading nothing
    meanwhile. Now only a turn whose stream has been silent that long is looked up: one whose job is gone ends
    as an error, the one being written does not pause for it."""
    from bench.serve import StreamReader, Turn

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    r = redis_proc.client()
    reader = StreamReader(client, timeout=60)
    reader.CHECK_S = 0.5
    try:
        live, silent = Turn(channel=0, enqueued=time.perf_counter()), Turn(channel=1, enqueued=time.perf_counter())
        add(r, "live", Start(attempt=1, worker="w"))
        live_done = reader.add("live", live)
        silent_done = reader.add("gone", silent)  # no stream and no job: lost
        before = calls(r, "hgetall")
        for n in range(20):  # 2 s of text
            add(r, "live", Chunk(text=f"{n}"))
            time.sleep(0.1)
        assert silent_done.is_set() and silent.error and "lost" in silent.error
        assert calls(r, "hgetall") - before == 1  # the silent turn's job, looked up once; the live one's never
        add(r, "live", done("x"))
        assert live_done.wait(5) and live.error is None
    finally:
        reader.stop()
