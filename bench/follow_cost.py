"""What following N reply streams at once costs the process that follows them (a bot, or `shallow bench`).

    python -m bench.follow_cost --followers 16,64,256 --chunks 10

Starts a redis-server of its own. A writer process plays a worker: every 30 ms (the worker's chunk interval) it
appends one chunk to each of N reply streams in one pipeline, and after `--chunks` chunks the done event; each
event carries the writer's wall clock. This process follows the N replies with `TurnClient.follow`, one thread a
reply (as the bots and `shallow bench` do), and reports the delivery delay of every event (written -> yielded
by `follow`), p50 / p95 / max, and this process's CPU time per event. `--rounds` replies per stream, one after
the other. No job or model: only the streams.
"""
from __future__ import annotations

import argparse
import multiprocessing
import statistics
import threading
import time

from bench import own_redis

INTERVAL = 0.03


def write(url: str, keys: list[str], chunks: int, start: float) -> None:
    import redis

    from shared.protocol import EVENT_FIELD, Chunk, Done, encode_event

    r = redis.Redis.from_url(url)
    while time.time() < start:
        time.sleep(0.001)
    for i in range(chunks + 1):
        with r.pipeline(transaction=False) as p:
            now = repr(time.time())
            for key in keys:
                event = Chunk(text=now) if i < chunks else Done(text=now, prompt_tokens=0, completion_tokens=chunks)
                p.xadd(key, {EVENT_FIELD: encode_event(event)})
            p.execute()
        time.sleep(max(0.0, start + (i + 1) * INTERVAL - time.time()))


def run(url: str, settings, followers: int, chunks: int, round_: int, bots: bool = False) -> tuple[list[float], float, int]:
    from shared.client import TurnClient
    from shared.protocol import EVENT_FIELD, Chunk, Done, Start, encode_event, stream_key

    client = TurnClient(settings)
    ids = [f"follow-{round_}-{followers}-{i}" for i in range(followers)]
    delays: list[float] = []
    lock = threading.Lock()
    start = time.time() + 0.5
    writer = multiprocessing.Process(target=write, args=(url, [f"shallow:stream:{i}" for i in ids], chunks, start))

    def follow(job_id: str) -> None:
        mine = []
        for event in client.follow(job_id, poll=0.5):
            if isinstance(event, (Chunk, Done)):
                mine.append(time.time() - float(event.text))
            if isinstance(event, Done):
                break
        with lock:
            delays.extend(mine)

    with client.r.pipeline(transaction=False) as p:  # each reply has started (a stream with no job is "lost")
        for job_id in ids:
            p.xadd(stream_key(job_id), {EVENT_FIELD: encode_event(Start(attempt=1, worker="follow-cost"))})
        p.execute()
    if bots:  # as the chat bots follow: each reply in a coroutine of one asyncio loop (bots.streaming.follow_async)
        import asyncio

        from bots.streaming import follow_async

        async def follow_one(job_id: str) -> None:
            async for event in follow_async(client, job_id):
                if isinstance(event, (Chunk, Done)):
                    delays.append(time.time() - float(event.text))
                if isinstance(event, Done):
                    break

        async def follow_all() -> None:
            await asyncio.gather(*(follow_one(i) for i in ids))

        cpu = time.process_time()
        writer.start()
        asyncio.run(follow_all())
        writer.join()
        return delays, time.process_time() - cpu, len(delays)
    threads = [threading.Thread(target=follow, args=(i,)) for i in ids]
    cpu = time.process_time()
    for t in threads:
        t.start()
    writer.start()
    for t in threads:
        t.join()
    writer.join()
    return delays, time.process_time() - cpu, len(delays)


def main(argv: list[str] | None = None) -> int:
    import dataclasses

    from shared.protocol import stream_key
    from shared.settings import Settings

    assert stream_key("x") == "shallow:stream:x", "the writer names the streams as the protocol does"
    p = argparse.ArgumentParser(prog="python -m bench.follow_cost")
    p.add_argument("--followers", default="16,64,256")
    p.add_argument("--chunks", type=int, default=10)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--bots", action="store_true", help="follow as the chat bots do: coroutines of one asyncio loop")
    args = p.parse_args(argv)
    with own_redis("shallow-follow-") as url:
        settings = dataclasses.replace(Settings.from_env(), redis_url=url, queue="follow-cost")
        for n in (int(x) for x in args.followers.split(",")):
            delays, cpu, events = [], 0.0, 0
            for round_ in range(args.rounds):
                d, c, e = run(url, settings, n, args.chunks, round_, args.bots)
                delays += d
                cpu += c
                events += e
            ms = sorted(x * 1000 for x in delays)
            want = n * (args.chunks + 1) * args.rounds
            print(f"{n} followers: {events} of {want} events, delay p50 {statistics.median(ms):.1f} ms, "
                  f"p95 {ms[int(0.95 * (len(ms) - 1))]:.1f} ms, max {ms[-1]:.1f} ms; "
                  f"{cpu * 1e6 / max(events, 1):.0f} us of this process's CPU an event", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
