"""The session store against a real redis-server."""
from __future__ import annotations

import json

import pytest

from shared.protocol import Done, Mode, decode_event, encode_event, stream_key
from shared.sessions import SessionStore


@pytest.fixture
def store(redis_proc) -> SessionStore:
    return SessionStore(redis_proc.client(), ttl=600, stream_ttl=300)


def _commit(store, session, job_id, user="hi", reply="hello", choices=None):
    return store.commit_reply(
        channel=session.channel, mode=session.mode, session_id=session.id, job_id=job_id,
        user_text=user, reply=reply, choices=choices,
        done_event=encode_event(Done(text=reply, prompt_tokens=5, completion_tokens=2, choices=choices or [])),
    )


def test_a_reply_is_committed_once(store):
    chat = store.chat("c:1")
    assert _commit(store, chat, "job1")
    assert not _commit(store, chat, "job1", reply="a second attempt")  # a retried job writes nothing
    assert store.history("c:1", Mode.CHAT) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    events = store.r.xrange(stream_key("job1"))
    assert len(events) == 1 and decode_event(events[0][1][b"e"]).text == "hello"
    assert store.get("c:1", Mode.CHAT).turns == 1


def test_channels_and_modes_are_separate(store):
    a, b = store.chat("c:a"), store.chat("c:b")
    _commit(store, a, "j1", user="from a")
    _commit(store, b, "j2", user="from b")
    story = store.start_story("c:a", "The Lost Crown")
    _commit(store, story, "j3", user="/story", reply="Once...", choices=["Run", "Hide"])
    assert store.history("c:a", Mode.CHAT)[0]["content"] == "from a"
    assert store.history("c:b", Mode.CHAT)[0]["content"] == "from b"
    assert store.mode("c:a") is Mode.STORY and store.mode("c:b") is Mode.CHAT
    got = store.get("c:a", Mode.STORY)
    assert got.title == "The Lost Crown" and got.choices == ["Run", "Hide"] and got.turns == 1


def test_a_reply_that_lands_after_a_reset_is_not_written_into_the_new_session(store):
    old = store.chat("c:1")
    assert store.reset("c:1")
    store.chat("c:1")
    assert _commit(store, old, "late-job")  # its stream still gets the done event...
    assert store.history("c:1", Mode.CHAT) == []  # ...but the new session stays clean
    assert store.r.xlen(stream_key("late-job")) == 1


def test_reset_without_a_session_says_so(store):
    assert store.reset("c:nothing") is False


def test_end_story_returns_to_chat(store):
    store.start_story("c:1", "T")
    ended = store.end_story("c:1")
    assert ended.title == "T"
    assert store.mode("c:1") is Mode.CHAT and store.get("c:1", Mode.STORY) is None
    assert store.end_story("c:1") is None


def test_one_turn_at_a_time(store):
    assert store.claim_turn("c:1", "j1", 60) is None
    assert store.claim_turn("c:1", "j2", 60) == "j1"
    store.release_turn("c:1", "j2")  # not the holder: no effect
    assert store.turn_in_flight("c:1") == "j1"
    chat = store.chat("c:1")
    _commit(store, chat, "j1")  # committing the reply frees the channel
    assert store.turn_in_flight("c:1") is None


def test_sessions_expire_after_the_configured_time(store):
    chat = store.chat("c:1")
    _commit(store, chat, "j1")
    for key in ("shallow:s:c:1:chat", "shallow:s:c:1:chat:turns", "shallow:s:c:1:mode"):
        assert 0 < store.r.ttl(key) <= 600
    turns = [json.loads(x) for x in store.r.lrange("shallow:s:c:1:chat:turns", 0, -1)]
    assert [t["job_id"] for t in turns] == ["j1", "j1"]


def test_a_chat_turn_is_enqueued_in_three_round_trips_with_its_session_kept(redis_proc, tmp_path):
    """A bot's every message: the session read and the mode set together, the claim, then the job and the
    session's new lease in one transaction (it was six round trips; at 256 channels at once, the enqueue
    was most of the measured overhead)."""
    from dataclasses import replace

    from rq import Queue
    from rq.serializers import JSONSerializer

    from shared.client import TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    first = client.chat("c:rt", "hello", user="u")  # creates the session
    client.store.release_turn("c:rt", first.job_id)
    r = client.r
    r.config_resetstat()
    sent = []
    real = r.connection_pool.get_connection

    def counting(*args, **kwargs):  # every command or pipeline takes one connection from the pool: one round trip
        sent.append(1)
        return real(*args, **kwargs)

    r.connection_pool.get_connection = counting
    try:
        second = client.chat("c:rt", "again", user="u")
    finally:
        r.connection_pool.get_connection = real
    assert len(sent) == 3, sent
    stats = r.info("commandstats")
    assert stats["cmdstat_multi"]["calls"] == 1 and stats["cmdstat_hgetall"]["calls"] == 1
    job = Queue(client.settings.queue, connection=r, serializer=JSONSerializer).fetch_job(second.job_id)
    assert job is not None and job.get_status().value == "queued" and job.enqueued_at is not None
    assert second.session.id == first.session.id
    assert 0 < r.ttl("shallow:s:c:rt:chat") <= client.settings.session_ttl
