"""Several workers on one queue, and stopping a worker without losing a reply."""
from __future__ import annotations

import signal
import time

import pytest
from rq import Worker

from shared.client import TurnClient
from shared.protocol import Done, Mode, Start, decode_event, stream_key
from tests.conftest import launch_worker, wait_for

pytestmark = pytest.mark.slow


def events_of(client: TurnClient, job_id: str) -> list:
    return [decode_event(f[b"e"]) for _, f in client.r.xrange(stream_key(job_id))]


def test_two_worker_processes_share_the_queue_and_do_every_job_once(env, processes):
    sup = processes.start(["worker", "--processes", "2", "--name", "sup"], env.vars(), "supervisor")
    conn = env.redis.client()
    wait_for(lambda: {w.name for w in Worker.all(connection=conn)} >= {"sup-0", "sup-1"} or sup.poll() is not None, 180,
             "both worker processes")
    assert sup.poll() is None, sup.log_path.read_text()[-2000:]
    client = TurnClient(env.settings())
    subs = [client.say(f"console:many{i}", f"Say a word about the number {i}.") for i in range(6)]
    workers = set()
    for sub in subs:
        events = list(client.follow(sub.job_id, timeout=300, poll=0.5))
        assert isinstance(events[-1], Done), events[-1]
        stream = events_of(client, sub.job_id)
        assert sum(isinstance(e, Done) for e in stream) == 1 and [e.attempt for e in stream if isinstance(e, Start)] == [1]
        workers |= {e.worker for e in stream if isinstance(e, Start)}
        assert len(client.store.history(sub.request.channel, Mode.CHAT)) == 2
    assert workers == {"sup-0", "sup-1"}  # both took jobs
    processes.kill(sup, signal.SIGTERM)
    assert sup.returncode == 0


def test_sigterm_during_a_reply_lets_it_finish(env, processes):
    worker = launch_worker(processes, env.vars(SHALLOW_MAX_NEW_TOKENS="60"), "graceful", env.redis.client())
    client = TurnClient(env.settings())
    sub = client.say("console:graceful", "Tell me about the history of bread.")
    wait_for(lambda: any(e.type.value == "chunk" for e in events_of(client, sub.job_id)), 120, "the reply to start")
    worker.send_signal(signal.SIGTERM)  # the worker process itself (not its group): as docker stop does
    events = list(client.follow(sub.job_id, timeout=240, poll=0.5))
    assert isinstance(events[-1], Done), events[-1]
    worker.wait(60)
    assert worker.returncode == 0
    stream = events_of(client, sub.job_id)
    assert [e.attempt for e in stream if isinstance(e, Start)] == [1]  # finished by the worker that was stopping
    assert len(client.store.history("console:graceful", Mode.CHAT)) == 2


def test_sigterm_twice_hands_the_job_to_another_worker_and_replies_once(env, processes):
    first = launch_worker(processes, env.vars(SHALLOW_MAX_NEW_TOKENS="200"), "first", env.redis.client())
    client = TurnClient(env.settings())
    sub = client.say("console:twice", "Tell me a long story about a clockmaker.")
    wait_for(lambda: any(e.type.value == "chunk" for e in events_of(client, sub.job_id)), 120, "the reply to start")
    launch_worker(processes, env.vars(SHALLOW_MAX_NEW_TOKENS="12"), "second", env.redis.client())
    first.send_signal(signal.SIGTERM)
    time.sleep(1.5)  # RQ ignores a second signal within a second of the first
    first.send_signal(signal.SIGTERM)
    first.wait(60)
    events = list(client.follow(sub.job_id, timeout=240, poll=0.5))
    assert isinstance(events[-1], Done), events[-1]
    stream = events_of(client, sub.job_id)
    starts = [e for e in stream if isinstance(e, Start)]
    assert [s.attempt for s in starts] == [1, 2] and starts[-1].worker == "second"
    assert sum(isinstance(e, Done) for e in stream) == 1
    assert client.store.history("console:twice", Mode.CHAT)[1]["content"] == events[-1].text
    assert len(client.store.history("console:twice", Mode.CHAT)) == 2
