"""The session store in Redis: per-channel chat history and story sessions.

Keys, per channel (a channel is "console:<name>", "discord:<id>", "telegram:<id>", ...):

    shallow:s:<channel>:mode            "chat" or "story": what a plain message in the channel is
    shallow:s:<channel>:<mode>          hash: id, title, choices (JSON), created_at, turns
    shallow:s:<channel>:<mode>:turns    list of JSON messages {role, content, job_id, at}
    shallow:s:<channel>:inflight        the job id of the reply being written (one turn at a time)

Every key expires `session_ttl` seconds after the channel was last used, and a history keeps its last `keep`
messages (SHALLOW_HISTORY_KEEP, 2,048: more than a prompt of the default context holds), so a channel that talks every day does not
grow without end. The worker commits a reply
with one Lua script, so the user's turn, the reply, the story's new choices, the done event on the
reply stream and the marker that makes a retried job a no-op land together or not at all.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import redis

from shared.prompts import Message
from shared.protocol import EVENT_FIELD, Mode, done_key, new_id, stream_key

_COMMIT = """
-- KEYS: done marker, session hash, turns list, reply stream, inflight key
-- ARGV: job id, session id, user turn, reply turn, choices JSON or '', done event,
--       done ttl, session ttl, stream ttl, stream maxlen, stream field name, the reply's last chunk event or ''
--       (its text not yet in the stream: written just before the done event, in the same call), messages kept
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', tonumber(ARGV[7])) then
  return 0
end
if redis.call('HGET', KEYS[2], 'id') == ARGV[2] then
  redis.call('RPUSH', KEYS[3], ARGV[3], ARGV[4])
  redis.call('LTRIM', KEYS[3], -tonumber(ARGV[13]), -1)
  redis.call('HINCRBY', KEYS[2], 'turns', 1)
  if ARGV[5] ~= '' then redis.call('HSET', KEYS[2], 'choices', ARGV[5]) end
  redis.call('EXPIRE', KEYS[2], tonumber(ARGV[8]))
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[8]))
end
if ARGV[12] ~= '' then redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', ARGV[11], ARGV[12]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[10], '*', ARGV[11], ARGV[6])
redis.call('EXPIRE', KEYS[4], tonumber(ARGV[9]))
if redis.call('GET', KEYS[5]) == ARGV[1] then redis.call('DEL', KEYS[5]) end
return 1
"""


def _key(channel: str, *parts: str) -> str:
    return ":".join(("shallow:s", channel, *parts))


@dataclass(frozen=True)
class Session:
    """One conversation in a channel: a chat, or a story with its title and the choices last offered."""

    channel: str
    mode: Mode
    id: str
    title: str | None = None
    choices: list[str] = field(default_factory=list)
    turns: int = 0  # completed user/assistant exchanges
    created_at: float = 0.0

    @classmethod
    def new(cls, channel: str, mode: Mode, title: str | None = None) -> Session:
        """A new session, not yet written (`SessionStore.write_new` queues its writes)."""
        return cls(channel=channel, mode=mode, id=new_id(), title=title, created_at=time.time())


@dataclass(frozen=True)
class TurnView:
    """What a message needs to know about its channel, read in one round trip (`SessionStore.open_turns`)."""

    mode: Mode
    chat: Session | None
    story: Session | None
    claimed_by: str | None  # None: the turn is ours; else the job holding the channel ("": released meanwhile)

    def kept(self) -> tuple[Mode, ...]:
        """The modes whose session the channel has."""
        return tuple(m for m, session in ((Mode.CHAT, self.chat), (Mode.STORY, self.story)) if session is not None)


class SessionStore:
    def __init__(self, connection: redis.Redis, ttl: int, stream_ttl: int = 3600, stream_maxlen: int = 4000,
                 keep: int = 2048) -> None:
        self.r = connection
        self.ttl = ttl
        self.stream_ttl = stream_ttl
        self.stream_maxlen = stream_maxlen
        self.keep = keep  # messages a session's history keeps, the last ones (SHALLOW_HISTORY_KEEP)
        self._commit = connection.register_script(_COMMIT)

    # --- reading -------------------------------------------------------------------------------

    def mode(self, channel: str) -> Mode:
        raw = self.r.get(_key(channel, "mode"))
        return Mode(raw.decode()) if raw else Mode.CHAT

    def get(self, channel: str, mode: Mode) -> Session | None:
        return self._session(channel, mode, self.r.hgetall(_key(channel, mode.value)))

    @staticmethod
    def _session(channel: str, mode: Mode, data: dict) -> Session | None:
        if not data or b"id" not in data:
            return None
        d = {k.decode(): v.decode() for k, v in data.items()}
        return Session(
            channel=channel,
            mode=mode,
            id=d["id"],
            title=d.get("title") or None,
            choices=json.loads(d.get("choices") or "[]"),
            turns=int(d.get("turns") or 0),
            created_at=float(d.get("created_at") or 0),
        )

    def history(self, channel: str, mode: Mode, pipeline: redis.client.Pipeline | None = None,
                last: int | None = None) -> list[Message] | None:
        """The session's exchanges so far (with `last`, only its last messages: what a prompt has room for); with
        `pipeline`, queued there (returns None): `parse_history` reads the pipeline's answer."""
        start = -last if last else 0
        if pipeline is not None:
            pipeline.lrange(_key(channel, mode.value, "turns"), start, -1)
            return None
        return self.parse_history(self.r.lrange(_key(channel, mode.value, "turns"), start, -1))

    @staticmethod
    def parse_history(raw: list) -> list[Message]:
        out = []
        for item in raw:
            turn = json.loads(item)
            out.append({"role": turn["role"], "content": turn["content"]})
        return out

    # --- writing -------------------------------------------------------------------------------

    def create(self, channel: str, mode: Mode, title: str | None = None) -> Session:
        """A new session of `mode` in the channel, replacing any there; the channel's mode becomes `mode`.
        (The client writes a turn's new session with its job instead: `TurnClient`.)"""
        session = Session.new(channel, mode, title)
        with self.r.pipeline() as p:
            self.write_new(session, p)
            p.execute()
        return session

    def write_new(self, session: Session, p: redis.client.Pipeline) -> None:
        """Queue the commands that make `session` the channel's session of its mode, and its mode the channel's."""
        key = _key(session.channel, session.mode.value)
        mapping = {"id": session.id, "title": session.title or "", "choices": "[]", "turns": 0,
                   "created_at": session.created_at}
        p.delete(key, _key(session.channel, session.mode.value, "turns"))
        p.hset(key, mapping=mapping)
        p.expire(key, self.ttl)
        p.set(_key(session.channel, "mode"), session.mode.value, ex=self.ttl)

    def open_turns(self, turns: Sequence[tuple[str, str, int, Callable | None]]) -> list[TurnView | redis.RedisError]:
        """One round trip for several messages (channel, job_id, hold, also): each one's channel mode, its chat and
        story sessions, and the claim of the channel's turn for `job_id` (held `hold` seconds; `claimed_by` names the
        job already there, if any); also(pipeline): commands of the caller's, sent first in the turn's part. A turn
        whose commands failed (a key of the wrong type) gets the first error in its place. Two turns of one channel:
        the first in the list claims it, and the second finds it claimed by the first."""
        spans = []
        with self.r.pipeline(transaction=False) as p:
            for channel, job_id, hold, also in turns:
                start = len(p.command_stack)
                if also is not None:
                    also(p)
                inflight = _key(channel, "inflight")
                p.get(_key(channel, "mode"))
                p.hgetall(_key(channel, Mode.CHAT.value))
                p.hgetall(_key(channel, Mode.STORY.value))
                p.set(inflight, job_id, nx=True, ex=hold)
                p.get(inflight)
                spans.append((start, len(p.command_stack)))
            replies = p.execute(raise_on_error=False)
        views: list[TurnView | redis.RedisError] = []
        for (channel, *_), (start, end) in zip(turns, spans):
            error = next((r for r in replies[start:end] if isinstance(r, Exception)), None)
            if error is not None:
                views.append(error)
                continue
            mode, chat, story, claimed, holder = replies[end - 5 : end]
            views.append(TurnView(
                mode=Mode(mode.decode()) if mode else Mode.CHAT,
                chat=self._session(channel, Mode.CHAT, chat),
                story=self._session(channel, Mode.STORY, story),
                claimed_by=None if claimed else (holder.decode() if holder else ""),
            ))
        return views

    def end_story(self, channel: str) -> Session | None:
        """End the channel's story; returns it, or None when there was none. The channel goes back to chat."""
        story = self.get(channel, Mode.STORY)
        with self.r.pipeline() as p:
            p.delete(_key(channel, "story"), _key(channel, "story", "turns"))
            p.set(_key(channel, "mode"), Mode.CHAT.value, ex=self.ttl)
            p.execute()
        return story

    def set_mode(self, channel: str, mode: Mode, pipeline: redis.client.Pipeline | None = None) -> None:
        """The channel's mode; into `pipeline` (the caller executes it) when given."""
        (pipeline if pipeline is not None else self.r).set(_key(channel, "mode"), mode.value, ex=self.ttl)

    def reset(self, channel: str) -> bool:
        """Forget the channel's chat and story. Returns False when there was nothing to forget."""
        sessions = [_key(channel, m.value) for m in Mode]
        had = bool(self.r.exists(*sessions))
        self.r.delete(*sessions, *(k + ":turns" for k in sessions), _key(channel, "mode"))
        return had

    def touch(self, channel: str, pipeline: redis.client.Pipeline | None = None, modes: tuple[Mode, ...] = tuple(Mode),
              mode_key: bool = True) -> None:
        """Keep the channel's keys another session TTL: the sessions of `modes` and, with `mode_key`, the channel's
        mode; into `pipeline` (the caller executes it) when given."""
        with self.r.pipeline() as own:
            p = pipeline if pipeline is not None else own
            for m in modes:
                p.expire(_key(channel, m.value), self.ttl)
                p.expire(_key(channel, m.value, "turns"), self.ttl)
            if mode_key:
                p.expire(_key(channel, "mode"), self.ttl)
            if pipeline is None:
                own.execute()

    # --- one turn at a time --------------------------------------------------------------------

    def claim_turn(self, channel: str, job_id: str, ttl: int) -> str | None:
        """Mark `job_id` as the channel's reply in progress. Returns the job id already there, if any."""
        key = _key(channel, "inflight")
        if self.r.set(key, job_id, nx=True, ex=ttl):
            return None
        current = self.r.get(key)
        if current is None:  # it was released between the two calls
            return self.claim_turn(channel, job_id, ttl)
        return current.decode()

    def turn_in_flight(self, channel: str) -> str | None:
        raw = self.r.get(_key(channel, "inflight"))
        return raw.decode() if raw else None

    def release_turn(self, channel: str, job_id: str) -> None:
        """Free the channel, if `job_id` still holds it."""
        key = _key(channel, "inflight")
        with self.r.pipeline() as p:
            while True:
                try:
                    p.watch(key)
                    if p.get(key) != job_id.encode():
                        return
                    p.multi()
                    p.delete(key)
                    p.execute()
                    return
                except redis.WatchError:
                    continue

    def commit_reply(
        self,
        *,
        channel: str,
        mode: Mode,
        session_id: str,
        job_id: str,
        user_text: str,
        reply: str,
        choices: list[str] | None,
        done_event: str,
        last_chunk: str = "",
    ) -> bool:
        """Write the exchange and the done event, once (after `last_chunk`, an encoded chunk event, when given: the
        reply's text not yet in its stream). False when this job was already committed (nothing is written)."""
        now = time.time()
        user_turn = json.dumps({"role": "user", "content": user_text, "job_id": job_id, "at": now}, ensure_ascii=False)
        reply_turn = json.dumps({"role": "assistant", "content": reply, "job_id": job_id, "at": now}, ensure_ascii=False)
        keys = [
            done_key(job_id),
            _key(channel, mode.value),
            _key(channel, mode.value, "turns"),
            stream_key(job_id),
            _key(channel, "inflight"),
        ]
        args = [
            job_id,
            session_id,
            user_turn,
            reply_turn,
            json.dumps(choices, ensure_ascii=False) if choices is not None else "",
            done_event,
            max(self.ttl, self.stream_ttl),
            self.ttl,
            self.stream_ttl,
            self.stream_maxlen,
            EVENT_FIELD,
            last_chunk,
            self.keep,
        ]
        return bool(self._commit(keys=keys, args=args))
