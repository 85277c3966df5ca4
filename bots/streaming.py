"""What the chat-platform bots share: following a reply stream from asyncio, pacing edits, splitting
text at the platform's limit, and remembering replies not yet delivered (so a bot restart loses none).
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import redis

from shared.client import FollowEvent, Owed, ReplyText, Submitted, Turn, TurnClient, Waiting
from shared.errors import BadInput, ChannelBusy, ConfigError
from shared.protocol import Chunk, Done, Error, Mode, Start, new_id
from shared.sessions import Session

logger = logging.getLogger(__name__)

# A bot's blocking Redis work (a turn's enqueue and owed-reply records, a reply's subscription and look-ups) runs in
# its loop's default thread pool. asyncio's own default is the CPU count + 4 threads (6 on a 2-core box), behind
# which a burst of turns queued: `shallow bench --as-bot` at 32 channels there, 16-18 ms p50 to enqueue a turn
# against 3-4 ms from a thread a channel. The threads mostly wait on Redis, so many of them cost little.
REDIS_THREADS = 64
SWITCH_INTERVAL = 0.001  # seconds a thread may hold the interpreter lock while others wait (Python's default: 0.005)
WRITING_MARK = " ▌"  # shown at the end of a reply while it is still being written
EDIT_INTERVAL = 1.0  # seconds between edits of one message: the platforms' flood limits allow about this
BATCH = 64  # the most turns a bot sends to Redis in one enqueue's round trips
DONE_BATCH = 256  # the most delivered replies whose owed records go in one command


def prepare_bot_loop(threads: int = REDIS_THREADS, switch: float = SWITCH_INTERVAL) -> None:
    """Give the running loop a default thread pool of REDIS_THREADS (`asyncio.to_thread` runs there), and hand the
    interpreter lock between threads every 1 ms instead of Python's 5: each bot calls this as its loop starts.

    The loop's thread is busy with every channel's events; a pool thread back from Redis waits for the lock until
    the running thread is made to yield, after each round trip of a turn. On the H200 host, 256 channels from
    one bot (`shallow bench --as-bot`, session 21) took 27.7 / 90.9 ms p50 / p95 to enqueue a turn with the 5 ms
    interval, against 3.0 / 15.9 ms from a thread a channel. The worker does the same for its slots. `threads` and
    `switch` are for measuring others (`python -m bench.enqueue_cost --bots`)."""
    from concurrent.futures import ThreadPoolExecutor

    sys.setswitchinterval(switch)
    asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="redis"))


def split_text(text: str, limit: int) -> list[str]:
    """Split `text` into parts of at most `limit` characters, at a paragraph, line, sentence or word end."""
    text = text.strip()
    parts: list[str] = []
    while len(text) > limit:
        cut = limit  # one long word with no place to cut: cut it at the limit
        for sep, keep in (("\n\n", 0), ("\n", 0), (". ", 1), (" ", 0)):
            i = text.rfind(sep, 0, limit + 1 - keep)  # the part is text[:i + keep], at most `limit` long
            if i > limit // 2:
                cut = i + keep
                break
        parts.append(text[:cut].rstrip())
        text = text[cut:].lstrip()
    if text or not parts:
        parts.append(text)
    return parts


async def follow_async(client: TurnClient, job_id: str, poll: float = 0.5) -> AsyncIterator[FollowEvent]:
    """The reply's events (it ends with Done or Error), read by the client's stream hub for this asyncio loop."""
    events = client.follow_async(job_id, poll=poll)
    try:
        async for event in events:
            yield event
    finally:
        await events.aclose()


class Surface(Protocol):
    """Where one reply is shown on a platform: a placeholder message that is edited, then follow-ups."""

    async def show(self, text: str) -> None:
        """Replace the placeholder's text with the reply so far (or a waiting notice)."""

    async def typing(self) -> None:
        """Show that the bot is writing."""

    async def finish(self, done: Done) -> None:
        """Deliver the final text (split as the platform needs) and any story choices."""

    async def fail(self, message: str, partial: str) -> None:
        """Say the reply failed, keeping what was written."""


def waiting_text(event: Waiting) -> str:
    if event.workers == 0:
        return "⏳ No worker is running right now: your message is queued and will be answered when one starts."
    if event.position:  # 1 is next: position - 1 messages are ahead
        return f"⏳ Queued: {event.position - 1} ahead of you." if event.position > 1 else "⏳ Queued: you are next."
    return "⏳ Starting…"


async def stream_reply(client: TurnClient, job_id: str, surface: Surface, *, interval: float = EDIT_INTERVAL) -> Done | Error:
    """Follow one reply and show it on `surface`: edits at most every `interval` seconds, then the final text."""
    reply = ReplyText()
    shown = ""
    last_edit = 0.0
    last_typing = 0.0
    async for event in follow_async(client, job_id):
        now = time.monotonic()
        if isinstance(event, Waiting):
            text = waiting_text(event)
            if text != shown:
                await surface.show(text)
                shown, last_edit = text, now
            continue
        if isinstance(event, Done):
            await surface.finish(event)
            return event
        if isinstance(event, Error):
            await surface.fail(event.message, reply.text)
            return event
        reply.feed(event)
        if isinstance(event, Start) and now - last_typing > 4:
            await surface.typing()
            last_typing = now
        if isinstance(event, Chunk) and now - last_typing > 4.5:  # Telegram's typing lasts about 5 s
            await surface.typing()
            last_typing = now
        if now - last_edit >= interval and reply.text.strip():
            text = reply.text.strip() + WRITING_MARK
            if text != shown:
                await surface.show(text)
                shown, last_edit = text, now
    return Error(code="lost", message="The reply stream ended without a reply.")


def ids_from_env(name: str) -> frozenset[int]:
    """An allowlist setting: comma-separated numeric ids; empty means everyone."""
    raw = os.environ.get(name, "").replace(";", ",")
    try:
        return frozenset(int(x) for x in raw.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"{name} must be a comma-separated list of numeric ids, got {raw!r}") from None


def first_time(r: redis.Redis, key: str, ttl: int = 86400) -> bool:
    """True once per `ttl` seconds for `key`: to tell someone something once, then stay quiet."""
    return bool(r.set(key, 1, nx=True, ex=ttl))


def cooldowns_left(r: redis.Redis, keys: list[str], seconds: float) -> list[float]:
    """Seconds left of each key's cooldown, in one round trip; 0 where none was running, and then one starts (a key
    named twice: the second finds the cooldown the first started)."""
    if seconds <= 0:
        return [0.0] * len(keys)
    with r.pipeline(transaction=False) as p:
        for key in keys:
            p.set(key, 1, nx=True, px=int(seconds * 1000))
            p.pttl(key)
        replies = p.execute()
    return [0.0 if started else max(ttl, 1) / 1000 for started, ttl in zip(replies[::2], replies[1::2])]


class Cooldowns:
    """A bot's per-user cooldown between turns, checked off its loop: the messages that arrive together are checked
    in one round trip (`GroupCommit`), not a pool thread and a round trip each (256 messages at once: 4.8-5.6 ms of
    the bot's CPU against 52.6-55.8 on a 2-core box, `python -m bench.enqueue_cost --bots`)."""

    def __init__(self, r: redis.Redis, prefix: str, seconds: float) -> None:
        self.r, self.prefix, self.seconds = r, prefix, seconds
        self._checks = GroupCommit(self._left, BATCH * 4, f"{prefix}checks")

    async def left(self, user_id: int | None) -> float:
        """Seconds before this user may send a turn; 0 when they may now (and their cooldown starts)."""
        if user_id is None or self.seconds <= 0:
            return 0.0
        return await self._checks.put(user_id)

    def _left(self, user_ids: list[int]) -> list[float]:
        return cooldowns_left(self.r, [f"{self.prefix}{u}" for u in user_ids], self.seconds)


def story_and_turn(client: TurnClient, channel: str) -> tuple[Session | None, str | None]:
    """What a story button needs: the channel's story and the job writing there, if any (blocking: run in a thread)."""
    return client.store.get(channel, Mode.STORY), client.store.turn_in_flight(channel)


def status_lines(client: TurnClient, channel: str) -> list[str]:
    """What /status says: workers, the queue, and where this channel's reply is (blocking: run in a thread)."""
    st = client.status()
    lines = [f"Workers alive: {len(st['workers'])}", f"Waiting in the queue: {st['queued']}, being written: {st['running']}"]
    job_id = client.store.turn_in_flight(channel)
    if job_id:
        position = client.position(job_id)
        lines.append(f"Your reply: {'queued, position ' + str(position) if position else 'being written'}")
    return lines


@dataclass(frozen=True)
class PendingReply:
    """A reply a bot owes: which job, and where to show it (platform ids, opaque here)."""

    job_id: str
    where: dict[str, Any]
    since: float


class PendingReplies:
    """Replies not yet delivered, in Redis: a bot that restarts picks them up and delivers them."""

    def __init__(self, client: TurnClient, platform: str) -> None:
        self.r = client.r
        self.key = f"shallow:pending:{platform}"

    def add(self, job_id: str, where: dict[str, Any]) -> None:
        self.r.hset(self.key, job_id, self.record(where, time.time()))

    @staticmethod
    def record(where: dict[str, Any], since: float) -> str:
        return json.dumps({"where": where, "since": since})

    def done(self, *job_ids: str) -> None:
        self.r.hdel(self.key, *job_ids)

    def all(self) -> list[PendingReply]:
        out = []
        for job_id, raw in self.r.hgetall(self.key).items():
            data = json.loads(raw)
            out.append(PendingReply(job_id=job_id.decode(), where=data["where"], since=data["since"]))
        return sorted(out, key=lambda p: p.since)


class GroupCommit:
    """Calls of one blocking Redis function, many at once from a bot's loop, sent together: `put(item)` waits
    for the item's result; one sender task hands the waiting items to a pool thread, up to `size` at a time, as
    one call of `run(items) -> results` (a result that is an exception is raised to that item's caller), and the
    items that arrive while one batch is in Redis make up the next (group commit: a lone item goes at once). An item
    whose caller was cancelled before its batch went is not sent (a turn of a bot that is stopping is not enqueued).

    One round trip for a batch, where a pool thread a call took a round trip each and ~0.13-0.24 ms of the
    process's CPU in thread hand-overs (256 owed records removed one `asyncio.to_thread` each: 32-61 ms of CPU
    on a 2-core box, against 0.5 ms in one call; `python -m bench.enqueue_cost` for the turns)."""

    def __init__(self, run: Callable[[list], list], size: int, name: str) -> None:
        self.run = run
        self.size = size
        self.name = name
        self._waiting: list[tuple[Any, asyncio.Future]] = []  # items not yet handed to the sender
        self._sender: asyncio.Task | None = None

    async def put(self, item: Any) -> Any:
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self._waiting.append((item, result))
        if self._sender is None or self._sender.get_loop() is not loop:  # (a sender of a loop that has stopped)
            self._sender = loop.create_task(self._send(), name=self.name)
        return await result

    async def _send(self) -> None:
        """Until none wait: the next batch to a worker thread (one batch in Redis at a time)."""
        try:
            while self._waiting:
                loop = asyncio.get_running_loop()  # callers gone (or of a loop that stopped): not sent
                self._waiting = [(item, result) for item, result in self._waiting if not result.done() and result.get_loop() is loop]
                batch, self._waiting = self._waiting[: self.size], self._waiting[self.size :]
                if not batch:
                    break
                try:
                    results = await asyncio.to_thread(self.run, [item for item, _ in batch])
                except asyncio.CancelledError:  # the bot is stopping: what was sent may or may not be in Redis
                    for _, result in batch:
                        result.cancel()
                    raise
                except Exception as exc:  # a failure outside any one item: each item of the batch fails with it
                    logger.exception("%s: a batch of %d failed", self.name, len(batch))
                    results = [exc] * len(batch)
                for (_, result), value in zip(batch, results):
                    if result.done():  # its caller was cancelled
                        continue
                    if isinstance(value, BaseException):
                        result.set_exception(value)
                    else:
                        result.set_result(value)
        finally:
            try:
                mine = self._sender is asyncio.current_task()
            except RuntimeError:  # closed outside any loop (its loop was closed under it): a later sender took over
                mine = False
            if mine:
                self._sender = None
                for _, result in self._waiting:  # only when the sender was cancelled: the bot is stopping
                    result.cancel()
                self._waiting = []


class Deliveries:
    """The replies a bot owes: kept in Redis while owed, each delivered by a task that follows its stream."""

    def __init__(self, client: TurnClient, platform: str, surface_for: Callable[[dict[str, Any]], Surface],
                 batch: int = BATCH) -> None:
        self.client = client
        self.pending = PendingReplies(client, platform)
        self.surface_for = surface_for  # where (platform ids, session, turn) -> the Surface to show it on
        self.tasks: set[asyncio.Task] = set()  # held so that running deliveries are not garbage-collected
        self._turns = GroupCommit(self._enqueue, batch, "enqueue")  # batch: the most turns one enqueue's round trips take
        self._delivered = GroupCommit(self._owed_no_more, DONE_BATCH, "delivered")

    async def submit(self, turn: Turn, where: dict[str, Any], refuse: Callable[[str], Awaitable[Any]]) -> str | None:
        """Enqueue a turn whose placeholder is at `where`; a refusal goes to `refuse`. The job's id, None if refused.

        The reply is recorded as owed before the job is enqueued (with the claim of the channel), and the record
        gains the reply's session in the job's own transaction, so a bot killed at any point after this starts
        delivers it (or says it was lost) when it comes back. The turns go to Redis from a worker thread, so the
        bot's loop, which every channel shares, waits for none of their round trips (before session 21 the record
        was written from the loop, in two round trips of its own); and the turns that arrive while others are on
        their way go together in the next round trips (`TurnClient.submit_many`): a burst of turns costs a few
        round trips, not two a turn."""
        job_id = new_id()
        since = time.time()
        owed = Owed(key=self.pending.key, first=self.pending.record(where, since),
                    then=lambda sub: self.pending.record(self._located(where, sub), since))
        try:
            sub = await self._turns.put((turn, job_id, owed))
        except (BadInput, ChannelBusy) as exc:
            await refuse(str(exc))
            return None
        self._spawn(sub.job_id, self._located(where, sub))
        return sub.job_id

    @staticmethod
    def _located(where: dict[str, Any], sub: Submitted) -> dict[str, Any]:
        return dict(where, session_id=sub.session.id, turn=sub.session.turns + 1)

    def _enqueue(self, batch: list[tuple[Turn, str, Owed]]) -> list[Submitted | Exception]:
        """A batch of turns in the round trips of one (in a worker thread); a refused or failed turn is not owed."""
        try:
            results = self.client.submit_many([b[0] for b in batch], [b[1] for b in batch], [b[2] for b in batch])
        except Exception:  # a failure outside any one turn: each fails with it, and none is kept owed
            self._unowe([job_id for _, job_id, _ in batch])
            raise
        self._unowe([job_id for (_, job_id, _), result in zip(batch, results) if isinstance(result, BaseException)])
        return results

    def _owed_no_more(self, job_ids: list[str]) -> list[None]:
        """Delivered replies (in a worker thread): their owed records go, all in one command."""
        self.pending.done(*job_ids)
        return [None] * len(job_ids)

    def _unowe(self, job_ids: list[str]) -> None:
        """Refused or failed turns: nothing is owed (and nothing was enqueued)."""
        if job_ids:
            try:
                self.pending.done(*job_ids)
            except redis.RedisError:
                logger.warning("could not remove the owed records of %d refused turns", len(job_ids), exc_info=True)

    def resume(self, owns: Callable[[dict[str, Any]], bool] | None = None) -> int:
        """Deliver what was owed when the bot last stopped (of it, what `owns` says is this process's: a shard's
        own guilds). Returns how many."""
        owed = [p for p in self.pending.all() if owns is None or owns(p.where)]
        for p in owed:
            self._spawn(p.job_id, p.where)
        return len(owed)

    def _spawn(self, job_id: str, where: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._deliver(job_id, where), name=f"deliver-{job_id[:8]}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _deliver(self, job_id: str, where: dict[str, Any]) -> None:
        try:
            await stream_reply(self.client, job_id, self.surface_for(where))
        except Exception:
            logger.exception("delivering job %s to %s failed", job_id, where)
        # not on cancellation (the bot stopping): the reply stays owed, and is delivered when the bot is back.
        # The records of replies that end together go in one command (256 replies ending at once: one HDEL or a
        # few, not 256 round trips each from a pool thread while the next turns wait for the same interpreter).
        try:
            await self._delivered.put(job_id)
        except (redis.RedisError, OSError):
            logger.warning("could not remove the owed record of delivered job %s (it is shown again after a restart)",
                           job_id, exc_info=True)
