"""The frontends' side of the pipeline: validate a turn, enqueue it, follow its reply stream.

Every frontend (console, Discord, Telegram, web) goes through `TurnClient`, so they all validate the
same way, hold one turn at a time per channel, and see the same events.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass

import redis
from rq import Queue, Retry, Worker
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus
from rq.registry import FailedJobRegistry, StartedJobRegistry
from rq.serializers import JSONSerializer

from shared.errors import BadInput, ChannelBusy
from shared.prompts import story_action
from shared.protocol import (
    EVENT_FIELD,
    JOB_FUNCTION,
    Chunk,
    Done,
    Error,
    Event,
    Mode,
    Start,
    TurnRequest,
    cancel_key,
    decode_event,
    new_id,
    stream_key,
)
from shared.redis_conn import connect
from shared.sessions import Session, SessionStore, TurnView
from shared.settings import Settings

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Submitted:
    job_id: str
    request: TurnRequest
    session: Session


@dataclass(frozen=True)
class Owed:
    """A record a turn writes in its own round trips (a bot's "reply owed", `bots.streaming.Deliveries`): the
    field `first` with the claim of the channel, before anything is enqueued, and then `then(submitted)` in the
    transaction that enqueues the job. The same two round trips as a turn without it (before session 21 a bot
    wrote its record in two round trips of their own)."""

    key: str  # a hash
    first: str
    then: Callable[[Submitted], str]


@dataclass(frozen=True)
class Turn:
    """A turn to submit (`TurnClient.submit`): a message (`say`: a chat turn, or the next action of the channel's
    story), a chat turn whatever the channel's mode (`chat`), or a new story from its title (`story`)."""

    kind: str  # "say" | "chat" | "story"
    channel: str
    text: str | None  # the message, or the story's title
    user: str | None = None
    reply_to: dict | None = None
    max_new_tokens: int | None = None  # `chat` only: a reply's fixed length (`shallow bench`)
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if self.kind not in ("say", "chat", "story"):
            raise ValueError(f"a turn is 'say', 'chat' or 'story', not {self.kind!r}")


@dataclass
class _Plan:
    """What a turn writes (`TurnClient._plan`), once its channel is read."""

    session: Session
    text: str
    user_text: str
    user: str | None
    reply_to: dict | None
    job_id: str
    claimed_by: str | None
    kept: tuple[Mode, ...]
    owed: Owed | None
    new_session: bool = False
    set_mode: bool = False
    max_new_tokens: int | None = None
    ignore_eos: bool = False


def _first_record(job_id: str, owed: Owed | None) -> Callable | None:
    """An `Owed` record's first write, for `SessionStore.open_turns`."""
    return None if owed is None else (lambda p: p.hset(owed.key, job_id, owed.first))


@dataclass(frozen=True)
class Waiting:
    """Not on the wire: what a follower sees while the job has not started. position is 1 for next."""

    position: int | None
    workers: int


FollowEvent = Event | Waiting


class ReplyText:
    """The text of a reply as its events arrive; a new attempt (a retried job) starts it over."""

    def __init__(self) -> None:
        self.attempt = 0
        self.text = ""

    def feed(self, event: FollowEvent) -> str:
        if isinstance(event, Start) and event.attempt != self.attempt:
            self.attempt, self.text = event.attempt, ""
        elif isinstance(event, Chunk) and event.attempt == self.attempt:
            self.text += event.text
        elif isinstance(event, Done):
            self.text = event.text
        return self.text



class WakeStream:
    """A stream of a reader's own, read with the streams it follows, so that one that joins while the reader is
    blocked in XREAD wakes it (one XADD for all that join together): the bots' `StreamHub` and `shallow bench`'s
    reader both wait this way."""

    def __init__(self, connection: redis.Redis, prefix: str, ttl: int) -> None:
        self.r = connection
        self.key = f"{prefix}:{new_id()}"
        self.raw_key = self.key.encode()
        self.ttl = ttl
        self.last = "0-0"

    def ring(self) -> None:
        with self.r.pipeline(transaction=False) as p:
            p.xadd(self.key, {"w": "1"}, maxlen=1, approximate=False)
            p.expire(self.key, self.ttl)
            p.execute()

    def read_with(self, streams: dict) -> dict:
        """`streams` (key -> last id) with this stream added, for an XREAD."""
        streams[self.key] = self.last
        return streams

    def consumed(self, key, entries) -> bool:
        """True when `key` is this stream (its entries are then taken as seen)."""
        if (key if isinstance(key, bytes) else str(key).encode()) != self.raw_key:
            return False
        last = entries[-1][0]
        self.last = last.decode() if isinstance(last, bytes) else last
        return True

    def delete(self) -> None:
        self.r.delete(self.key)


class StreamHub:
    """One reader for all the reply streams a client follows at once: one blocking XREAD over every followed
    stream, in a thread of its own, hands each stream's new entries to its follower.

    A follower per reply, each blocked in its own XREAD, costs a Redis connection and a command a reply per event:
    with 256 replies at once, ~0.4 ms of the follower process's CPU an event on a 2-core box
    (`python -m bench.follow_cost`). The hub reads what every stream has in one command. A stream that joins
    while the hub is blocked wakes it through a stream of its own (one XADD for all that join together).
    """

    BLOCK_MS = 2000

    def __init__(self, connection: redis.Redis, ttl: int = 3600) -> None:
        self.r = connection
        self.wake = WakeStream(connection, "shallow:hub", ttl)
        self.lock = threading.Lock()
        self.subs: dict[bytes, Subscription] = {}
        self.asleep = False  # blocked in an XREAD that lacks a stream that joined since
        self.changed = threading.Condition(self.lock)
        self.thread: threading.Thread | None = None

    def subscribe(self, key: str, last: str = "0-0", loop: asyncio.AbstractEventLoop | None = None) -> Subscription | None:
        """Entries of `key` after `last` from now on; None when this hub already follows that stream. With `loop`,
        they reach that asyncio loop (`AsyncSubscription`): no thread per follower."""
        sub, wake = self.join(key, last, loop)
        if wake:
            self.ring(sub)
        return sub

    def join(self, key: str, last: str = "0-0", loop: asyncio.AbstractEventLoop | None = None) -> tuple[Subscription | None, bool]:
        """`subscribe` without Redis: the subscription, and whether the hub must be woken (`ring`) to read it, which
        only a hub blocked in a read that lacks it needs (in a burst of replies, the first to join wakes it for the
        rest). A coroutine joins from its loop's thread and rings from a worker thread only when it must."""
        sub = Subscription(key.encode(), last) if loop is None else AsyncSubscription(key.encode(), last, loop)
        with self.lock:
            if sub.key in self.subs:
                return None, False
            self.subs[sub.key] = sub
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="stream-hub", daemon=True)
                self.thread.start()
            wake, self.asleep = self.asleep, False
            self.changed.notify()
        return sub, wake

    def ring(self, sub: Subscription | None) -> None:
        """Wake the hub for `sub`, which joined while it was blocked; a failed wake-up takes `sub` out again."""
        try:
            self.wake.ring()
        except BaseException:
            self.unsubscribe(sub)
            raise

    def unsubscribe(self, sub: Subscription | None) -> None:
        if sub is not None:
            with self.lock:
                if self.subs.get(sub.key) is sub:
                    del self.subs[sub.key]

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self.subs:
                    self.changed.wait()
                asked = dict(self.subs)  # a stream followed anew meanwhile is read from its own start next time
                self.asleep = True
            streams = self.wake.read_with({key: sub.last for key, sub in asked.items()})
            try:
                resp = self.r.xread(streams, block=self.BLOCK_MS, count=200)
            except Exception as exc:  # noqa: BLE001 - each follower raises it, as its own read would have
                if not isinstance(exc, redis.RedisError):
                    logger.exception("the stream hub's read failed")
                with self.lock:
                    self.asleep = False
                    deliver([(sub, exc) for sub in self.subs.values()])
                time.sleep(0.5)
                continue
            with self.lock:
                self.asleep = False
                got = []
                for key, entries in resp or []:
                    if self.wake.consumed(key, entries):
                        continue
                    key = key if isinstance(key, bytes) else str(key).encode()
                    sub = self.subs.get(key)
                    if sub is not None and sub is asked.get(key) and entries:
                        sub.last = entries[-1][0]
                        got.append((sub, entries))
                deliver(got)


def deliver(items: list) -> None:
    """Hand each (subscription, entries or error) to its follower: a thread's directly, and those of an asyncio
    loop in one callback a loop for the whole read (one wake-up of the loop, not one a stream)."""
    loops: dict = {}
    for sub, item in items:
        if isinstance(sub, AsyncSubscription):
            loops.setdefault(sub.loop, []).append((sub, item))
        else:
            sub.put(item)
    for loop, batch in loops.items():
        try:
            loop.call_soon_threadsafe(AsyncSubscription.put_all, batch)
        except RuntimeError:  # that loop is closed: nobody follows there any more
            pass


class Subscription:
    """One followed stream's entries as the hub reads them (or the error it met), in order."""

    def __init__(self, key: bytes, last: str) -> None:
        self.key, self.last = key, last
        self.items: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> None:
        self.items.put(item)

    def get(self, timeout: float) -> list:
        """The entries read since the last call, waiting up to `timeout` seconds for the first ([] if none)."""
        try:
            batches = [self.items.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                batches.append(self.items.get_nowait())
            except queue.Empty:
                break
        return _entries_of(batches)


class AsyncSubscription(Subscription):
    """A followed stream's entries for a coroutine of an asyncio loop: put there by the loop itself."""

    def __init__(self, key: bytes, last: str, loop: asyncio.AbstractEventLoop) -> None:
        self.key, self.last, self.loop = key, last, loop
        self.items: asyncio.Queue = asyncio.Queue()

    @staticmethod
    def put_all(batch: list) -> None:  # in the loop's thread
        for sub, item in batch:
            sub.items.put_nowait(item)

    def put(self, item) -> None:
        self.loop.call_soon_threadsafe(self.items.put_nowait, item)

    async def get_async(self, timeout: float) -> list:
        """As `Subscription.get`, awaited. What is there already is taken without waiting (at many replies at
        once it usually is), and a wait is bounded by `asyncio.timeout`, not `asyncio.wait_for` (a task of its own
        each time: ~11 us against ~4 on this 2-core box, and 0.4 for what is there already)."""
        batches = []
        if self.items.empty():
            try:
                async with asyncio.timeout(timeout):
                    batches.append(await self.items.get())
            except TimeoutError:
                return []
        while not self.items.empty():
            batches.append(self.items.get_nowait())
        return _entries_of(batches)


def _entries_of(batches: list) -> list:
    entries = []
    for batch in batches:
        if isinstance(batch, Exception):
            raise batch
        entries.extend(batch)
    return entries


class _Following:
    """What following one reply keeps between reads, the same for `follow` and `follow_async`: its events from
    the stream's entries, and the look-up of its job once the stream has been silent (`check`, blocking)."""

    def __init__(self, client: TurnClient, job_id: str, timeout: float | None, poll: float) -> None:
        self.client, self.job_id, self.poll = client, job_id, poll
        self.key = stream_key(job_id)
        self.last = "0-0"
        self.started = False
        self.ended = False
        self.deadline = time.monotonic() + timeout if timeout else None
        self.next_check = 0.0

    def events(self, entries: list) -> list[FollowEvent]:
        """The events of the entries read, up to the reply's end (then `ended`)."""
        out: list[FollowEvent] = []
        for entry_id, fields in entries:
            self.last = entry_id
            event = decode_event(fields[EVENT_FIELD.encode()])
            if isinstance(event, Start):
                self.started = True
            out.append(event)
            if isinstance(event, (Done, Error)):
                self.ended = True
                break
        if entries:  # the stream moves: its job is alive, and is looked up after 2 polls of silence
            self.next_check = time.monotonic() + 2 * self.poll
        return out

    def due(self) -> bool:
        now = time.monotonic()
        return bool(self.deadline and now > self.deadline) or now >= self.next_check

    def check(self) -> list[FollowEvent]:
        """Blocking (Redis): the follower's timeout, a job that ended without a reply, or the queue's position."""
        now = time.monotonic()
        if self.deadline and now > self.deadline:
            self.ended = True
            return [Error(code="timeout", message="The reply is taking too long; it will not be shown here.")]
        if now < self.next_check:
            return []
        self.next_check = now + 2 * self.poll
        ended = self.client._ended_without_reply(self.job_id)
        if ended:
            self.ended = True
            return [ended]
        if not self.started:
            return [Waiting(position=self.client.position(self.job_id), workers=self.client.workers_alive())]
        return []


class TurnClient:
    def __init__(self, settings: Settings, connection: redis.Redis | None = None) -> None:
        self.settings = settings
        self.r = connection if connection is not None else connect(settings.redis_url)
        self.store = SessionStore(self.r, settings.session_ttl, settings.stream_ttl, settings.stream_maxlen, settings.history_keep)
        self.queue = Queue(settings.queue, connection=self.r, serializer=JSONSerializer)
        self.hub = StreamHub(self.r, settings.stream_ttl)

    # -- validation -----------------------------------------------------------------------------

    def clean_text(self, text: str | None) -> str:
        text = (text or "").strip()
        if not text:
            raise BadInput("Your message is empty: type something for the bot to answer.")
        if len(text) > self.settings.max_input_chars:
            raise BadInput(
                f"Your message is {len(text)} characters long; the limit is {self.settings.max_input_chars}. "
                "Please shorten it."
            )
        return text

    def clean_title(self, title: str | None) -> str:
        title = " ".join((title or "").split())
        if not title:
            raise BadInput('A story needs a title, for example: /story The Lost Crown')
        if len(title) > self.settings.max_title_chars:
            raise BadInput(
                f"That title is {len(title)} characters long; the limit is {self.settings.max_title_chars}. "
                "Please choose a shorter one."
            )
        return title

    # -- turns ----------------------------------------------------------------------------------

    # Each turn method takes an optional job_id and an optional `Owed` record: a bot records "reply owed" before
    # it enqueues (so that a crash in between loses nothing), in the turn's own round trips, under an id it chose.

    # A message or a new story takes two round trips to Redis: the channel's mode, sessions and the claim of
    # its turn in one (`SessionStore.open_turns`), then the job with the session's lease (and a new session, or
    # the mode) in one transaction. (A message took four: the mode, the session, the claim, the job.) Several
    # turns, of any channels, take the same two (`submit_many`): a bot's burst of turns goes in a few round trips.

    def say(self, channel: str, text: str | None, *, user: str | None = None, reply_to: dict | None = None,
            job_id: str | None = None, owed: Owed | None = None) -> Submitted:
        """A message in the channel: a chat turn, or the next action of the channel's story."""
        return self.submit(Turn("say", channel, text, user, reply_to), job_id=job_id, owed=owed)

    def chat(self, channel: str, text: str | None, *, user: str | None = None, reply_to: dict | None = None,
             job_id: str | None = None, max_new_tokens: int | None = None, ignore_eos: bool = False,
             owed: Owed | None = None) -> Submitted:
        """A chat turn, whatever the channel's mode was (a running story is kept).

        max_new_tokens (at most the worker's own limit) and ignore_eos fix a reply's length: `shallow bench`.
        """
        return self.submit(Turn("chat", channel, text, user, reply_to, max_new_tokens, ignore_eos), job_id=job_id, owed=owed)

    def start_story(self, channel: str, title: str | None, *, user: str | None = None, reply_to: dict | None = None,
                    job_id: str | None = None, owed: Owed | None = None) -> Submitted:
        """A new story from its title; its first passage is the reply. A busy channel keeps its story: refused."""
        return self.submit(Turn("story", channel, title, user, reply_to), job_id=job_id, owed=owed)

    def submit(self, turn: Turn, *, job_id: str | None = None, owed: Owed | None = None) -> Submitted:
        """One turn; BadInput or ChannelBusy (or Redis' error) when it is refused."""
        (result,) = self.submit_many([turn], [job_id or new_id()], [owed])
        if isinstance(result, BaseException):
            raise result
        return result

    def submit_many(self, turns: Sequence[Turn], job_ids: Sequence[str],
                    owed: Sequence[Owed | None]) -> list[Submitted | Exception]:
        """Several turns in the round trips of one: what each became, in order; a refused or failed turn's
        exception (BadInput, ChannelBusy, Redis' error) in its place, the others enqueued all the same.

        A turn whose channel another job holds (or a turn earlier in the list) is settled after the others are
        enqueued, in round trips of its own: refused while that job is in flight, enqueued when it has ended."""
        results: list[Submitted | Exception | None] = [None] * len(turns)
        texts: list[str] = [""] * len(turns)
        for i, turn in enumerate(turns):
            try:
                texts[i] = self.clean_title(turn.text) if turn.kind == "story" else self.clean_text(turn.text)
            except BadInput as exc:
                results[i] = exc
        live = [i for i in range(len(turns)) if results[i] is None]
        hold = self._hold()
        try:
            views = self.store.open_turns([(turns[i].channel, job_ids[i], hold, _first_record(job_ids[i], owed[i]))
                                           for i in live]) if live else []
        except redis.RedisError as exc:
            return [exc if r is None else r for r in results]
        plans = []
        for i, view in zip(live, views):
            if isinstance(view, Exception):
                results[i] = view
            else:
                plans.append((i, self._plan(turns[i], texts[i], job_ids[i], view, owed[i])))
        free = [(i, plan) for i, plan in plans if plan.claimed_by is None]
        for (i, _), result in zip(free, self._write_all([plan for _, plan in free])):
            results[i] = result
        for i, plan in plans:
            if plan.claimed_by is not None:
                try:
                    self._claim(plan)
                    (results[i],) = self._write_all([plan])
                except (ChannelBusy, redis.RedisError) as exc:
                    results[i] = exc
        return results  # type: ignore[return-value]  # every place is filled

    def _plan(self, turn: Turn, text: str, job_id: str, view: TurnView, owed: Owed | None) -> _Plan:
        """What the turn writes, from its channel as `open_turns` found it."""
        limits = {"max_new_tokens": turn.max_new_tokens, "ignore_eos": turn.ignore_eos}
        common = {"user": turn.user, "reply_to": turn.reply_to, "job_id": job_id, "claimed_by": view.claimed_by,
                  "kept": view.kept(), "owed": owed}
        if turn.kind == "story":
            return _Plan(Session.new(turn.channel, Mode.STORY, text), "", f"/story {text}", new_session=True, **common)
        if turn.kind == "say" and view.mode is Mode.STORY and view.story is not None:
            story = view.story
            return _Plan(story, story_action(text, story.choices), text, **common)
        # a chat turn (or a message in a channel whose story expired: back to chat) in the channel's chat session;
        # the session is made (with the job) on first use, and the channel's mode becomes chat
        return _Plan(view.chat or Session.new(turn.channel, Mode.CHAT), text, text, new_session=view.chat is None,
                     set_mode=view.mode is not Mode.CHAT, **limits, **common)

    def _hold(self) -> int:
        """How long a turn's claim of its channel lasts: past every attempt of its job, then it lapses."""
        s = self.settings
        return s.job_timeout * (s.job_retries + 1) + 120

    def end_story(self, channel: str) -> Session | None:
        return self.store.end_story(channel)

    def reset(self, channel: str) -> bool:
        """Forget the channel's conversation and story; False when there was nothing to forget."""
        job_id = self.store.turn_in_flight(channel)
        if job_id:
            self.cancel(job_id)
            self.store.release_turn(channel, job_id)
        return self.store.reset(channel)

    def _settled(self, job_id: str) -> bool:
        """True when the job holding a channel has ended for good (then the channel is freed)."""
        try:
            job = Job.fetch(job_id, connection=self.r, serializer=JSONSerializer)
        except NoSuchJobError:
            return not self.r.exists(stream_key(job_id))  # gone and never started: a stale claim
        return job.get_status() in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED, JobStatus.FINISHED)

    def _claim(self, plan: _Plan) -> None:
        """Claim the channel for a turn that found it held: ChannelBusy while the holder is in flight."""
        channel, job_id, hold = plan.session.channel, plan.job_id, self._hold()
        current = plan.claimed_by
        if current == "":  # the holder let go between open_turns' claim and its read: claim again
            current = self.store.claim_turn(channel, job_id, hold)
        if current is not None:
            if not self._settled(current):
                raise ChannelBusy("The bot is still writing its last reply here; wait for it, or cancel it.", current)
            self.store.release_turn(channel, current)
            if self.store.claim_turn(channel, job_id, hold) is not None:
                raise ChannelBusy("Another message got here first; try again in a moment.", current)

    def _write_all(self, plans: list[_Plan]) -> list[Submitted | Exception]:
        """Enqueue the turns, each job with its session's new lease (and a new session, or the mode, and its owed
        record), all in one transaction, one round trip; a turn whose commands failed gets the first error, and one
        that could not be written at all (an error of its own, not Redis') gets that error, its channel let go."""
        if not plans:
            return []
        spans = []
        try:
            with self.r.pipeline() as p:
                p.multi()  # RQ's enqueue starts the transaction when nothing has: here, for all the turns
                for plan in plans:
                    start = len(p.command_stack)
                    try:
                        spans.append((start, *self._write_one(p, plan)))
                    except redis.RedisError:
                        raise
                    except Exception as exc:  # this turn cannot be written (a value JSON cannot hold): it fails alone
                        logger.exception("turn %s in %s could not be enqueued", plan.job_id, plan.session.channel)
                        del p.command_stack[start:]  # its commands so far: none of it is sent
                        spans.append((start, start, exc))
                replies = p.execute(raise_on_error=False)
        except redis.RedisError as exc:
            return [exc] * len(plans)
        results: list[Submitted | Exception] = []
        for plan, (start, end, submitted) in zip(plans, spans):
            if isinstance(submitted, Exception):
                try:
                    self.store.release_turn(plan.session.channel, plan.job_id)  # its claim, taken by open_turns
                except redis.RedisError:
                    logger.warning("the claim of %s stays until a later turn finds it stale", plan.session.channel)
                results.append(submitted)
                continue
            error = next((r for r in replies[start:end] if isinstance(r, Exception)), None)
            if error is None:
                logger.info("enqueued job %s: %s turn in %s", submitted.job_id, submitted.session.mode.value,
                            submitted.session.channel)
            results.append(error or submitted)
        return results

    def _write_one(self, p: redis.client.Pipeline, plan: _Plan) -> tuple[int, Submitted]:
        """Queue one turn's commands in the transaction `p`: where they end, and what the turn becomes."""
        s = self.settings
        session = plan.session
        request = TurnRequest(
            channel=session.channel, mode=session.mode, session_id=session.id, text=plan.text,
            user_text=plan.user_text, job_id=plan.job_id, title=session.title, user=plan.user,
            reply_to=plan.reply_to or {}, max_new_tokens=plan.max_new_tokens, ignore_eos=plan.ignore_eos,
        )
        self.queue.enqueue(
            JOB_FUNCTION,
            request.to_json(),
            job_id=request.job_id,
            job_timeout=s.job_timeout,
            retry=Retry(max=s.job_retries, enqueue_at_front=True) if s.job_retries else None,
            result_ttl=s.stream_ttl,
            failure_ttl=s.session_ttl,
            description=f"{session.mode.value} turn in {session.channel}",
            pipeline=p,
        )
        if plan.new_session:
            self.store.write_new(session, p)
        elif plan.set_mode:
            self.store.set_mode(session.channel, session.mode, pipeline=p)
        # a new lease for the keys that exist and were not just written with one (an EXPIRE of a key
        # that is not there does nothing: a chat turn in a channel without a story sends 3 EXPIREs,
        # not 5 and a SET)
        self.store.touch(session.channel, pipeline=p,
                         modes=tuple(m for m in plan.kept if not (plan.new_session and m is session.mode)),
                         mode_key=not (plan.new_session or plan.set_mode))
        submitted = Submitted(job_id=request.job_id, request=request, session=session)
        if plan.owed is not None:
            p.hset(plan.owed.key, request.job_id, plan.owed.then(submitted))
        return len(p.command_stack), submitted

    # -- following ------------------------------------------------------------------------------

    def follow(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0) -> Iterator[FollowEvent]:
        """The reply's events in order, ending with Done or Error; Waiting while the job has not started.

        A job that failed for good without saying so (its last worker died) ends with an Error, and a
        follower that waits longer than `timeout` seconds gets one too. The job is looked up only once its
        stream has been silent for `2 * poll` seconds: a reply that is being written is alive (looking up
        each followed job every 2 polls as well took the follower's CPU from ~100 to ~120 us an event,
        `python -m bench.follow_cost --chunks 50` on a 2-core box).
        """
        f = _Following(self, job_id, timeout, poll)
        sub = self.hub.subscribe(f.key)  # None if this client follows the reply already: then a read of its own
        try:
            while True:
                if sub is not None:
                    entries = sub.get(timeout=poll)
                else:
                    resp = self.r.xread({f.key: f.last}, block=int(poll * 1000), count=200)
                    entries = [entry for _, batch in resp or [] for entry in batch]
                yield from f.events(entries)
                if not f.ended and f.due():
                    yield from f.check()
                if f.ended:
                    return
        finally:
            self.hub.unsubscribe(sub)

    async def follow_async(self, job_id: str, *, timeout: float | None = None, poll: float = 1.0) -> AsyncIterator[FollowEvent]:
        """`follow` for a coroutine (the chat bots): the hub hands the stream's entries to this asyncio loop,
        one wake-up of the loop for all the streams of a read, with no thread per reply (a thread each, the
        way the bots followed before session 19, took ~140 us of CPU an event at 256 replies on a 2-core box,
        `python -m bench.follow_cost --bots`). Its rare blocking parts, the hub's wake-up and the job's
        look-up, run in a worker thread."""
        loop = asyncio.get_running_loop()
        f = _Following(self, job_id, timeout, poll)
        sub, wake = self.hub.join(f.key, "0-0", loop)  # the hub's lock only: no round trip
        try:
            if wake:
                await asyncio.to_thread(self.hub.ring, sub)
            while True:
                if isinstance(sub, AsyncSubscription):
                    entries = await sub.get_async(poll)
                else:  # this client follows the reply already: a read of its own
                    resp = await asyncio.to_thread(self.r.xread, {f.key: f.last}, block=int(poll * 1000), count=200)
                    entries = [entry for _, batch in resp or [] for entry in batch]
                for event in f.events(entries):
                    yield event
                if not f.ended and f.due():
                    for event in await asyncio.to_thread(f.check):
                        yield event
                if f.ended:
                    return
        finally:
            self.hub.unsubscribe(sub)

    def _ended_without_reply(self, job_id: str) -> Error | None:
        try:
            job = Job.fetch(job_id, connection=self.r, serializer=JSONSerializer)
        except NoSuchJobError:
            if self.r.xlen(stream_key(job_id)):
                return None  # the stream has it all; the done event is on its way
            return Error(code="lost", message="This reply was lost (its job no longer exists). Please send it again.")
        status = job.get_status()
        if status in (JobStatus.FAILED, JobStatus.STOPPED, JobStatus.CANCELED):
            if self.r.xlen(stream_key(job_id)) and self._stream_has_end(job_id):
                return None
            request_channel = (job.args[0] or {}).get("channel") if job.args else None
            if request_channel:
                self.store.release_turn(request_channel, job_id)
            why = "was cancelled" if status is not JobStatus.FAILED else "failed"
            return Error(code=str(status.value), message=f"The reply {why}. Please try again.")
        return None

    def _stream_has_end(self, job_id: str) -> bool:
        last = self.r.xrevrange(stream_key(job_id), count=1)
        if not last:
            return False
        return isinstance(decode_event(last[0][1][EVENT_FIELD.encode()]), (Done, Error))

    def cancel(self, job_id: str) -> None:
        """Ask the worker to stop this reply (it ends with what it wrote so far); drop it if not started."""
        self.r.set(cancel_key(job_id), 1, ex=self.settings.stream_ttl)
        try:
            job = Job.fetch(job_id, connection=self.r, serializer=JSONSerializer)
        except NoSuchJobError:
            return
        if job.get_status() is JobStatus.QUEUED:
            job.cancel()

    # -- the queue ------------------------------------------------------------------------------

    def position(self, job_id: str) -> int | None:
        pos = self.queue.get_job_position(job_id)
        return None if pos is None else pos + 1

    def workers_alive(self) -> int:
        return len(Worker.all(queue=self.queue))

    def status(self) -> dict[str, object]:
        workers = Worker.all(queue=self.queue)
        return {
            "queue": self.queue.name,
            "queued": self.queue.count,
            "running": StartedJobRegistry(queue=self.queue).count,
            "failed": FailedJobRegistry(queue=self.queue).count,
            "workers": [
                {"name": w.name, "state": str(getattr(w.get_state(), "value", w.get_state())), "job": w.get_current_job_id()}
                for w in workers
            ],
        }
