"""The job function the queue runs: one user turn in, one streamed reply out.

Safe to run twice: a job whose reply was already committed does nothing, and a retried attempt
announces itself on the stream (a `start` event with a higher attempt number) so followers replace the
partial text of the attempt that died.
"""
from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import redis
from rq import get_current_job

from shared.prompts import (
    CHAT_SYSTEM_PROMPT,
    CHOICES_LEAD,
    MAX_CHOICES,
    FALLBACK_CHOICES,
    MIN_CHOICES,
    STORY_BEGIN,
    Message,
    clean_choice,
    fit_messages,
    parse_choices,
    story_system_prompt,
)
from shared.protocol import (
    EVENT_FIELD,
    Chunk,
    Done,
    Error,
    Event,
    Mode,
    ProtocolError,
    Start,
    TurnRequest,
    cancel_key,
    done_key,
    encode_event,
    stream_key,
)
from shared.sessions import SessionStore
from shared.settings import Settings
from worker.backends import Backend

logger = logging.getLogger(__name__)

FORCED_CHOICES = 3  # when the model writes none itself: three, one line each
CHUNK_INTERVAL = 0.03  # seconds between a reply's chunk writes (the first goes at once)
CANCEL_INTERVAL = 0.25  # seconds between reads of the cancel flags of the replies being written
FLUSH_TIMEOUT = 60.0  # a job waits this long at most for its text to be written, then fails (and is retried)
CHOICE_TRIES = 3  # a choice that comes out empty (or letterless) is asked for again, sampled
RETRY_TEMPERATURE = 0.8  # greedy decoding would only repeat the empty choice


class StreamWriter:
    """Writes the chunks of every reply this process is streaming, all in one Redis pipeline per interval.

    A reply's text goes out at most every CHUNK_INTERVAL (its first piece at once). Written by each job
    for itself, that is one round trip per reply per interval: ~8,500 a second at 256 replies at once,
    each taking the interpreter lock that the model's loop needs too. Here one thread writes whatever
    every reply has pending in one pipeline, and reads all their cancel flags in the same round trip.

    Order per stream is kept: a job hands its start event to the writer (`start`, written before any of its
    text), and before its error or done event it calls `flush` (which returns once all its chunks are in
    Redis) or `take` (its unsent text, which the commit writes). A failed write is raised in the job on its
    next `add`, `flush` or `take`, so the job fails and RQ retries it. A stream's lease (EXPIRE) is set with
    its start event and renewed with its text only once a quarter of it has passed. The thread ends when no
    stream is open and nothing is left to write (a process between jobs polls nothing), and `open` starts it again.
    """

    def __init__(self, connection: redis.Redis, maxlen: int, ttl: int, interval: float = CHUNK_INTERVAL,
                 cancel_interval: float = CANCEL_INTERVAL) -> None:
        self.r = connection
        self.maxlen = maxlen
        self.ttl = ttl
        self.interval = interval
        self.cancel_interval = cancel_interval
        self.cond = threading.Condition()
        self.pending: dict[str, tuple[list[str], int]] = {}  # stream key -> (text pieces, attempt)
        self.starts: dict[str, str] = {}  # stream key -> its start event (encoded), written before its text
        self.watched: dict[str, str] = {}  # stream key -> its cancel key, for every reply being written
        self.sent_first: set[str] = set()
        self.renewed: dict[str, float] = {}  # stream key -> when its lease (EXPIRE) was last sent (monotonic)
        self.cancelled: set[str] = set()
        self.errors: dict[str, BaseException] = {}
        self.inflight: set[str] = set()  # streams of the batch being written now
        self.urgent = False
        self.thread: threading.Thread | None = None

    def open(self, key: str, cancel: str) -> None:
        with self.cond:
            self.watched[key] = cancel
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._run, name="stream-writer", daemon=True)
                self.thread.start()

    def close(self, key: str) -> None:
        with self.cond:
            self.watched.pop(key, None)
            self.pending.pop(key, None)
            self.starts.pop(key, None)
            self.sent_first.discard(key)
            self.renewed.pop(key, None)
            self.cancelled.discard(key)
            self.errors.pop(key, None)

    def start(self, key: str, event: str) -> None:
        """The reply's start event (encoded), written at once by the writer's thread, before any of its text: the
        job goes on to fit its prompt meanwhile instead of waiting for the round trip."""
        with self.cond:
            self._raise(key)
            self.starts[key] = event
            self.urgent = True
            self.cond.notify_all()

    def add(self, key: str, text: str, attempt: int) -> None:
        with self.cond:
            self._raise(key)
            pieces, _ = self.pending.setdefault(key, ([], attempt))
            pieces.append(text)
            if key not in self.sent_first:  # the first words go at once: they are the time to first token
                self.sent_first.add(key)
                self.urgent = True
                self.cond.notify_all()

    def flush(self, key: str) -> None:
        """Return once every piece added so far is in Redis (raise if writing them failed)."""
        with self.cond:
            if key in self.pending or key in self.starts or key in self.inflight:
                self.urgent = True
                self.cond.notify_all()
                if not self.cond.wait_for(lambda: key not in self.pending and key not in self.starts
                                          and key not in self.inflight, FLUSH_TIMEOUT):
                    raise TimeoutError(f"the reply stream {key} was not written for {FLUSH_TIMEOUT:.0f}s (is Redis stalled?)")
            self._raise(key)

    def take(self, key: str) -> tuple[str, int] | None:
        """The text added for `key` and not yet sent (the pieces joined, and their attempt), taken back so that the
        job writes it itself with its done event: one round trip for a reply's end, not the writer's and then the
        commit's. Waits for a batch of this stream being written now (order); raises if writing one failed."""
        with self.cond:
            if key in self.starts:  # its start event first: written now, not with the commit
                self.urgent = True
                self.cond.notify_all()
            if (key in self.starts or key in self.inflight) and not self.cond.wait_for(
                    lambda: key not in self.starts and key not in self.inflight, FLUSH_TIMEOUT):
                raise TimeoutError(f"the reply stream {key} was not written for {FLUSH_TIMEOUT:.0f}s (is Redis stalled?)")
            self._raise(key)
            pending = self.pending.pop(key, None)
        return None if pending is None else ("".join(pending[0]), pending[1])

    def is_cancelled(self, key: str) -> bool:
        return key in self.cancelled

    def _raise(self, key: str) -> None:
        exc = self.errors.pop(key, None)
        if exc is not None:
            raise exc

    def _run(self) -> None:
        last_check = last_warning = 0.0
        while True:
            with self.cond:
                if not self.urgent:
                    self.cond.wait(self.interval)
                if not self.watched and not self.pending and not self.starts:
                    self.thread = None  # nothing to write or watch: the next `open` starts the thread again
                    return
                self.urgent = False
                batch, self.pending = self.pending, {}
                starts, self.starts = self.starts, {}
                self.inflight = set(batch) | set(starts)
                now = time.monotonic()
                watched = list(self.watched.items()) if now - last_check >= self.cancel_interval else []
            if watched:
                last_check = now
            try:
                if batch or starts or watched:
                    # the streams written, in order (a start event before its text), and each one's commands
                    writes: list[tuple[str, int]] = []
                    renew: list[str] = []
                    with self.r.pipeline(transaction=False) as p:
                        for key, event in starts.items():
                            p.xadd(key, {EVENT_FIELD: event}, maxlen=self.maxlen, approximate=True)
                            p.expire(key, self.ttl)
                            renew.append(key)
                            writes.append((key, 2))
                        for key, (pieces, attempt) in batch.items():
                            event = encode_event(Chunk(text="".join(pieces), attempt=attempt))
                            p.xadd(key, {EVENT_FIELD: event}, maxlen=self.maxlen, approximate=True)
                            # the lease its start event set (the done event sets the last) is renewed only once a
                            # quarter of it has passed: not with every chunk, half the commands of a reply's text
                            if key not in starts and now - self.renewed.get(key, -self.ttl) >= self.ttl / 4:
                                p.expire(key, self.ttl)
                                renew.append(key)
                                writes.append((key, 2))
                            else:
                                writes.append((key, 1))
                        for _, cancel in watched:
                            p.exists(cancel)
                        results = p.execute(raise_on_error=False)  # one stream's error is that stream's alone
                    at = 0
                    with self.cond:
                        for key in renew:
                            if key in self.watched:  # not one closed meanwhile: it would stay here for good
                                self.renewed[key] = now
                        for key, n in writes:
                            failed = next((x for x in results[at:at + n] if isinstance(x, Exception)), None)
                            at += n
                            if failed is not None and key in self.watched:
                                self.errors[key] = failed
                        for (key, _), flag in zip(watched, results[at:]):
                            if flag and not isinstance(flag, Exception) and key in self.watched:
                                self.cancelled.add(key)
            except Exception as exc:  # noqa: BLE001 - handed to the jobs whose chunks were not written
                if time.monotonic() - last_warning > 1:
                    last_warning = time.monotonic()
                    logger.warning("writing %d reply streams and reading %d cancel flags in Redis failed: %s",
                                   len(batch) + len(starts), len(watched), exc)
                with self.cond:
                    for key in [*batch, *starts]:
                        if key in self.watched:
                            self.errors[key] = exc
            with self.cond:
                self.inflight = set()
                self.cond.notify_all()


@dataclass
class Runtime:
    """What the worker process holds for its jobs: loaded once, before the first job."""

    settings: Settings
    backend: Backend
    connection: redis.Redis
    store: SessionStore
    name: str = socket.gethostname()
    writer: StreamWriter | None = None

    def __post_init__(self) -> None:
        if self.writer is None:
            self.writer = StreamWriter(self.connection, self.settings.stream_maxlen, self.settings.stream_ttl)


_runtime: Runtime | None = None


def install(runtime: Runtime) -> None:
    global _runtime
    _runtime = runtime


def runtime() -> Runtime:
    if _runtime is None:
        raise RuntimeError("worker.jobs.run_turn runs only inside `shallow worker`, which loads the model first")
    return _runtime


class Stream:
    """The reply stream of one job: bounded, expiring, one JSON event per entry."""

    def __init__(self, rt: Runtime, job_id: str) -> None:
        self.r = rt.connection
        self.key = stream_key(job_id)
        self.cancel = cancel_key(job_id)
        self.ttl = rt.settings.stream_ttl
        self.maxlen = rt.settings.stream_maxlen
        self.writer = rt.writer

    def emit(self, event: Event) -> None:
        """Write one event now, after every chunk given to `chunk` so far."""
        self.writer.flush(self.key)
        with self.r.pipeline(transaction=False) as p:
            p.xadd(self.key, {EVENT_FIELD: encode_event(event)}, maxlen=self.maxlen, approximate=True)
            p.expire(self.key, self.ttl)
            p.execute()

    def open(self) -> None:
        self.writer.open(self.key, self.cancel)

    def close(self) -> None:
        self.writer.close(self.key)

    def chunk(self, text: str, attempt: int) -> None:
        """Text for the stream; the process's writer sends it with the next batch (the first at once)."""
        self.writer.add(self.key, text, attempt)

    def start(self, event: Start) -> None:
        """The start event, through the process's writer (at once, and before any text of this reply)."""
        self.writer.start(self.key, encode_event(event))

    def take_last_chunk(self) -> str:
        """The reply's text not yet in the stream, as an encoded chunk event ('' if none): the commit writes it."""
        last = self.writer.take(self.key)
        return encode_event(Chunk(text=last[0], attempt=last[1])) if last else ""

    def cancelled(self) -> bool:
        return self.writer.is_cancelled(self.key)


def run_turn(payload: dict[str, Any]) -> dict[str, Any]:
    """Generate the reply to one turn, streaming it, and commit it to the session once."""
    rt = runtime()
    job = get_current_job()
    job_id = job.id if job else str(payload.get("job_id", "unknown"))
    entered = time.monotonic()
    rq_start = _since(job.started_at) if job is not None and job.started_at else None
    stream = Stream(rt, job_id)
    try:
        req = TurnRequest.from_json(payload)
    except ProtocolError as exc:
        logger.warning("job %s: refused payload: %s", job_id, exc)
        stream.emit(Error(code="bad_request", message=f"This request could not be read: {exc}"))
        return {"error": str(exc)}
    # one round trip: an attempt counted for nothing is harmless, and so is a history read for a reply already done
    with rt.connection.pipeline(transaction=False) as p:
        p.exists(done_key(req.job_id))
        p.incr(f"shallow:attempt:{req.job_id}")
        p.expire(f"shallow:attempt:{req.job_id}", rt.settings.stream_ttl)
        rt.store.history(req.channel, req.mode, pipeline=p, last=history_room(rt.backend.context_tokens))
        already, attempt, _, raw_history = p.execute()
    if already:
        logger.info("job %s: reply already committed; nothing to do", req.job_id)
        return {"status": "already_done"}
    attempt = int(attempt)
    final_attempt = job is None or not job.retries_left
    started = time.monotonic()
    stream.open()
    try:
        # written by the process's writer at once while this job fits its prompt (it waited for the round trip)
        stream.start(Start(attempt=attempt, worker=job.worker_name if job and job.worker_name else rt.name))
        logger.info("job %s: %s turn in %s (attempt %d)", req.job_id, req.mode.value, req.channel, attempt)
        done = _generate(rt, req, stream, attempt, entered, history=rt.store.parse_history(raw_history))
        taken = time.monotonic()
        # the text the writer has not sent yet goes into the stream with the done event, in the commit's one call
        # (before session 18: a flush through the writer, then the commit); this waits only for a batch in flight
        last_chunk = stream.take_last_chunk()
        timings = dict(done.pipeline_ms)
        timings["flush"] = round(timings.get("flush", 0.0) + (time.monotonic() - taken) * 1000, 2)
        if rq_start is not None:
            timings["rq_start"] = round(rq_start * 1000, 2)
        done = replace(done, pipeline_ms=timings)
    except Exception:
        logger.exception("job %s: generation failed (attempt %d)", req.job_id, attempt)
        if final_attempt:
            stream.emit(Error(code="model_error", message="The model failed to write this reply. Please try again."))
            rt.store.release_turn(req.channel, req.job_id)
        raise  # RQ retries it while retries are left
    finally:
        stream.close()
    # this host's wall clock as the reply is committed with its done event: a follower on the same host
    # (`shallow bench`) tells the commit and the event's delivery apart from the rest of its wait
    done = replace(done, pipeline_ms={**done.pipeline_ms, "sent_at": round(time.time() * 1000, 1)})
    committed = rt.store.commit_reply(
        channel=req.channel,
        mode=req.mode,
        session_id=req.session_id,
        job_id=req.job_id,
        user_text=req.user_text,
        reply=done.text,
        choices=done.choices if req.mode is Mode.STORY else None,
        done_event=encode_event(done),
        last_chunk=last_chunk,
    )
    elapsed = time.monotonic() - started
    logger.info(
        "job %s: %s, %d prompt + %d new tokens in %.1fs (%.1f tokens/s)%s",
        req.job_id, done.finish_reason, done.prompt_tokens, done.completion_tokens, elapsed,
        done.completion_tokens / elapsed if elapsed else 0.0, "" if committed else " (already committed by another attempt)",
    )
    return {"text": done.text, "choices": done.choices, "completion_tokens": done.completion_tokens}


def history_room(context_tokens: int) -> int:
    """The most messages of a session's history that a prompt of `context_tokens` could hold: each takes 4 tokens or
    more of its chat template (Llama-3's and ChatML's 5). A turn reads no more than that of a long session (the
    session keeps its last SHALLOW_HISTORY_KEEP messages: the web page shows them), and `fit_messages` keeps what fits
    of those."""
    return max(2, context_tokens // 4)


def _since(started) -> float | None:
    """Seconds since RQ's `started_at` (a UTC datetime) on this machine's clock; None if it cannot tell."""
    from datetime import datetime, timezone

    try:
        start = started if started.tzinfo else started.replace(tzinfo=timezone.utc)
        return max(0.0, (datetime.now(timezone.utc) - start).total_seconds())
    except (AttributeError, TypeError, ValueError):
        return None


def _generate(rt: Runtime, req: TurnRequest, stream: Stream, attempt: int, entered: float | None = None,
              history: list | None = None) -> Done:
    s = rt.settings
    backend = rt.backend
    max_new = min(req.max_new_tokens or s.generation.max_new_tokens, s.generation.max_new_tokens)
    budget = backend.context_tokens - max_new
    if req.mode is Mode.STORY:
        # room for the choices, should the worker have to ask for them after the passage
        budget -= FORCED_CHOICES * (s.generation.choice_max_tokens + 8) + 16
        system = story_system_prompt(req.title or "Untitled")
        text = req.text or STORY_BEGIN.format(title=req.title or "Untitled")
    else:
        system = CHAT_SYSTEM_PROMPT
        text = req.text
    if history is None:
        history = rt.store.history(req.channel, req.mode, last=history_room(backend.context_tokens))
    messages = fit_messages(system, history, text, backend.count_tokens, budget, getattr(backend, "text_tokens", None))

    parts: list[str] = []  # every chunk streamed, so the final text is exactly what followers saw

    def should_stop() -> bool:
        return stream.cancelled()  # read for all replies at once by the process's stream writer

    def emit(piece: str) -> None:
        """Pieces go to the process's stream writer: the first at once, then batched every CHUNK_INTERVAL."""
        parts.append(piece)
        stream.chunk(piece, attempt)

    started = time.monotonic()
    gen = backend.stream(messages, s.generation, max_new_tokens=max_new, should_stop=should_stop, ignore_eos=req.ignore_eos)
    try:
        for piece in gen:
            emit(piece)
    finally:
        gen.pieces.close()  # type: ignore[attr-defined]
    # no flush here: the writer sends what is pending every CHUNK_INTERVAL, and the job's commit writes the rest
    reply = "".join(parts)
    completion_tokens = gen.completion_tokens
    choices: list[str] = []
    if req.mode is Mode.STORY and gen.finish_reason != "cancelled":
        _, choices = parse_choices(reply)
        if not choices:
            # The model wrote no menu: ask for the choices one line at a time, each prompted with its number.
            choices, extra = _force_choices(rt, messages, reply.rstrip(), emit, should_stop)
            completion_tokens += extra
    model_seconds = time.monotonic() - started
    timings: dict[str, float] = {}
    if entered is not None:
        timings["before_model"] = round((started - entered) * 1000, 2)
    return Done(
        text="".join(parts).strip(),
        prompt_tokens=gen.prompt_tokens,
        completion_tokens=completion_tokens,
        choices=choices,
        finish_reason=gen.finish_reason,
        attempt=attempt,
        model_seconds=round(model_seconds, 4),
        pipeline_ms=timings,
    )


def _force_choices(
    rt: Runtime, messages: list[Message], passage: str, emit: Callable[[str], None], should_stop: Callable[[], bool]
) -> tuple[list[str], int]:
    """Numbered choices for a passage that has none: each line is prompted with its number and generated."""
    written = passage + CHOICES_LEAD
    emit(written[len(passage) :] if passage else CHOICES_LEAD.lstrip())
    choices: list[str] = []
    tokens = 0
    for n in range(1, FORCED_CHOICES + 1):
        choice = ""
        prefix = ("\n" if choices else "") + f"{n}. "
        for attempt in range(CHOICE_TRIES):
            msgs = [*messages, {"role": "assistant", "content": written + prefix}]
            settings = rt.settings.generation
            if attempt and settings.temperature < RETRY_TEMPERATURE:
                settings = replace(settings, temperature=RETRY_TEMPERATURE)
            gen = rt.backend.stream(
                msgs,
                settings,
                max_new_tokens=rt.settings.generation.choice_max_tokens,
                should_stop=should_stop,
                continue_final=True,
                stop_at_newline=True,
            )
            try:
                text = "".join(gen)
            finally:
                gen.pieces.close()  # type: ignore[attr-defined]
            tokens += gen.completion_tokens
            choice = clean_choice(text)
            if gen.finish_reason == "length" and " " in choice:
                choice = choice.rsplit(" ", 1)[0].rstrip(",;:") + "…"  # cut at the limit: drop the half word
            if choice or gen.finish_reason == "cancelled":
                break
        if gen.finish_reason == "cancelled":
            return (choices if len(choices) >= MIN_CHOICES else []), tokens
        if not choice:
            break
        line = prefix + choice
        emit(line)
        written += line
        choices.append(choice)
    # The model could not write them all: the rest of the menu is the stock one, so a reader always has
    # choices (buttons) to go on with.
    for fallback in FALLBACK_CHOICES:
        if len(choices) >= FORCED_CHOICES:
            break
        if fallback not in choices:
            emit(("\n" if choices else "") + f"{len(choices) + 1}. {fallback}")
            choices.append(fallback)
    return choices[:MAX_CHOICES], tokens
