"""The session store against a real redis-server."""
from __future__ import annotations

import json

import pytest

from shared.errors import ChannelBusy
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
    chat = store.create("c:1", Mode.CHAT)
    assert _commit(store, chat, "job1")
    assert not _commit(store, chat, "job1", reply="a second attempt")  # a retried job writes nothing
    assert store.history("c:1", Mode.CHAT) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    with store.r.pipeline(transaction=False) as p:  # as the worker reads it, with its other reads in one round trip
        p.exists("nothing")
        assert store.history("c:1", Mode.CHAT, pipeline=p) is None
        _, raw = p.execute()
    assert store.parse_history(raw) == store.history("c:1", Mode.CHAT)
    assert _commit(store, chat, "job2", user="again", reply="once more")
    # a turn reads the last messages only (as many as its prompt could hold); the session keeps them all
    assert store.history("c:1", Mode.CHAT, last=3) == [
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "again"}, {"role": "assistant", "content": "once more"}]
    with store.r.pipeline(transaction=False) as p:
        store.history("c:1", Mode.CHAT, pipeline=p, last=2)
        (raw,) = p.execute()
    assert [m["content"] for m in store.parse_history(raw)] == ["again", "once more"]
    assert len(store.history("c:1", Mode.CHAT)) == 4
    events = store.r.xrange(stream_key("job1"))
    assert len(events) == 1 and decode_event(events[0][1][b"e"]).text == "hello"
    assert store.get("c:1", Mode.CHAT).turns == 2


def test_channels_and_modes_are_separate(store):
    a, b = store.create("c:a", Mode.CHAT), store.create("c:b", Mode.CHAT)
    _commit(store, a, "j1", user="from a")
    _commit(store, b, "j2", user="from b")
    story = store.create("c:a", Mode.STORY, "The Lost Crown")
    _commit(store, story, "j3", user="/story", reply="Once...", choices=["Run", "Hide"])
    assert store.history("c:a", Mode.CHAT)[0]["content"] == "from a"
    assert store.history("c:b", Mode.CHAT)[0]["content"] == "from b"
    assert store.mode("c:a") is Mode.STORY and store.mode("c:b") is Mode.CHAT
    got = store.get("c:a", Mode.STORY)
    assert got.title == "The Lost Crown" and got.choices == ["Run", "Hide"] and got.turns == 1


def test_a_reply_that_lands_after_a_reset_is_not_written_into_the_new_session(store):
    old = store.create("c:1", Mode.CHAT)
    assert store.reset("c:1")
    store.create("c:1", Mode.CHAT)
    assert _commit(store, old, "late-job")  # its stream still gets the done event...
    assert store.history("c:1", Mode.CHAT) == []  # ...but the new session stays clean
    assert store.r.xlen(stream_key("late-job")) == 1


def test_reset_without_a_session_says_so(store):
    assert store.reset("c:nothing") is False


def test_end_story_returns_to_chat(store):
    store.create("c:1", Mode.STORY, "T")
    ended = store.end_story("c:1")
    assert ended.title == "T"
    assert store.mode("c:1") is Mode.CHAT and store.get("c:1", Mode.STORY) is None
    assert store.end_story("c:1") is None


def test_one_turn_at_a_time(store):
    assert store.claim_turn("c:1", "j1", 60) is None
    assert store.claim_turn("c:1", "j2", 60) == "j1"
    store.release_turn("c:1", "j2")  # not the holder: no effect
    assert store.turn_in_flight("c:1") == "j1"
    chat = store.create("c:1", Mode.CHAT)
    _commit(store, chat, "j1")  # committing the reply frees the channel
    assert store.turn_in_flight("c:1") is None


def test_sessions_expire_after_the_configured_time(store):
    chat = store.create("c:1", Mode.CHAT)
    _commit(store, chat, "j1")
    for key in ("shallow:s:c:1:chat", "shallow:s:c:1:chat:turns", "shallow:s:c:1:mode"):
        assert 0 < store.r.ttl(key) <= 600
    turns = [json.loads(x) for x in store.r.lrange("shallow:s:c:1:chat:turns", 0, -1)]
    assert [t["job_id"] for t in turns] == ["j1", "j1"]


def _count_round_trips(r, action):
    """What `action()` returns, and how many round trips to Redis it took."""
    from tests.round_trips import round_trips

    with round_trips(r) as sent:
        result = action()
    return result, len(sent)


def test_a_message_is_enqueued_in_two_round_trips_with_its_session_kept(redis_proc, tmp_path):
    """A bot's every message (`say`), in chat or in a story, and a chat turn (`chat`): the mode, the sessions
    and the claim in one round trip, the job with the session's lease (or a new session) in one transaction.
    `say` took four (five on a channel's first message), `chat` three; at 256 channels sending at once, the
    enqueue was most of the measured overhead."""
    from dataclasses import replace

    from rq import Queue
    from rq.serializers import JSONSerializer

    from shared.client import TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    r = client.r
    queue = Queue(client.settings.queue, connection=r, serializer=JSONSerializer)
    client.say("c:warm", "hello", user="u")  # RQ reads the server's version once per queue, on its first job
    r.config_resetstat()
    first, trips = _count_round_trips(r, lambda: client.say("c:rt", "hello", user="u"))  # a new channel
    assert trips == 2
    assert client.store.get("c:rt", Mode.CHAT).id == first.session.id and client.store.mode("c:rt") is Mode.CHAT
    assert r.info("commandstats")["cmdstat_multi"]["calls"] == 1
    client.store.release_turn("c:rt", first.job_id)
    second, trips = _count_round_trips(r, lambda: client.chat("c:rt", "again", user="u"))
    assert trips == 2 and second.session.id == first.session.id
    job = queue.fetch_job(second.job_id)
    assert job is not None and job.get_status().value == "queued" and job.enqueued_at is not None
    assert 0 < r.ttl("shallow:s:c:rt:chat") <= client.settings.session_ttl
    client.store.release_turn("c:rt", second.job_id)
    # a story: the reader's next action goes into the story's session, the chat is kept
    story, trips = _count_round_trips(r, lambda: client.start_story("c:rt", "The Lost Crown", user="u"))
    assert trips == 2 and client.store.mode("c:rt") is Mode.STORY
    assert client.store.get("c:rt", Mode.STORY).title == "The Lost Crown"
    with pytest.raises(ChannelBusy):  # a new story while the first passage is being written: refused, nothing replaced
        client.start_story("c:rt", "Another Tale", user="u")
    assert client.store.get("c:rt", Mode.STORY).id == story.session.id
    client.store.release_turn("c:rt", story.job_id)
    action, trips = _count_round_trips(r, lambda: client.say("c:rt", "Open the door", user="u"))
    assert trips == 2 and action.session.id == story.session.id and action.request.mode is Mode.STORY
    # a busy channel: refused, nothing written, the turn in flight untouched
    with pytest.raises(ChannelBusy):
        client.say("c:rt", "and again", user="u")
    assert client.store.turn_in_flight("c:rt") == action.job_id
    assert client.store.get("c:rt", Mode.CHAT).id == first.session.id
    # the story expired while the channel is in story mode: the message is a chat turn again
    client.store.release_turn("c:rt", action.job_id)
    r.delete("shallow:s:c:rt:story")
    back, trips = _count_round_trips(r, lambda: client.say("c:rt", "hello again", user="u"))
    assert trips == 2 and back.request.mode is Mode.CHAT and back.session.id == first.session.id
    assert client.store.mode("c:rt") is Mode.CHAT

def test_a_turn_renews_the_leases_of_what_the_channel_has_and_sends_nothing_more(redis_proc, tmp_path):
    """A chat turn gives a new lease (the session TTL) to the channel's sessions and mode, and to its story when it
    has one; keys that are not there, or were just written with a lease, are left alone: a chat turn in a channel
    without a story sends 3 EXPIREs and no SET of the mode (it sent 5 EXPIREs and a SET, ~0.6 ms of the client's CPU
    a turn in all, `python -m bench.enqueue_cost`)."""
    from dataclasses import replace

    from shared.client import TurnClient
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    r, ttl = client.r, client.settings.session_ttl

    def ours(action):
        r.config_resetstat()
        result = action()
        stats = r.info("commandstats")
        client.store.release_turn(result.request.channel, result.job_id)
        return {name: stats.get(f"cmdstat_{name}", {}).get("calls", 0) for name in ("expire", "set")}

    # a new channel: the session written with its lease (HSET, EXPIRE), the mode with its own (SET EX); the claim
    assert ours(lambda: client.chat("c:lease", "hello")) == {"expire": 1, "set": 2}
    client.store.commit_reply(channel="c:lease", mode=Mode.CHAT, session_id=client.store.get("c:lease", Mode.CHAT).id,
                              job_id="j0", user_text="hello", reply="hi", choices=None, done_event="{}")
    for key in ("shallow:s:c:lease:chat", "shallow:s:c:lease:chat:turns", "shallow:s:c:lease:mode"):
        r.expire(key, 100)
    assert ours(lambda: client.chat("c:lease", "again")) == {"expire": 3, "set": 1}  # chat, its turns, the mode; the claim
    for key in ("shallow:s:c:lease:chat", "shallow:s:c:lease:chat:turns", "shallow:s:c:lease:mode"):
        assert ttl - 5 < r.ttl(key) <= ttl, key
    assert not r.exists("shallow:s:c:lease:story") and not r.exists("shallow:s:c:lease:story:turns")
    # with a story too: a story's action renews both sessions and the mode
    ours(lambda: client.start_story("c:lease", "The Lost Crown"))
    assert client.store.mode("c:lease") is Mode.STORY and 0 < r.ttl("shallow:s:c:lease:story") <= ttl
    r.expire("shallow:s:c:lease:chat", 100)
    r.expire("shallow:s:c:lease:story", 100)
    r.expire("shallow:s:c:lease:mode", 100)
    ours(lambda: client.say("c:lease", "Open the door"))
    assert all(ttl - 5 < r.ttl(f"shallow:s:c:lease:{k}") <= ttl for k in ("chat", "story", "mode"))
    # and a chat turn in story mode: the mode is set to chat with its lease, the story's lease renewed
    r.expire("shallow:s:c:lease:story", 100)
    assert ours(lambda: client.chat("c:lease", "back to chat"))["set"] == 2  # the claim and the mode
    assert client.store.mode("c:lease") is Mode.CHAT and ttl - 5 < r.ttl("shallow:s:c:lease:story") <= ttl


def test_many_turns_of_any_channels_go_in_the_round_trips_of_one(redis_proc, tmp_path):
    """`submit_many` (a bot's burst of turns): every channel's mode, sessions and claim in one round trip, every
    job in one transaction; each turn ends as it would alone. A refused turn (bad input) does not hold back the
    others, and a second turn of a channel in the same call is refused as the channel's turn in flight, after
    the first is enqueued."""
    from dataclasses import replace

    from shared.client import Turn, TurnClient
    from shared.errors import BadInput
    from shared.protocol import new_id
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    r = client.r
    client.say("m:warm", "hello")  # RQ reads the server's version once per queue, on its first job
    story = client.start_story("m:story", "The Lost Crown")
    client.store.release_turn("m:story", story.job_id)
    turns = [Turn("chat", f"m:{i}", f"Tell me about the number {i}.", user=str(i)) for i in range(6)]
    turns += [Turn("say", "m:empty", "   "), Turn("story", "m:tale", "The Sunken Bell"), Turn("say", "m:story", "Open the door")]
    ids = [new_id() for _ in turns]
    r.config_resetstat()
    results, trips = _count_round_trips(r, lambda: client.submit_many(turns, ids, [None] * len(turns)))
    assert trips == 2 and r.info("commandstats")["cmdstat_exec"]["calls"] == 1
    assert isinstance(results[6], BadInput) and "empty" in str(results[6])
    enqueued = [(i, sub) for i, sub in enumerate(results) if i != 6]
    for i, sub in enqueued:
        assert sub.job_id == ids[i] and client.queue.fetch_job(ids[i]).get_status().value == "queued"
        assert client.store.turn_in_flight(turns[i].channel) == ids[i]
    assert [results[i].request.text for i in range(6)] == [t.text for t in turns[:6]]
    assert {results[i].request.mode for i in range(6)} == {Mode.CHAT}
    assert client.store.get("m:3", Mode.CHAT).id == results[3].session.id
    assert results[7].request.mode is Mode.STORY and client.store.get("m:tale", Mode.STORY).title == "The Sunken Bell"
    assert results[8].session.id == story.session.id and results[8].request.user_text == "Open the door"
    assert not r.exists("shallow:s:m:empty:inflight")
    # the same channel twice in one call, and a channel still busy from before: the first of the pair is enqueued
    pair = [Turn("chat", "m:pair", "first"), Turn("chat", "m:pair", "second"), Turn("chat", "m:0", "busy")]
    ids = [new_id() for _ in pair]
    first, second, busy = client.submit_many(pair, ids, [None] * 3)
    assert first.job_id == ids[0] and client.store.turn_in_flight("m:pair") == ids[0]
    assert isinstance(second, ChannelBusy) and isinstance(busy, ChannelBusy) and "still writing" in str(second)
    assert client.queue.fetch_job(ids[1]) is None and client.queue.fetch_job(ids[2]) is None
    # a turn whose read fails (its channel's chat session is not a hash) and one whose write fails in the transaction
    # (its job's key is not a hash): each fails alone with Redis' error, the turn between them is enqueued
    from redis.exceptions import ResponseError

    r.set("shallow:s:m:broken:chat", "not a hash")
    trio = [Turn("say", "m:broken", "hello"), Turn("chat", "m:fine", "hello"), Turn("chat", "m:job", "hello")]
    ids = [new_id() for _ in trio]
    r.set(f"rq:job:{ids[2]}", "not a hash")
    r.config_resetstat()
    broken, fine, unqueued = client.submit_many(trio, ids, [None] * 3)
    assert r.info("commandstats")["cmdstat_exec"]["calls"] == 1  # the write failed inside the one transaction
    assert isinstance(broken, ResponseError) and "WRONGTYPE" in str(broken)
    assert isinstance(unqueued, ResponseError) and "WRONGTYPE" in str(unqueued)
    assert fine.job_id == ids[1] and client.queue.fetch_job(ids[1]) is not None
    with pytest.raises(ResponseError):  # alone, the error is raised
        client.say("m:broken", "hello")
    assert ids[0] not in client.queue.job_ids  # (the job whose hash failed was pushed all the same: Redis does not roll back)


def test_a_turn_that_cannot_be_written_fails_alone_in_a_batch(redis_proc, tmp_path):
    """One turn of a bot's batch that cannot be written at all (here a platform reference JSON cannot hold: an
    error of the turn's own, raised while its job is built) fails with that error; the turns before and after it
    are enqueued in the same transaction, none of its commands are sent, and its channel is free again."""
    from dataclasses import replace

    import json

    from shared.client import Owed, Turn, TurnClient
    from shared.protocol import new_id
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    client.say("b:warm", "hello")  # RQ reads the server's version once per queue, on its first job
    # b:late fails after its job's commands are queued (its owed record's second form cannot be written), b:early
    # before any are (its job's arguments cannot be serialized)
    late = Owed(key="b:owed", first="{}", then=lambda sub: json.dumps({"where": object()}))
    turns = [Turn("say", "b:0", "hello"), Turn("say", "b:late", "hello"), Turn("say", "b:2", "hello"),
             Turn("say", "b:early", "hello", reply_to={"message": object()})]
    ids = [new_id() for _ in turns]
    results = client.submit_many(turns, ids, [None, late, None, None])
    assert isinstance(results[1], TypeError) and isinstance(results[3], TypeError)
    for i in (0, 2):
        assert results[i].job_id == ids[i] and client.queue.fetch_job(ids[i]).get_status().value == "queued"
    for i, channel in ((1, "b:late"), (3, "b:early")):
        assert client.queue.fetch_job(ids[i]) is None and client.store.turn_in_flight(channel) is None
        assert client.store.get(channel, Mode.CHAT) is None  # nothing of it was written
    again = client.say("b:late", "hello again")  # the channel takes its next turn
    assert client.queue.fetch_job(again.job_id) is not None


def test_a_sessions_history_keeps_its_last_messages_only(redis_proc, monkeypatch):
    """A channel that talks every day renews its session's lease with every turn, so its history would grow for good:
    the commit keeps the last `keep` messages (SHALLOW_HISTORY_KEEP). A prompt never holds more than the worker reads
    (context / 4 messages, 2,048 at the 8,192-token cap), which is the default."""
    from shared.errors import ConfigError
    from shared.settings import Settings

    store = SessionStore(redis_proc.client(), ttl=600, stream_ttl=300, keep=4)
    chat = store.create("c:keep", Mode.CHAT)
    for n in range(3):
        assert _commit(store, chat, f"keep{n}", user=f"question {n}", reply=f"answer {n}")
    assert [m["content"] for m in store.history("c:keep", Mode.CHAT)] == ["question 1", "answer 1", "question 2", "answer 2"]
    assert store.get("c:keep", Mode.CHAT).turns == 3  # the count of exchanges is the session's, not the list's

    from worker.jobs import history_room
    from worker.backends import MAX_CONTEXT

    assert Settings.from_env().history_keep == 2048 == history_room(MAX_CONTEXT)
    monkeypatch.setenv("SHALLOW_HISTORY_KEEP", "1")
    with pytest.raises(ConfigError, match="SHALLOW_HISTORY_KEEP must be at least 2, got 1"):
        Settings.from_env()
