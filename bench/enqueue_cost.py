"""What a chat turn's enqueue costs the client (the bots' `TurnClient.chat`), one at a time and in a burst.

    python -m bench.enqueue_cost --turns 1000 --burst 16,64,256 [--bots]

Starts a redis-server of its own (Unix socket). One at a time: `--turns` chat turns on as many channels,
and per turn the wall time, the client's CPU time and the Redis commands it sent (counted by the
server). In a burst: N threads of one process (as `shallow bench` plays N channels) each send one turn
at the same instant, and each turn's time from the burst's start until its job is in the queue, p50 and
p95: what `shallow bench`'s enqueue column measures, without a worker or a model. No job is run. Each
burst runs twice: first while redis-py's pool opens a connection for each new thread, then again with
them open. `--bots`: each burst instead goes as the chat bots send turns, one coroutine a channel in one asyncio
loop through the bots' `Deliveries.submit` (its owed-reply record, the enqueue in a thread of the loop's pool, the
turns that wait meanwhile together; `--threads`, `--switch` and `--batch` set that pool's size, the interpreter's switch
interval and the most turns of one enqueue, by default the bots' own),
timed from the instant the loop starts them all to each job's enqueue; its deliveries are not followed. With
`--bots`, then: the end of as many deliveries at once, their owed records removed a pool thread each (before session
24) and together (the bots' `GroupCommit`), and as many users' cooldowns checked likewise, wall and CPU time.
"""
from __future__ import annotations

import argparse
import threading
import time

from bench import own_redis

WARM = 20  # untimed turns first


def main(argv: list[str] | None = None) -> int:
    from shared.client import TurnClient
    from shared.settings import Settings

    p = argparse.ArgumentParser(prog="python -m bench.enqueue_cost")
    p.add_argument("--turns", type=int, default=1000)
    p.add_argument("--burst", default="16,64,256", help="channels that send at the same instant, comma-separated")
    p.add_argument("--bots", action="store_true", help="each burst from one asyncio loop, as the chat bots send turns")
    p.add_argument("--threads", type=int, help="with --bots: the loop's thread pool (default: the bots' REDIS_THREADS)")
    p.add_argument("--switch", type=float, help="with --bots: the interpreter's switch interval in seconds (default: the bots')")
    p.add_argument("--batch", type=int, help="with --bots: the most turns one enqueue's round trips take (default: the bots' BATCH; "
                   "1: a turn's own round trips, as before session 23)")
    args = p.parse_args(argv)
    with own_redis("shallow-enqueue-") as url:
        import dataclasses

        settings = dataclasses.replace(Settings.from_env(), redis_url=url, queue="enqueue-cost")
        client = TurnClient(settings)
        r = client.r
        text = "Tell me about the sea, and about the ships that sail it."
        for i in range(WARM):  # a connection opened, code paths warm (RQ reads the server's version once)
            client.chat(f"warm-{i}", text, max_new_tokens=8)

        def commands() -> dict[str, int]:
            return {k: v["calls"] for k, v in r.info("commandstats").items()}

        n = args.turns
        before = commands()
        wall, cpu = time.perf_counter(), time.process_time()
        for i in range(n):
            client.chat(f"one-{i}", text, max_new_tokens=8)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = commands()
        per = {k.removeprefix("cmdstat_"): (v - before.get(k, 0)) / n for k, v in after.items()}
        per.pop("info", None)  # the counting itself
        print(f"one at a time, {n} turns: {wall / n * 1000:.2f} ms wall, {cpu / n * 1000:.2f} ms of client CPU and "
              f"{sum(per.values()):.1f} Redis commands per turn")
        print("commands per turn: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.5))
        sizes = [int(b) for b in args.burst.split(",") if b.strip()]
        for size in sizes:
            for when in ("first", "again"):  # first: the pool opens a connection per thread; again: they are open
                opened = r.info("stats")["total_connections_received"]
                times = (burst_as_bot(client, size, text, when, args.threads, args.switch, args.batch) if args.bots
                         else burst(client, size, text, when))
                opened = r.info("stats")["total_connections_received"] - opened
                print(f"burst of {size} ({when}, {opened} new connections): enqueued after p50 {pct(times, 50):.1f} ms, "
                      f"p95 {pct(times, 95):.1f} ms, the last {max(times):.1f} ms")
        print(f"{client.queue.count} jobs in the queue, of {WARM + n + 2 * sum(sizes)} sent")
        if args.bots:
            for size in sizes:
                for how in ("each", "together", "each", "together"):
                    wall, cpu = delivered_as_bot(client, size, how)
                    print(f"{size} replies delivered at once, their owed records removed {how}: {wall:.1f} ms wall, "
                          f"{cpu:.1f} ms of the bot's CPU")
                for how in ("each", "together", "each", "together"):
                    wall, cpu = cooldowns_as_bot(client, size, how)
                    print(f"{size} messages at once, their users' cooldowns checked {how}: {wall:.1f} ms wall, "
                          f"{cpu:.1f} ms of the bot's CPU")
    return 0


def burst(client, size: int, text: str, tag: str = "") -> list[float]:
    """`size` threads send one chat turn each at the same instant; ms from that instant to each one's enqueue."""
    go = threading.Barrier(size + 1)
    times: list[float] = [0.0] * size
    errors: list[BaseException] = []
    start = [0.0]

    def one(i: int) -> None:
        go.wait()
        try:
            client.chat(f"burst-{size}-{tag}-{i}", text, max_new_tokens=8)
            times[i] = (time.perf_counter() - start[0]) * 1000
        except BaseException as exc:  # said below: a failed enqueue is not a fast one
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(size)]
    for t in threads:
        t.start()
    start[0] = time.perf_counter()
    go.wait()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} of {size} enqueues failed: {errors[0]!r}")
    return times


def delivered_as_bot(client, size: int, how: str) -> tuple[float, float]:
    """The end of `size` deliveries at the same instant in one bot loop: each reply's owed record removed by a pool
    thread of its own ("each", as the bots did before session 24) or through the bots' group commit ("together",
    `Deliveries`' own path); wall and CPU ms of the whole."""
    import asyncio
    import sys

    import bots.streaming as streaming

    deliveries = streaming.Deliveries(client, "enqueue-cost-delivered", lambda where: None)
    ids = [f"delivered-{size}-{i}" for i in range(size)]
    client.r.hset(deliveries.pending.key, mapping={job_id: "{}" for job_id in ids})

    async def run() -> tuple[float, float]:
        streaming.prepare_bot_loop()
        wall, cpu = time.perf_counter(), time.process_time()
        if how == "each":
            await asyncio.gather(*(asyncio.to_thread(deliveries.pending.done, job_id) for job_id in ids))
        else:
            await asyncio.gather(*(deliveries._delivered.put(job_id) for job_id in ids))
        return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000

    before = sys.getswitchinterval()
    try:
        result = asyncio.run(run())
    finally:
        sys.setswitchinterval(before)
    if client.r.hlen(deliveries.pending.key):
        raise RuntimeError("owed records were left")
    return result


def cooldowns_as_bot(client, size: int, how: str) -> tuple[float, float]:
    """`size` messages of as many users at the same instant in one bot loop, each user's cooldown checked by a pool
    thread of its own ("each", as the bots did before session 24) or through the bots' `Cooldowns` ("together");
    wall and CPU ms of the whole."""
    import asyncio
    import sys

    import bots.streaming as streaming

    prefix = f"enqueue-cost-cool-{how}-{time.monotonic_ns()}:"
    cooldowns = streaming.Cooldowns(client.r, prefix, 2.0)

    async def run() -> tuple[float, float]:
        streaming.prepare_bot_loop()
        wall, cpu = time.perf_counter(), time.process_time()
        if how == "each":
            await asyncio.gather(*(asyncio.to_thread(streaming.cooldowns_left, client.r, [f"{prefix}{u}"], 2.0)
                                   for u in range(size)))
        else:
            await asyncio.gather(*(cooldowns.left(u) for u in range(size)))
        return (time.perf_counter() - wall) * 1000, (time.process_time() - cpu) * 1000

    before = sys.getswitchinterval()
    try:
        return asyncio.run(run())
    finally:
        sys.setswitchinterval(before)


def burst_as_bot(client, size: int, text: str, tag: str = "", threads: int | None = None,
                 switch: float | None = None, batch: int | None = None) -> list[float]:
    """`size` coroutines of one loop each send one chat turn through the bots' `Deliveries.submit`, started at the
    same instant; ms from that instant to each one's enqueue (the job is queued when `submit` returns). No delivery
    is spawned (nothing follows the replies), and the owed records are removed after."""
    import asyncio
    import sys

    import bots.streaming as streaming
    from shared.client import Turn

    times: list[float] = [0.0] * size
    refused: list[str] = []
    deliveries = streaming.Deliveries(client, f"enqueue-cost-{tag}", lambda where: None, batch or streaming.BATCH)
    deliveries._spawn = lambda job_id, where: None  # nothing is followed: only the enqueue is timed

    async def one(i: int, start: float) -> None:
        async def refuse(message: str) -> None:
            refused.append(message)

        await deliveries.submit(Turn("chat", f"bot-burst-{size}-{tag}-{i}", text, max_new_tokens=8), {"channel": i}, refuse)
        times[i] = (time.perf_counter() - start) * 1000

    async def run() -> None:
        streaming.prepare_bot_loop(threads or streaming.REDIS_THREADS, switch or streaming.SWITCH_INTERVAL)
        start = time.perf_counter()
        await asyncio.gather(*(one(i, start) for i in range(size)))

    before = sys.getswitchinterval()
    try:
        asyncio.run(run())
    finally:
        sys.setswitchinterval(before)
        client.r.delete(deliveries.pending.key)
    if refused:
        raise RuntimeError(f"{len(refused)} of {size} turns were refused: {refused[0]}")
    return times


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered)) - 1))]


if __name__ == "__main__":
    raise SystemExit(main())
