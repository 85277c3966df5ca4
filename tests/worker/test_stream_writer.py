"""The worker's stream writer against a real Redis: many replies' chunks in one round trip, each stream in
order, the first words at once, cancel flags read for all, and a failed write raised in its own job."""
from __future__ import annotations

import threading
import time

import pytest
import redis

from shared.protocol import EVENT_FIELD, Chunk, Done, cancel_key, decode_event, encode_event, stream_key
from worker.jobs import StreamWriter


def events(r: redis.Redis, key: str) -> list:
    return [decode_event(fields[EVENT_FIELD.encode()]) for _, fields in r.xrange(key)]


def test_chunks_of_many_streams_arrive_whole_and_in_order(redis_proc):
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=0.05)
    keys = [stream_key(f"job{i}") for i in range(20)]
    for key in keys:
        writer.open(key, key + ":cancel")
    for key in keys:
        writer.add(key, "Once", attempt=1)
    for n in range(50):
        for key in keys:
            writer.add(key, f" {n}", attempt=1)
    for key in keys:
        writer.flush(key)
        r.xadd(key, {EVENT_FIELD: encode_event(Done(text="", prompt_tokens=1, completion_tokens=51))})
    for key in keys:
        got = events(r, key)
        assert isinstance(got[-1], Done)  # written after flush: after every chunk
        chunks = got[:-1]
        assert all(isinstance(c, Chunk) and c.attempt == 1 for c in chunks)
        assert "".join(c.text for c in chunks) == "Once" + "".join(f" {n}" for n in range(50))
        assert len(chunks) < 20  # batched: far fewer entries than the 51 pieces added
        assert r.ttl(key) > 0
        writer.close(key)


def test_cancel_flags_are_read_for_every_open_stream(redis_proc):
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=0.02, cancel_interval=0.05)
    a, b = stream_key("a"), stream_key("b")
    writer.open(a, cancel_key("a"))
    writer.open(b, cancel_key("b"))
    r.set(cancel_key("b"), 1)
    deadline = time.monotonic() + 5
    while not writer.is_cancelled(b) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.is_cancelled(b) and not writer.is_cancelled(a)
    writer.close(b)
    assert not writer.is_cancelled(b)
    writer.close(a)


def test_a_failed_write_is_raised_in_the_job_it_belongs_to(redis_proc):
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=0.02)
    good, bad = stream_key("good"), stream_key("bad")
    writer.open(good, cancel_key("good"))
    writer.open(bad, cancel_key("bad"))
    r.set(bad, "not a stream")  # XADD to it fails with WRONGTYPE
    writer.add(bad, "text", attempt=1)
    writer.add(good, "fine", attempt=1)  # in the same batch: written, and its job sees no error
    with pytest.raises(redis.ResponseError):
        writer.flush(bad)
    writer.flush(good)
    writer.add(good, " still", attempt=1)  # the writer goes on
    writer.flush(good)
    assert "".join(e.text for e in events(r, good)) == "fine still"
    writer.close(good)
    writer.close(bad)


def test_flush_from_many_threads_at_once(redis_proc):
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=0.01)
    errors: list[BaseException] = []

    def job(i: int) -> None:
        key = stream_key(f"t{i}")
        writer.open(key, key + ":c")
        try:
            for n in range(30):
                writer.add(key, f"{n},", attempt=2)
                if n % 7 == 0:
                    writer.flush(key)
            writer.flush(key)
            assert "".join(e.text for e in events(r, key)) == "".join(f"{n}," for n in range(30))
        except BaseException as exc:  # noqa: BLE001 - collected for the assert below
            errors.append(exc)
        finally:
            writer.close(key)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]


def test_a_replys_first_words_are_written_at_once_not_at_the_next_interval(redis_proc):
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=5.0)  # a batch only every 5 s...
    key = stream_key("first")
    writer.open(key, cancel_key("first"))
    time.sleep(0.2)  # the writer is now inside its 5 s wait
    writer.add(key, "Hello", attempt=1)  # ...but the first words wake it
    deadline = time.monotonic() + 1.0
    while not r.xlen(key) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [e.text for e in events(r, key)] == ["Hello"]
    writer.add(key, " again", attempt=1)  # later words wait for the batch (or a flush)
    time.sleep(0.5)
    assert r.xlen(key) == 1
    writer.flush(key)
    assert "".join(e.text for e in events(r, key)) == "Hello again"
    writer.close(key)


def test_a_reply_takes_back_its_unsent_text_to_write_it_with_its_done_event(redis_proc):
    """At a reply's end the job takes the text the writer has not sent yet and its commit writes it, then the done
    event, in one call: every piece is in the stream once, in order, before the done event; with nothing pending
    there is nothing to take; a commit of a reply already committed writes neither."""
    from dataclasses import replace

    from shared.protocol import Mode
    from shared.sessions import SessionStore

    r = redis_proc.client()
    store = SessionStore(r, ttl=600)
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=5.0)  # only what is urgent goes out within the test
    session = store.create("c:take", Mode.CHAT)
    key, other = stream_key("take1"), stream_key("other")
    writer.open(key, key + ":cancel")
    writer.open(other, other + ":cancel")
    writer.add(key, "Hello", attempt=2)  # the first words: sent at once
    writer.flush(key)
    for n in range(5):
        writer.add(key, f" {n}", attempt=2)  # the rest waits for the writer's next batch...
    text, attempt = writer.take(key)  # ...or is taken back
    assert (text, attempt) == (" 0 1 2 3 4", 2) and writer.take(key) is None
    writer.add(other, "go", attempt=1)  # another stream's first words: the writer writes a batch now
    writer.flush(other)
    assert [e.text for e in events(r, other)] == ["go"]
    assert [e.text for e in events(r, key)] == ["Hello"]  # and nothing taken back was in it
    done = Done(text="Hello 0 1 2 3 4", prompt_tokens=3, completion_tokens=6, attempt=2)
    args = dict(channel="c:take", mode=Mode.CHAT, session_id=session.id, job_id="take1", user_text="hi",
                reply=done.text, choices=None, done_event=encode_event(done))
    assert store.commit_reply(**args, last_chunk=encode_event(Chunk(text=text, attempt=attempt)))
    got = events(r, key)
    assert [type(e).__name__ for e in got] == ["Chunk", "Chunk", "Done"]
    assert "".join(e.text for e in got[:-1]) == got[-1].text == "Hello 0 1 2 3 4"
    assert not store.commit_reply(**args, last_chunk=encode_event(Chunk(text=" again", attempt=3)))
    assert len(events(r, key)) == 3  # a second commit wrote nothing, its last chunk included
    assert store.commit_reply(**dict(args, job_id="take2", done_event=encode_event(replace(done, text="x"))))
    assert [type(e).__name__ for e in events(r, stream_key("take2"))] == ["Done"]  # no last chunk: only the done event
    writer.close(key)
    writer.close(other)


def test_a_replys_start_event_goes_out_through_the_writer_at_once_and_before_its_text(redis_proc):
    """The job hands its start event to the writer and goes on (it waited for that round trip): the writer sends it
    at once, not at its next interval, and always before the reply's text, even when the reply ends before the
    writer got to it (its text then goes with the done event, after the start)."""
    from shared.protocol import Start

    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=5.0)  # only what is urgent goes out within the test
    key = stream_key("start1")
    writer.open(key, key + ":cancel")
    with writer.cond:  # held (it is re-entrant): the start and the text go in the writer's same batch
        writer.start(key, encode_event(Start(attempt=1, worker="w")))
        writer.add(key, "Hello", attempt=1)
        writer.add(key, " there", attempt=1)
    writer.flush(key)
    got = events(r, key)
    assert [type(e).__name__ for e in got] == ["Start", "Chunk"] and got[1].text == "Hello there"
    writer.close(key)
    for n in range(20):  # a reply that ends before the writer's thread has written its start
        key = stream_key(f"short{n}")
        writer.open(key, key + ":cancel")
        writer.start(key, encode_event(Start(attempt=2, worker="w")))
        writer.add(key, "Hi", attempt=2)
        last = writer.take(key)  # waits for the start (and a first chunk in flight with it) to be written
        if last is not None:
            r.xadd(key, {EVENT_FIELD: encode_event(Chunk(text=last[0], attempt=last[1]))})
        r.xadd(key, {EVENT_FIELD: encode_event(Done(text="Hi", prompt_tokens=1, completion_tokens=1, attempt=2))})
        got = events(r, key)
        assert [type(e).__name__ for e in got] == ["Start", "Chunk", "Done"], got
        writer.close(key)


def test_a_replys_text_renews_its_lease_only_once_a_quarter_of_it_has_passed(redis_proc):
    """The start event sets the stream's lease (EXPIRE); the chunks after it renew it only when a quarter of the
    lease has gone by, not with every write (that was half the commands of a reply's text). A stream closed
    leaves nothing behind in the writer."""
    from shared.protocol import Start

    r = redis_proc.client()

    def calls(name: str) -> int:
        return int(r.info("commandstats").get(f"cmdstat_{name}", {}).get("calls", 0))

    writer = StreamWriter(r, maxlen=1000, ttl=8, interval=0.02)  # a quarter of the lease: 2 s
    key = stream_key("lease1")
    writer.open(key, key + ":cancel")
    xadds, expires = calls("xadd"), calls("expire")
    writer.start(key, encode_event(Start(attempt=1, worker="w")))
    for n in range(10):  # 10 chunks, each written in a batch of its own
        writer.add(key, f" {n}", attempt=1)
        writer.flush(key)
    assert calls("xadd") - xadds == 11 and calls("expire") - expires == 1  # the start's lease only
    assert 0 < r.ttl(key) <= 8
    time.sleep(2.1)
    writer.add(key, " late", attempt=1)
    writer.flush(key)
    assert calls("expire") - expires == 2  # a quarter of the lease had passed: renewed with this chunk
    assert r.ttl(key) >= 7
    got = events(r, key)
    assert "".join(c.text for c in got[1:]) == "".join(f" {n}" for n in range(10)) + " late"
    writer.close(key)
    assert key not in writer.renewed
    other = stream_key("lease2")  # a stream whose start did not go through the writer: its first chunk sets a lease
    writer.open(other, other + ":cancel")
    writer.add(other, "x", attempt=1)
    writer.flush(other)
    assert 0 < r.ttl(other) <= 8
    writer.close(other)


def test_the_writers_thread_ends_when_no_stream_is_open_and_starts_again_with_the_next(redis_proc):
    """Between jobs the writer has nothing to do: its thread ends once every stream is closed and all is written;
    the next stream starts it again, and it writes and reads cancel flags as before."""
    r = redis_proc.client()
    writer = StreamWriter(r, maxlen=1000, ttl=60, interval=0.02, cancel_interval=0.02)
    key = stream_key("idle1")
    writer.open(key, key + ":cancel")
    first = writer.thread
    writer.add(key, "one", attempt=1)
    writer.flush(key)
    time.sleep(0.2)
    assert first.is_alive()  # a stream open: the thread stays, reading its cancel flag
    writer.close(key)
    first.join(5)
    assert not first.is_alive() and writer.thread is None
    key = stream_key("idle2")
    writer.open(key, cancel_key("idle2"))
    assert writer.thread is not None and writer.thread is not first
    writer.add(key, "two", attempt=1)
    writer.flush(key)
    assert [e.text for e in events(r, key)] == ["two"]
    r.set(cancel_key("idle2"), 1)
    deadline = time.monotonic() + 5
    while not writer.is_cancelled(key) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert writer.is_cancelled(key)
    writer.close(key)
    second = writer.thread
    second.join(5)
    assert not second.is_alive()
