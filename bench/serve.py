"""`shallow bench`: how fast this box serves, through the real path or the backend alone.

End to end (the default), N channels each send turns through Redis and the workers and follow the
reply streams, as the bots do; every reply has a fixed length (end-of-sequence ignored) and every
channel the same fixed prompts, so runs compare. Per turn it records, on the bench's clock:

- queue wait: RQ's own enqueued_at -> started_at for the job (time spent waiting for a free worker);
- time to first token: enqueue -> the first chunk received;
- model time: what the worker reports it spent in the model (the Done event's model_seconds);
- pipeline overhead: the turn's whole time (enqueue -> done received) minus queue wait and model time:
  what Redis, RQ, the job's bookkeeping and the stream add; split by what the worker reports in the done
  event (RQ's start of the job, the job's work before the model, the last flush) and the rest.

`--direct` loads the backend in this process and measures it alone, with the same prompts.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from datetime import timezone
from pathlib import Path

from shared.errors import ConfigError, ShallowError
from shared.settings import Settings

logger = logging.getLogger(__name__)

PROMPTS = [
    "Describe a lighthouse on a stormy night.",
    "Explain how a rainbow forms, step by step.",
    "Write a short letter from a sailor to his sister.",
    "What should I pack for a week of hiking in the mountains?",
    "Tell me about the history of the printing press.",
    "Invent a recipe for a soup made from autumn vegetables.",
    "How do bees decide where to build a new hive?",
    "Describe the market square of a small medieval town.",
]


@dataclass
class Turn:
    channel: int
    enqueued: float = 0.0
    enqueued_wall: float = 0.0  # time.time() at `enqueued`: compared with RQ's enqueued_at and the worker's sent_at
    done_wall: float | None = None  # time.time() as the XREAD that brought the done event returned (`done`'s moment)
    done_entry_ms: int | None = None  # the done event's stream entry id: Redis' clock (ms) as it appended it
    enqueue_ms: float | None = None  # enqueued -> RQ's enqueued_at (the client's session checks and its enqueue)
    started: float | None = None  # the worker's start event received (direct: the request made)
    first_token: float | None = None
    done: float | None = None
    queue_wait: float | None = None
    model_seconds: float = 0.0
    tokens: int = 0
    error: str | None = None
    pipeline_ms: dict = field(default_factory=dict)  # the worker's own split of its time outside the model

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.enqueued

    @property
    def total(self) -> float | None:
        return None if self.done is None else self.done - self.enqueued

    @property
    def overhead(self) -> float | None:
        if self.total is None or self.queue_wait is None:
            return None
        return max(0.0, self.total - self.queue_wait - self.model_seconds)

    @property
    def stream_rate(self) -> float | None:
        """Tokens per second of this reply once a worker took it (its start event to its last token)."""
        if self.done is None or self.started is None or not self.tokens:
            return None
        span = self.done - self.started
        return self.tokens / span if span > 0 else None


@dataclass
class Row:
    mode: str
    channels: int
    turns: int
    new_tokens: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    per_stream_tokens_per_s_p50: float | None
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    queue_wait_p50_s: float | None
    queue_wait_p95_s: float | None
    overhead_p50_ms: float | None
    overhead_p95_ms: float | None
    errors: int
    extra: dict = field(default_factory=dict)


def pct(values: list[float], q: float) -> float | None:
    values = sorted(v for v in values if v is not None)
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def summarise(mode: str, channels: int, turns_per_channel: int, new_tokens: int, turns: list[Turn], wall: float) -> Row:
    ok = [t for t in turns if t.error is None and t.done is not None]
    tokens = sum(t.tokens for t in ok)

    def ms(v: float | None) -> float | None:
        return None if v is None else round(v * 1000, 1)

    def r(v: float | None, n: int = 3) -> float | None:
        return None if v is None else round(v, n)

    rates = [t.stream_rate for t in ok if t.stream_rate]
    extra: dict = {"turns_per_channel": turns_per_channel}
    split = overhead_split(ok)
    if split:
        extra["overhead_split_ms"] = split
    return Row(
        mode=mode,
        channels=channels,
        turns=len(turns),
        new_tokens=new_tokens,
        wall_s=round(wall, 2),
        tokens=tokens,
        tokens_per_s=round(tokens / wall, 1) if wall > 0 else 0.0,
        per_stream_tokens_per_s_p50=r(statistics.median(rates), 1) if rates else None,
        ttft_p50_s=r(pct([t.ttft for t in ok], 0.5)),
        ttft_p95_s=r(pct([t.ttft for t in ok], 0.95)),
        queue_wait_p50_s=r(pct([t.queue_wait for t in ok], 0.5)),
        queue_wait_p95_s=r(pct([t.queue_wait for t in ok], 0.95)),
        overhead_p50_ms=ms(pct([t.overhead for t in ok], 0.5)),
        overhead_p95_ms=ms(pct([t.overhead for t in ok], 0.95)),
        errors=len(turns) - len(ok),
        extra=extra,
    )


SPLIT = ("rq_start", "before_model", "flush")  # what the worker reports (worker.jobs.run_turn), in this order
# and what the bench works out with the wall clock it shares with the worker and Redis (same host): the enqueue
# (the client's session checks and RQ's enqueue, up to RQ's enqueued_at), the commit (the worker's sent_at -> the
# done event appended, by its stream entry's id: the commit's transaction) and the delivery (appended -> the done
# event read by the bench: the XREAD's wake-up and the bench's own reader)
CLOCKED = ("enqueue", "commit", "delivery")
HANDOVER = "commit + delivery"  # the two together, where the done event's stream entry is not seen (`--as-bot`)


def overhead_split(turns: list[Turn]) -> dict[str, dict[str, float]]:
    """p50/p95 ms of each part of the overhead the worker measured, of the enqueue, the commit and the
    delivery, and of the rest (the job's end after the model's last piece, RQ's time between enqueued_at and
    started_at that is not queueing, and what the clocks do not tell apart)."""
    measured = [t for t in turns if t.overhead is not None and t.pipeline_ms]
    if not measured:
        return {}
    out: dict[str, dict[str, float]] = {}
    parts = {name: [t.pipeline_ms.get(name) for t in measured] for name in SPLIT}
    parts["enqueue"] = [t.enqueue_ms for t in measured]
    parts["commit"] = [(t.done_entry_ms - t.pipeline_ms["sent_at"]) if t.done_entry_ms and "sent_at" in t.pipeline_ms
                       else None for t in measured]
    parts["delivery"] = [(t.done_wall * 1000 - t.done_entry_ms) if t.done_wall and t.done_entry_ms else None
                         for t in measured]
    # played as a bot (`--as-bot`), the done event reaches the bench as the bots see it, without its stream entry:
    # the commit and the delivery are one part there, the worker's clock at its commit to the final text shown
    parts[HANDOVER] = [(t.done_wall * 1000 - t.pipeline_ms["sent_at"]) if t.done_wall and not t.done_entry_ms
                       and "sent_at" in t.pipeline_ms else None for t in measured]
    parts["rest"] = [t.overhead * 1000 - sum(v for v in (*(t.pipeline_ms.get(n) for n in SPLIT),
                                                         *(parts[n][i] for n in (*CLOCKED, HANDOVER))) if v is not None)
                     for i, t in enumerate(measured)]
    for name, values in parts.items():
        values = [v for v in values if v is not None]
        if values:
            out[name] = {"p50": round(pct(values, 0.5), 1), "p95": round(pct(values, 0.95), 1)}
    return out


def split_table(rows: list[Row]) -> str:
    """Where the overhead went, per row that has the worker's split (end-to-end rows), and the load generator's
    own CPU (the share of a core each of its processes used over the row)."""
    handover = any(HANDOVER in (row.extra.get("overhead_split_ms") or {}) for row in rows)
    names = [*SPLIT, *CLOCKED, *((HANDOVER,) if handover else ()), "rest"]
    lines = ["| channels | " + " | ".join(f"{n} p50 / p95 ms" for n in names)
             + " | client processes | client CPU each | Redis CPU | Redis commands a turn |",
             "|" + "---|" * (len(names) + 5)]
    for row in rows:
        split = row.extra.get("overhead_split_ms")
        if not split:
            continue
        cells = [f"{split[n]['p50']:.1f} / {split[n]['p95']:.1f}" if n in split else "-" for n in names]
        cpu = row.extra.get("client_cpu_per_process")
        redis = row.extra.get("redis") or {}
        cells += [str(row.extra.get("client_processes", "-")), "-" if cpu is None else f"{cpu:.2f}",
                  "-" if redis.get("cpu_per_s") is None else f"{redis['cpu_per_s']:.2f}", str(redis.get("commands_per_turn", "-"))]
        lines.append(f"| {row.channels} | " + " | ".join(cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def redis_table(rows: list[Row]) -> str:
    """What each end-to-end row cost the host (its busy cores, the worker processes' among them) and Redis (its
    CPU, its commands a turn and the heaviest of them)."""
    lines = ["| channels | host cores busy | workers' cores busy | Redis CPU (share of a core) | commands a turn | command us a turn "
             "| heaviest: calls a turn x us a call |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        redis = row.extra.get("redis")
        if not redis and not row.extra.get("cpu"):
            continue
        redis = redis or {"cpu_per_s": None, "commands_per_turn": "-", "command_usec_per_turn": "-", "commands": {}}
        top = ", ".join(f"{name} {v['per_turn']:g} x {v['usec_per_call']:g}" for name, v in list(redis["commands"].items())[:6])
        cpu = "-" if redis["cpu_per_s"] is None else f"{redis['cpu_per_s']:.2f}"
        host = row.extra.get("cpu") or {}
        busy = "-" if host.get("host_cores_busy") is None else f"{host['host_cores_busy']:.2f} of {host['host_cores']}"
        workers = "-" if host.get("worker_cores_busy") is None else f"{host['worker_cores_busy']:.2f}"
        lines.append(f"| {row.channels} | {busy} | {workers} | {cpu} | {redis['commands_per_turn']} | {redis['command_usec_per_turn']} | {top or '-'} |")
    return "\n".join(lines) if len(lines) > 2 else ""


COLUMNS = [
    ("mode", "mode", "{}"),
    ("channels", "channels", "{}"),
    ("turns", "turns", "{}"),
    ("tokens_per_s", "tok/s all", "{:.1f}"),
    ("per_stream_tokens_per_s_p50", "tok/s stream p50", "{:.1f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p95_s", "TTFT p95 s", "{:.3f}"),
    ("queue_wait_p50_s", "queue p50 s", "{:.3f}"),
    ("queue_wait_p95_s", "queue p95 s", "{:.3f}"),
    ("overhead_p50_ms", "overhead p50 ms", "{:.1f}"),
    ("overhead_p95_ms", "overhead p95 ms", "{:.1f}"),
    ("errors", "errors", "{}"),
]


def table(rows: list[Row]) -> str:
    """A Markdown table of the rows (as the README and the closing notes show them)."""
    head = "| " + " | ".join(title for _, title, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = []
        for key, _, fmt in COLUMNS:
            v = getattr(row, key)
            cells.append("-" if v is None else fmt.format(v))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# -- end to end ------------------------------------------------------------------------------------


def run_channels(one_channel, channels: int | list[int]) -> float:
    """one_channel(i) for every channel at once, a thread each; the wall time until all are done."""
    ids = range(channels) if isinstance(channels, int) else channels
    threads = [threading.Thread(target=one_channel, args=(i,), daemon=True) for i in ids]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start


class StreamReader:
    """Follows every reply stream of a run with one connection and one XREAD over all of them.

    A thread per followed reply, each in its own XREAD, makes a load generator measure its own lag at a few
    hundred channels; one reader keeps up (the bots' `TurnClient.follow` reads through one too since session
    14, its `StreamHub`, but still with a thread per reply). Each turn's events land in its
    Turn; `wait(job_id)` blocks until its done or error event. A job that fails without a word (its
    worker died for good) is found by a check every few seconds of the turns whose streams have been silent
    that long (before session 19 every turn was looked up, one round trip each, while the reader read nothing:
    at 256 channels a pause of ~256 round trips every 3 s, the done events of that moment waiting it out).

    A turn added while the reader is blocked in an XREAD that lacks its stream wakes it through a stream of
    the reader's own (`shared.client.WakeStream`, as the bots' hub), and an idle reader waits for the next turn rather than polling:
    before session 18 it slept 10 ms at a time when it followed nothing and blocked up to 100 ms without the
    new stream, so a turn's first events could be read that much late (its time to first token, not its
    overhead, which ends at the done event).
    """

    BLOCK_MS = 1000
    CHECK_S = 3.0  # a turn whose stream has been silent this long is looked up (has its job failed for good?)

    def __init__(self, client, timeout: float) -> None:
        from shared.client import WakeStream

        self.client = client
        self.r = client.r
        self.timeout = timeout
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)
        self.turns: dict[str, tuple[Turn, str, threading.Event]] = {}  # job id -> (turn, last entry id, done)
        self.heard: dict[str, float] = {}  # job id -> when its stream last had something new (or it was added)
        self.asleep = False  # blocked in an XREAD that lacks a stream added since
        self.wake = WakeStream(self.r, "shallow:bench-reader", 600)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="bench-reader", daemon=True)
        self.thread.start()

    def add(self, job_id: str, turn: Turn) -> threading.Event:
        done = threading.Event()
        with self.lock:
            self.turns[job_id] = (turn, "0-0", done)
            self.heard[job_id] = time.monotonic()
            wake, self.asleep = self.asleep, False
            self.changed.notify()
        if wake:
            self.wake.ring()
        return done

    def _finish(self, job_id: str) -> None:
        with self.lock:
            _, _, done = self.turns.pop(job_id)
            self.heard.pop(job_id, None)
        done.set()

    def _run(self) -> None:
        from shared.protocol import EVENT_FIELD, Chunk, Done, Error, Start, decode_event, stream_key

        last_check = time.monotonic()
        while not self.stopped.is_set():
            with self.lock:
                while not self.turns and not self.stopped.is_set():
                    self.changed.wait(0.5)
                streams = {stream_key(j): last for j, (_, last, _) in self.turns.items()}
                self.asleep = True
            if not streams:
                continue
            resp = self.r.xread(self.wake.read_with(streams), block=self.BLOCK_MS, count=1000)
            now, now_wall = time.perf_counter(), time.time()
            with self.lock:
                self.asleep = False
            for key, entries in resp or []:
                if self.wake.consumed(key, entries):
                    continue
                job_id = key.decode().rsplit(":", 1)[1]
                with self.lock:
                    if job_id not in self.turns:
                        continue
                    turn, _, done = self.turns[job_id]
                    self.turns[job_id] = (turn, entries[-1][0].decode(), done)
                    self.heard[job_id] = time.monotonic()
                for entry_id, fields in entries:
                    event = decode_event(fields[EVENT_FIELD.encode()])
                    if isinstance(event, Start):
                        turn.started = now
                    elif isinstance(event, Chunk) and turn.first_token is None and event.text:
                        turn.first_token = now
                    elif isinstance(event, Done):
                        turn.done, turn.tokens, turn.model_seconds = now, event.completion_tokens, event.model_seconds
                        turn.done_wall = now_wall
                        turn.done_entry_ms = int(entry_id.split(b"-")[0])  # Redis' clock as it appended the event
                        turn.pipeline_ms = dict(event.pipeline_ms)
                        self._finish(job_id)
                        break
                    elif isinstance(event, Error):
                        turn.error = event.message
                        self._finish(job_id)
                        break
            if time.monotonic() - last_check > self.CHECK_S:
                last_check = time.monotonic()
                with self.lock:  # a stream that moved within CHECK_S belongs to a live job: not looked up
                    waiting = [(j, t) for j, t in self.turns.items() if last_check - self.heard[j] > self.CHECK_S]
                for job_id, (turn, _, _) in waiting:
                    ended = self.client._ended_without_reply(job_id)  # noqa: SLF001 - the client's own check
                    if ended is not None or time.perf_counter() - turn.enqueued > self.timeout:
                        turn.error = ended.message if ended else "timed out"
                        self._finish(job_id)

    def stop(self) -> None:
        with self.lock:
            self.stopped.set()
            self.changed.notify()
        self.thread.join(5)
        self.wake.delete()


def open_connections(r, n: int) -> None:
    """Have n connections open in the client's pool before the timed turns, as a running bot has. Otherwise
    the channels' first turns, sent at the same instant, would each open one (at 256 channels on a 2-core
    box: 494-549 ms p50 to enqueue instead of 311-316, `python -m bench.enqueue_cost`)."""
    pool = r.connection_pool
    taken = [pool.get_connection() for _ in range(n)]  # each one connected (redis-py connects on checkout)
    for conn in taken:
        pool.release(conn)


def play_channels(settings: Settings, channel_ids: list[int], turns: int, new_tokens: int, run_id: str,
                  ready=None, go=None, stagger: float = 0.0, as_bot: bool = False) -> dict:
    """Channels `channel_ids`, each sending `turns` turns one after another, from this process: a thread a
    channel and one reader for all their streams (as_bot: as a chat bot plays them, `play_channels_as_bot`).
    With `ready` (called once the connections are open) and `go` (an event then waited for), the processes of
    one row start together. stagger: each channel sends its first turn after its own delay, between 0 and this
    many seconds (the same for a channel in every run)."""
    from shared.client import TurnClient

    if as_bot:
        return play_channels_as_bot(settings, channel_ids, turns, new_tokens, run_id, ready, go, stagger)
    client = TurnClient(settings)
    open_connections(client.r, len(channel_ids) + 2)
    results: list[tuple[str, Turn]] = []
    lock = threading.Lock()
    reader = StreamReader(client, timeout=settings.job_timeout * 2)

    def one_channel(i: int) -> None:
        channel = f"bench:{run_id}:{i}"
        if stagger > 0:
            time.sleep(random.Random(i).uniform(0.0, stagger))
        try:
            for k in range(turns):
                turn = Turn(channel=i)
                prompt = PROMPTS[(i + k) % len(PROMPTS)]
                turn.enqueued, turn.enqueued_wall = time.perf_counter(), time.time()
                try:
                    sub = client.chat(channel, prompt, user="bench", max_new_tokens=new_tokens, ignore_eos=True)
                except Exception as exc:  # counted and shown, the run goes on
                    turn.error = f"{type(exc).__name__}: {exc}"
                    with lock:
                        results.append(("", turn))
                    continue
                reader.add(sub.job_id, turn).wait()
                with lock:
                    results.append((sub.job_id, turn))
        finally:
            client.reset(channel)

    start, end, cpu = _timed_together(lambda: run_channels(one_channel, channel_ids), ready, go)
    reader.stop()
    return {"results": results, "start": start, "end": end, "cpu_s": cpu}


def _timed_together(play, ready, go) -> tuple[float, float, float]:
    """play(), once this process has said it is ready and every process may start: its start, end and CPU."""
    if ready is not None:
        ready()
    if go is not None:
        go.wait()
    cpu = time.process_time()
    start = time.perf_counter()
    play()
    end = time.perf_counter()
    return start, end, time.process_time() - cpu


def play_channels_as_bot(settings: Settings, channel_ids: list[int], turns: int, new_tokens: int, run_id: str,
                         ready=None, go=None, stagger: float = 0.0) -> dict:
    """The channels as the Discord and Telegram bots play theirs: one asyncio loop for all of them; each turn goes
    through the bots' own `Deliveries` (its owed-reply records and its enqueue in a worker thread of the loop's
    pool) and is followed by the client's stream hub into a coroutine (`stream_reply`, pacing its edits as the
    bots do), shown on a surface that notes the moments instead of calling a platform. A turn's first token is
    the first text that surface is shown; its end, the final text. The done event's stream entry is not seen
    there, so the commit and the delivery are not told apart: one part, "commit + delivery", from the worker's
    clock as it commits to the final text shown."""
    import asyncio

    from bots.streaming import REDIS_THREADS, Deliveries, prepare_bot_loop
    from shared.client import Turn as ChatTurn, TurnClient

    client = TurnClient(settings)
    open_connections(client.r, min(len(channel_ids), REDIS_THREADS) + 4)  # the loop's thread pool, the hub and a few
    results: list[tuple[str, Turn]] = []
    playing: dict[str, tuple[Turn, asyncio.Future]] = {}

    class NotedSurface:
        """Where a platform message would be edited: notes when each part of the reply is shown."""

        def __init__(self, where: dict) -> None:
            self.turn, self.ended = playing[where["bench_turn"]]

        async def typing(self) -> None:  # the reply's start event
            if self.turn.started is None:
                self.turn.started = time.perf_counter()

        async def show(self, text: str) -> None:  # a waiting notice before the start; the text so far after it
            if self.turn.started is not None and self.turn.first_token is None:
                self.turn.first_token = time.perf_counter()

        async def finish(self, done) -> None:  # noqa: ANN001 - shared.protocol.Done
            turn = self.turn
            turn.done, turn.done_wall = time.perf_counter(), time.time()
            turn.tokens, turn.model_seconds, turn.pipeline_ms = done.completion_tokens, done.model_seconds, dict(done.pipeline_ms)
            if not self.ended.done():
                self.ended.set_result(None)

        async def fail(self, message: str, partial: str) -> None:
            self.turn.error = message
            if not self.ended.done():
                self.ended.set_result(None)

    deliveries = Deliveries(client, f"bench-{run_id}", NotedSurface)

    async def one_channel(i: int) -> None:
        channel = f"bench:{run_id}:{i}"
        if stagger > 0:
            await asyncio.sleep(random.Random(i).uniform(0.0, stagger))
        for k in range(turns):
            turn, key = Turn(channel=i), f"{i}:{k}"
            prompt = PROMPTS[(i + k) % len(PROMPTS)]
            ended = asyncio.get_running_loop().create_future()
            playing[key] = (turn, ended)
            job = ""
            refused: list[str] = []

            async def refuse(text: str, refused=refused) -> None:
                refused.append(text)

            turn.enqueued, turn.enqueued_wall = time.perf_counter(), time.time()
            try:
                job = await deliveries.submit(ChatTurn("chat", channel, prompt, "bench", max_new_tokens=new_tokens, ignore_eos=True),
                                              {"bench_turn": key}, refuse) or ""
                if refused:
                    turn.error = refused[0]
                else:
                    await asyncio.wait_for(ended, settings.job_timeout * 2)
            except asyncio.TimeoutError:
                turn.error = "timed out"
            except Exception as exc:  # counted and shown, the run goes on
                turn.error = f"{type(exc).__name__}: {exc}"
            results.append((job, turn))

    def reset_all() -> None:
        for i in channel_ids:
            client.reset(f"bench:{run_id}:{i}")

    async def play() -> None:
        prepare_bot_loop()  # as the bots do as their loops start
        await asyncio.gather(*(one_channel(i) for i in channel_ids))
        if deliveries.tasks:  # the last owed records being removed
            await asyncio.wait(list(deliveries.tasks), timeout=10)

    try:
        start, end, cpu = _timed_together(lambda: asyncio.run(play()), ready, go)
    finally:
        # the channels are forgotten once all have played, outside the timed run (before session 24 each channel's
        # reset, a few round trips from a pool thread, ran as it ended, beside the replies still being delivered)
        reset_all()
    client.r.delete(deliveries.pending.key)  # nothing is owed any more (a turn that timed out left its record)
    return {"results": results, "start": start, "end": end, "cpu_s": cpu}


def _play_in_child(conn, settings, channel_ids, turns, new_tokens, run_id, go, stagger, as_bot) -> None:
    try:
        conn.send(play_channels(settings, channel_ids, turns, new_tokens, run_id, ready=lambda: conn.send("ready"), go=go,
                                stagger=stagger, as_bot=as_bot))
    except BaseException as exc:  # noqa: BLE001 - the parent reports it
        conn.send({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        conn.close()


def _receive(parent_end):
    """What a client process sent, or its failure when it died without a word (killed, out of memory)."""
    try:
        return parent_end.recv()
    except EOFError:
        return {"error": "it ended without sending its turns"}


def cpu_snapshot(worker_sessions: list[int]) -> dict | None:
    """The host's busy CPU time so far (all cores, /proc/stat) and that of the worker processes' sessions (each
    worker the bench starts leads a session of its own: its fronts and model process are in it), in seconds.
    None off Linux."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    ticks = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
    busy = sum(ticks) - ticks[3] - ticks[4]
    workers = 0
    if worker_sessions:
        sessions = set(worker_sessions)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                rest = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # gone meanwhile
            if int(rest[3]) in sessions:  # session id; utime and stime follow
                workers += int(rest[11]) + int(rest[12])
    return {"busy_s": busy / hz, "workers_s": workers / hz if worker_sessions else None}


def cpu_load(before: dict | None, after: dict | None, wall: float) -> dict:
    """Cores busy on average over a row: the whole host's, and the worker processes' (theirs is None when the
    bench did not start them)."""
    if before is None or after is None or wall <= 0:
        return {}
    workers = None if before["workers_s"] is None else round((after["workers_s"] - before["workers_s"]) / wall, 2)
    return {"host_cores_busy": round((after["busy_s"] - before["busy_s"]) / wall, 2), "host_cores": os.cpu_count(),
            "worker_cores_busy": workers}


def redis_snapshot(r) -> dict | None:
    """Redis' own CPU seconds (its main thread where the server tells it apart) and its command counts so far;
    None where the server refuses INFO (a managed Redis may)."""
    import redis

    try:
        cpu = r.info("cpu")
        stats = r.info("commandstats")
    except redis.ResponseError as exc:
        logger.warning("this Redis refuses INFO (%s): the rows will not show its CPU and commands", exc)
        return None
    main = cpu.get("used_cpu_sys_main_thread")
    seconds = (main + cpu["used_cpu_user_main_thread"]) if main is not None else cpu["used_cpu_sys"] + cpu["used_cpu_user"]
    return {"cpu_s": float(seconds),
            "commands": {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}}


def redis_load(before: dict | None, after: dict | None, wall: float, turns: int) -> dict:
    """What a row cost Redis: the share of a core its one command thread used over the row (near 1.0: every
    command waits its turn, and the round trips of the whole pipeline grow), commands a turn, and each command,
    the one that took most of its time first (calls a turn, microseconds a call). {} without the snapshots."""
    if before is None or after is None:
        return {}
    spent = {}
    for name, (calls, usec) in after["commands"].items():
        c0, u0 = before["commands"].get(name, (0, 0))
        if calls > c0 and name != "info":  # INFO: the snapshots' own
            spent[name] = (calls - c0, usec - u0)
    turns = max(1, turns)
    heaviest = sorted(spent.items(), key=lambda kv: -kv[1][1])
    return {
        "cpu_per_s": round((after["cpu_s"] - before["cpu_s"]) / wall, 3) if wall > 0 else None,
        "commands_per_turn": round(sum(c for c, _ in spent.values()) / turns, 1),
        "command_usec_per_turn": round(sum(u for _, u in spent.values()) / turns, 1),
        "commands": {name: {"per_turn": round(c / turns, 2), "usec_per_call": round(u / c, 2)} for name, (c, u) in heaviest},
    }


def run_end_to_end(settings: Settings, channels: int, turns: int, new_tokens: int, run_id: str,
                   client_processes: int = 1, worker_sessions: list[int] | None = None, stagger: float = 0.0,
                   as_bot: bool = False) -> Row:
    """N channels at once, each sending `turns` turns one after another through Redis and the workers, from
    `client_processes` processes (the channels dealt out among them; 1: all from this one, as one bot).
    worker_sessions: the pids of the workers the bench started (their CPU is counted). stagger: the channels'
    first turns spread over this many seconds (0: all at once, a burst; each later turn follows its reply)."""
    import multiprocessing

    from rq.job import Job
    from rq.serializers import JSONSerializer

    from shared.client import TurnClient

    client = TurnClient(settings)
    if client.workers_alive() == 0:
        raise ConfigError("no worker is running on this queue: start `shallow worker` (or use --embedded)")
    n_proc = max(1, min(client_processes, channels))
    groups = [list(range(k, channels, n_proc)) for k in range(n_proc)]
    redis_before = redis_snapshot(client.r)
    cpu_before = cpu_snapshot(worker_sessions or [])
    if n_proc == 1:
        played = [play_channels(settings, groups[0], turns, new_tokens, run_id, stagger=stagger, as_bot=as_bot)]
    else:
        # forked before this process has threads of its own; perf_counter is the system's monotonic clock, so
        # the children's times compare with each other's
        ctx = multiprocessing.get_context("fork")
        go = ctx.Event()
        pipes, procs = [], []
        failed = True
        try:
            for group in groups:
                parent_end, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_play_in_child, args=(child_end, settings, group, turns, new_tokens, run_id, go, stagger, as_bot),
                                   daemon=True)
                proc.start()
                child_end.close()
                pipes.append(parent_end)
                procs.append(proc)
            for parent_end in pipes:  # each opens its connections before the row starts
                got = _receive(parent_end)
                if got != "ready":
                    raise ShallowError(f"a bench client process failed: {got['error']}")
            go.set()
            played = []
            for parent_end in pipes:
                got = _receive(parent_end)
                if "error" in got:
                    raise ShallowError(f"a bench client process failed: {got['error']}")
                played.append(got)
            failed = False
        finally:
            for proc in procs:  # after a failure the others are stopped at once (they may be waiting for `go`)
                proc.join(0 if failed else 10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()
    cpu_after = cpu_snapshot(worker_sessions or [])  # before the jobs are read back below
    redis_after = redis_snapshot(client.r)
    results = [item for p in played for item in p["results"]]
    wall = max(p["end"] for p in played) - min(p["start"] for p in played)
    cpu = sum(p["cpu_s"] for p in played)
    per_process: dict[str, int] = {}
    for job_id, turn in results:  # RQ's own enqueued -> started, read after the run so as not to load it
        if not job_id:
            continue
        job = Job.fetch(job_id, connection=client.r, serializer=JSONSerializer)
        if job.enqueued_at and job.started_at:
            turn.queue_wait = max(0.0, (job.started_at - job.enqueued_at).total_seconds())
            enqueued_at = job.enqueued_at if job.enqueued_at.tzinfo else job.enqueued_at.replace(tzinfo=timezone.utc)
            turn.enqueue_ms = (enqueued_at.timestamp() - turn.enqueued_wall) * 1000
        if job.worker_name:  # slots are named PROCESS.K: count the turns each worker process served
            process = job.worker_name.rsplit(".", 1)[0] if job.worker_name.rsplit(".", 1)[-1].isdigit() else job.worker_name
            per_process[process] = per_process.get(process, 0) + 1
    row = summarise("end-to-end, as a bot" if as_bot else "end-to-end", channels, turns, new_tokens, [t for _, t in results], wall)
    row.extra["turns_per_worker_process"] = dict(sorted(per_process.items()))
    # the load generator's own CPU: near 1.0 for one process, it is playing its channels as fast as one
    # interpreter can, and its own waits are in the figures
    row.extra["client_processes"] = n_proc
    row.extra["stagger_s"] = stagger
    row.extra["client_cpu_s"] = round(cpu, 3)
    row.extra["client_cpu_per_process"] = round(cpu / wall / n_proc, 3) if wall > 0 else None
    row.extra["redis"] = redis_load(redis_before, redis_after, wall, len(results))
    # the host's cores: when they are all busy, every process's round trips wait for a core too
    row.extra["cpu"] = cpu_load(cpu_before, cpu_after, wall)
    return row


# -- the backend alone -----------------------------------------------------------------------------


def run_direct(backend, settings: Settings, channels: int, turns: int, new_tokens: int) -> Row:
    """The same prompts straight into the backend, `channels` streams at once (threads), no Redis."""
    from shared.prompts import CHAT_SYSTEM_PROMPT

    results: list[Turn] = []
    lock = threading.Lock()

    def one_channel(i: int) -> None:
        for k in range(turns):
            turn = Turn(channel=i, queue_wait=0.0)
            messages = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}, {"role": "user", "content": PROMPTS[(i + k) % len(PROMPTS)]}]
            turn.enqueued = turn.started = time.perf_counter()
            try:
                gen = backend.stream(messages, settings.generation, max_new_tokens=new_tokens, ignore_eos=True)
                for piece in gen:
                    if turn.first_token is None and piece:
                        turn.first_token = time.perf_counter()
                turn.done = time.perf_counter()
                turn.tokens = gen.completion_tokens
                turn.model_seconds = turn.done - turn.enqueued
            except Exception as exc:  # counted and shown, the run goes on
                turn.error = f"{type(exc).__name__}: {exc}"
                logger.exception("direct stream %d failed", i)
            with lock:
                results.append(turn)

    wall = run_channels(one_channel, channels)
    return summarise("direct", channels, turns, new_tokens, results, wall)


# -- a stack of its own ----------------------------------------------------------------------------


def registrations_per_worker(worker_args: list[str]) -> int:
    """RQ workers one `shallow worker ARGS` registers: processes (--processes, --gpus) times slots (with
    `--fronts`, the same slots shared out among the fronts)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--slots", type=int)
    p.add_argument("--processes", type=int)
    p.add_argument("--gpus", default="")
    known, _ = p.parse_known_args(worker_args)
    gpus = [g for g in known.gpus.split(",") if g.strip()]
    processes = known.processes or max(1, len(gpus))
    slots = max(1, known.slots or int(os.environ.get("SHALLOW_SLOTS") or 1))
    return processes * slots


@contextmanager
def embedded_stack(settings: Settings, workers: int, worker_args: list[str], timeout: float) -> Iterator[tuple[Settings, list[int]]]:
    """A redis-server of its own (Unix socket, temporary data) and `workers` worker processes on it; yields the
    settings that reach it and the workers' pids (each leads a process session of its own)."""
    import tempfile

    from rq import Worker

    from shared.redis_conn import EmbeddedRedis, connect

    expected = workers * registrations_per_worker(worker_args)
    with tempfile.TemporaryDirectory(prefix="shallow-bench-") as tmp:
        redis_server = EmbeddedRedis(Path(tmp) / "redis")
        url = redis_server.start()
        procs: list[subprocess.Popen] = []
        try:
            env = dict(os.environ, REDIS_URL=url)
            for k in range(workers):
                log = open(Path(tmp) / f"worker{k}.log", "wb")  # noqa: SIM115 - closed with the process
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "shared.cli", "worker", "--name", f"bench-{os.getpid()}-{k}", *worker_args],
                    env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                ))
            conn = connect(url)
            deadline = time.monotonic() + timeout
            while True:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    tail = (Path(tmp) / f"worker{procs.index(dead[0])}.log").read_text(errors="replace")[-2000:]
                    raise ConfigError(f"a bench worker exited with code {dead[0].returncode}:\n{tail}")
                names = {w.name for w in Worker.all(connection=conn)}
                if sum(1 for n in names if n.startswith(f"bench-{os.getpid()}-")) >= expected:
                    break
                if time.monotonic() > deadline:
                    raise ConfigError(f"the bench workers did not start within {timeout:.0f}s")
                time.sleep(0.5)
            print(f"bench: {workers} worker process(es) ready on an embedded Redis", file=sys.stderr, flush=True)
            yield replace(settings, redis_url=url), [p.pid for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            redis_server.stop()


# -- the command -----------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="shallow bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", default="1,16", help="comma-separated channel counts, one run each (default 1,16)")
    p.add_argument("--turns", type=int, default=2, help="turns per channel, one after another (default 2)")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens per reply, end-of-sequence ignored (default 128)")
    p.add_argument("--direct", action="store_true", help="the backend alone, loaded in this process (no Redis, no worker)")
    p.add_argument("--embedded", action="store_true",
                   help="start a Redis and worker process(es) of its own (default when REDIS_URL is not set)")
    p.add_argument("--workers", type=int, default=1, help="with --embedded: worker processes to start (default 1)")
    p.add_argument("--worker-args", default="", help="with --embedded: extra `shallow worker` arguments, e.g. '--slots 64'")
    p.add_argument("--warmup", type=int, default=1, help="untimed turns first, to load and compile (default 1)")
    p.add_argument("--warmup-channels", type=int, default=1,
                   help="channels that send the untimed turns at once (default 1; more reach more worker processes)")
    p.add_argument("--client-processes", type=int, default=1,
                   help="processes that play the channels, dealt out among them (default 1: all from one process, as one "
                        "bot serves all its channels; more when that process is the bottleneck, see the client CPU column)")
    p.add_argument("--stagger", type=float, default=0.0,
                   help="each channel sends its first turn after a delay of its own, up to this many seconds (default 0: "
                        "every channel at the same moment, a burst that every part of the pipeline queues; chat users do "
                        "not arrive that way)")
    p.add_argument("--as-bot", action="store_true",
                   help="play the channels as the chat bots do: one asyncio loop a client process, each turn through the "
                        "bots' own delivery code (owed-reply records, the enqueue in a worker thread, a coroutine following "
                        "the reply, edits paced as the bots pace them) instead of a thread a channel")
    p.add_argument("--label", default="", help="a name for this configuration in the table and the JSON")
    p.add_argument("--json", type=Path, help="also write the rows as JSON to this file")
    p.add_argument("--start-timeout", type=float, default=900, help="seconds to wait for workers to load (default 900)")
    args = p.parse_args(argv)
    try:
        args.channel_counts = [int(x) for x in args.channels.split(",") if x.strip()]
    except ValueError:
        p.error(f"--channels must be comma-separated numbers, got {args.channels!r}")
    if not args.channel_counts or min(args.channel_counts) < 1:
        p.error("--channels needs at least one count of 1 or more")
    if args.new_tokens < 1 or args.turns < 1:
        p.error("--new-tokens and --turns must be 1 or more")
    if args.client_processes < 1:
        p.error("--client-processes must be 1 or more")
    if not 0 <= args.stagger <= 3600:
        p.error(f"--stagger must be between 0 and 3600 seconds, got {args.stagger:g}")
    return args


def main(argv: list[str], settings: Settings) -> int:
    args = parse_args(argv)
    if args.new_tokens > settings.generation.max_new_tokens:
        settings = replace(settings, generation=replace(settings.generation, max_new_tokens=args.new_tokens))
        os.environ["SHALLOW_MAX_NEW_TOKENS"] = str(args.new_tokens)  # the workers it starts allow this length
    rows: list[Row] = []
    run_id = f"{int(time.time())}-{os.getpid()}"
    from bench.host_probe import measure

    host = measure("bench")  # before anything loads: the pipeline's overhead is the host's Python, and hosts differ
    if args.direct:
        from worker.backends import load_backend

        backend = load_backend(settings)
        try:
            if args.warmup:
                run_direct(backend, settings, 1, args.warmup, args.new_tokens)
            for n in args.channel_counts:
                rows.append(run_direct(backend, settings, n, args.turns, args.new_tokens))
                print(table(rows[-1:]), flush=True)
        finally:
            backend.close()
    else:
        embedded = args.embedded or not settings.redis_url
        stack = embedded_stack(settings, args.workers, args.worker_args.split(), args.start_timeout) if embedded else _nothing(settings)
        with stack as (live, worker_pids):
            if args.warmup:
                warm = run_end_to_end(live, max(1, args.warmup_channels), args.warmup, args.new_tokens, run_id + "-warmup")
                print(f"bench: warm-up turns per worker process: {warm.extra['turns_per_worker_process']}", file=sys.stderr, flush=True)
            for n in args.channel_counts:
                rows.append(run_end_to_end(live, n, args.turns, args.new_tokens, run_id, args.client_processes, worker_pids,
                                           args.stagger, args.as_bot))
                print(table(rows[-1:]), flush=True)
    for row in rows:
        row.extra["label"] = args.label
        row.extra["host"] = host
    print()
    if args.label:
        print(f"{args.label}:")
    print(table(rows))
    split = split_table(rows)
    if split:
        print("\nthe overhead, split (the worker's own figures; the enqueue, the commit and the delivery by the wall clock the bench "
              "shares with it and Redis):")
        print(split)
    load = redis_table(rows)
    if load:
        print("\nthe host's cores and what Redis did over each row (INFO cpu and commandstats: every client's commands, the workers' "
              "too):")
        print(load)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0 if all(r.errors == 0 for r in rows) else 1


@contextmanager
def _nothing(settings: Settings) -> Iterator[tuple[Settings, list[int]]]:
    yield settings, []
