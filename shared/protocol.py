"""The job/stream protocol: what a bot puts on the queue and what the worker streams back.

Both sides speak JSON only (RQ's JSONSerializer for the job, one JSON document per stream entry),
so either side can be rewritten in another language, and nothing unpickles data from Redis.
Every document carries `v`; a reader refuses a version it does not know instead of guessing.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Union

PROTOCOL_VERSION = 1

# The job function, named by its import path so that bots never import worker code.
JOB_FUNCTION = "worker.jobs.run_turn"
# Stream entries carry one field holding the event's JSON.
EVENT_FIELD = "e"


class Mode(str, Enum):
    CHAT = "chat"
    STORY = "story"


class ProtocolError(ValueError):
    """A payload or event that this version cannot read."""


def new_id() -> str:
    return uuid.uuid4().hex


def stream_key(job_id: str) -> str:
    return f"shallow:stream:{job_id}"


def cancel_key(job_id: str) -> str:
    return f"shallow:cancel:{job_id}"


def done_key(job_id: str) -> str:
    """Set once, atomically with the reply's commit: the marker that makes a retried job a no-op."""
    return f"shallow:done:{job_id}"


@dataclass(frozen=True)
class TurnRequest:
    """One user turn: the payload of one RQ job.

    `text` is what the model is asked (for a story, the action already phrased); `user_text` is what the
    person typed, kept for the session. `session_id` ties the reply to the session it was asked in,
    so a reply that lands after a reset is not written into the new session.
    """

    channel: str
    mode: Mode
    session_id: str
    text: str
    user_text: str
    job_id: str = field(default_factory=new_id)
    title: str | None = None  # story title
    user: str | None = None  # platform user id or name, for logs and allowlists
    reply_to: dict[str, Any] = field(default_factory=dict)  # opaque to the worker: where the bot delivers
    max_new_tokens: int | None = None  # overrides the worker's setting for this turn (never above it)
    ignore_eos: bool = False  # write exactly max_new_tokens (benchmarks: runs that compare)
    created_at: float = field(default_factory=time.time)
    v: int = PROTOCOL_VERSION

    def to_json(self) -> dict[str, Any]:
        # the fields as they are (all plain JSON values but the mode), not `asdict`'s recursive deep copy: 1.3 us
        # against 24 us here, of the ~450 us of CPU a bot's message costs it (`python -m bench.enqueue_cost`)
        data = dict(vars(self))
        data["mode"] = self.mode.value
        data["reply_to"] = dict(self.reply_to)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TurnRequest:
        if not isinstance(data, dict):
            raise ProtocolError(f"a turn must be a JSON object, got {type(data).__name__}")
        if data.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"turn protocol version {data.get('v')!r} is not {PROTOCOL_VERSION}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ProtocolError(f"unknown turn fields: {sorted(unknown)}")
        try:
            payload = dict(data, mode=Mode(data["mode"]))
            return cls(**payload)
        except (KeyError, TypeError, ValueError) as exc:
            raise ProtocolError(f"malformed turn: {exc}") from None


class EventType(str, Enum):
    START = "start"  # an attempt began on a worker; a new attempt replaces any partial text
    CHUNK = "chunk"  # the next piece of text
    DONE = "done"  # the final text, the story choices and the token counts
    ERROR = "error"  # the reply failed for good


@dataclass(frozen=True)
class Start:
    attempt: int
    worker: str
    type: EventType = EventType.START


@dataclass(frozen=True)
class Chunk:
    text: str
    attempt: int = 1
    type: EventType = EventType.CHUNK


@dataclass(frozen=True)
class Done:
    text: str
    prompt_tokens: int
    completion_tokens: int
    choices: list[str] = field(default_factory=list)
    finish_reason: str = "stop"  # stop | length | cancelled
    attempt: int = 1
    model_seconds: float = 0.0  # time the worker spent in the model for this reply (the rest is pipeline)
    # where the worker spent the rest, in ms: rq_start (RQ's start of the job -> this job's code),
    # before_model (the job's reads, the history and its prompt fitted, the start event), flush (after the
    # model's last piece, the wait for the reply's chunks being written then; since session 18 the text not yet sent
    # goes with the done event, in the commit), sent_at (the worker's wall clock in ms, unix
    # time, as it commits the reply); what `shallow bench` splits its overhead by
    pipeline_ms: dict[str, float] = field(default_factory=dict)
    type: EventType = EventType.DONE


@dataclass(frozen=True)
class Error:
    code: str  # bad_request | model_error | timeout | abandoned | ...
    message: str  # written for the user
    type: EventType = EventType.ERROR


Event = Union[Start, Chunk, Done, Error]
_EVENT_CLASSES = {EventType.START: Start, EventType.CHUNK: Chunk, EventType.DONE: Done, EventType.ERROR: Error}


def encode_event(event: Event) -> str:
    data = dict(vars(event))  # plain JSON values: no need for `asdict`'s deep copy (a worker encodes every chunk)
    data["type"] = event.type.value
    data["v"] = PROTOCOL_VERSION
    return json.dumps(data, ensure_ascii=False)


def decode_event(raw: str | bytes) -> Event:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"stream event is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != PROTOCOL_VERSION:
        raise ProtocolError(f"stream event version {data.get('v') if isinstance(data, dict) else None!r} is not {PROTOCOL_VERSION}")
    try:
        kind = EventType(data.pop("type"))
        data.pop("v")
        return _EVENT_CLASSES[kind](**data)
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"malformed stream event: {exc}") from None
