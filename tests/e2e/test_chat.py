"""Chat turns through the whole path: a real redis-server, a real `shallow worker` process, real SmolLM2."""
from __future__ import annotations

import json
import time
import zlib

import pytest
from rq.job import Job
from rq.serializers import JSONSerializer

from shared.client import TurnClient
from shared.protocol import Mode, stream_key
from tests.e2e.helpers import Done, chunks_of, collect

pytestmark = pytest.mark.slow


def test_a_chat_turn_streams_in_order_and_lands_in_the_session(env, start_worker):
    start_worker()
    client = TurnClient(env.settings())
    sub = client.say("console:alice", "Hello! What is the capital of France?")
    events, last = collect(client, sub.job_id)
    assert isinstance(last, Done), last
    pieces = chunks_of(events)
    assert len(pieces) >= 2  # streamed, not delivered whole
    assert "".join(pieces).strip() == last.text
    assert last.completion_tokens > 0 and last.prompt_tokens > 0
    assert client.store.history("console:alice", Mode.CHAT) == [
        {"role": "user", "content": "Hello! What is the capital of France?"},
        {"role": "assistant", "content": last.text},
    ]
    # the job went through Redis as JSON, not pickle
    data = json.loads(zlib.decompress(client.r.hget(f"rq:job:{sub.job_id}", "data")))  # RQ compresses job data
    assert data[0] == "worker.jobs.run_turn" and data[2][0]["text"] == "Hello! What is the capital of France?"
    assert client.store.turn_in_flight("console:alice") is None
    # the reply stream expires (its lease set with its start and its done event, not renewed with each chunk)
    assert 0 < client.r.ttl(stream_key(sub.job_id)) <= env.settings().stream_ttl


def test_two_channels_at_once_keep_separate_histories(env, start_worker):
    start_worker()
    client = TurnClient(env.settings())
    a = client.say("discord:1", "My name is Ada. Remember it.")
    b = client.say("telegram:2", "My favourite colour is green.")  # both queued before either is answered
    assert client.position(b.job_id) in (1, 2)
    _, da = collect(client, a.job_id)
    _, db = collect(client, b.job_id)
    assert isinstance(da, Done) and isinstance(db, Done)
    ha = client.store.history("discord:1", Mode.CHAT)
    hb = client.store.history("telegram:2", Mode.CHAT)
    assert [m["content"] for m in ha] == ["My name is Ada. Remember it.", da.text]
    assert [m["content"] for m in hb] == ["My favourite colour is green.", db.text]
    # a second turn in one channel sees its own history only: the prompt grew by the first exchange
    a2 = client.say("discord:1", "What is my name?")
    _, da2 = collect(client, a2.job_id)
    assert da2.prompt_tokens > da.prompt_tokens
    assert len(client.store.history("discord:1", Mode.CHAT)) == 4
    assert len(client.store.history("telegram:2", Mode.CHAT)) == 2


def test_a_job_run_twice_replies_once(env, start_worker):
    start_worker()
    client = TurnClient(env.settings())
    sub = client.say("console:bob", "Say hello.")
    _, done = collect(client, sub.job_id)
    assert isinstance(done, Done)
    # enqueue the very same job again, as a retry after a lost acknowledgement would
    job = Job.fetch(sub.job_id, connection=client.r, serializer=JSONSerializer)
    client.queue.enqueue("worker.jobs.run_turn", job.args[0], job_id=sub.job_id + "-again")
    again = Job.fetch(sub.job_id + "-again", connection=client.r, serializer=JSONSerializer)
    deadline = time.monotonic() + 120
    while again.get_status() not in ("finished", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert again.get_status() == "finished"
    assert again.return_value() == {"status": "already_done"}
    assert len(client.store.history("console:bob", Mode.CHAT)) == 2
    dones = [e for e in client.r.xrange(stream_key(sub.job_id)) if b'"done"' in e[1][b"e"]]
    assert len(dones) == 1


def test_a_long_conversation_keeps_every_prompt_within_the_context(env, start_worker):
    start_worker(SHALLOW_CONTEXT_TOKENS="200")
    client = TurnClient(env.settings())
    prompts = []
    for text in ["Tell me about the sea.", "And about the mountains?", "Which one is older?", "Thank you, goodbye!"]:
        _, done = collect(client, client.say("console:long", text).job_id)
        assert isinstance(done, Done), done
        prompts.append(done.prompt_tokens)
    assert all(p <= 200 - 16 for p in prompts), prompts  # context minus max_new_tokens
    assert len(client.store.history("console:long", Mode.CHAT)) == 8  # trimming drops from the prompt, not the session
    # a turn reads only the last messages a prompt could hold (200 // 4 = 50), not the whole of a long session: an
    # unreadable record older than those is never read (it fails the turn when the worker reads all: checked)
    turns = "shallow:s:console:long:chat:turns"
    client.r.lpush(turns, "not a message")
    client.r.rpush(turns, *[json.dumps({"role": role, "content": "ok"}) for _ in range(25) for role in ("user", "assistant")])
    _, done = collect(client, client.say("console:long", "Still there?").job_id)
    assert isinstance(done, Done), done
    assert client.r.llen(turns) == 1 + 8 + 50 + 2


def test_status_reports_queue_workers_and_failures(env, start_worker):
    import subprocess
    import sys

    from tests.conftest import ROOT

    def status():
        out = subprocess.run([sys.executable, "-m", "shared.cli", "status", "--json"], env=env.vars(), cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    assert status() == {"queue": "shallow", "queued": 0, "running": 0, "failed": 0, "workers": []}
    client = TurnClient(env.settings())
    client.say("console:s", "hello")
    assert status()["queued"] == 1
    start_worker()
    client.queue.enqueue("worker.jobs.no_such_function", {}, job_id="broken")
    deadline = time.monotonic() + 120
    while status()["failed"] < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
    st = status()
    assert st["failed"] == 1 and len(st["workers"]) == 1 and st["workers"][0]["state"] in ("idle", "busy")
