"""A worker killed with SIGKILL mid-reply: another worker finishes the job, and the reply lands once."""
from __future__ import annotations

import pytest

from shared.client import ReplyText, TurnClient
from shared.protocol import Chunk, Done, Mode, Start, decode_event, stream_key
from tests.conftest import wait_for

pytestmark = pytest.mark.slow


def test_kill_9_mid_reply_then_another_worker_completes_it_once(env, start_worker, processes):
    first = start_worker(SHALLOW_MAX_NEW_TOKENS="200")  # long enough to be killed in the middle
    client = TurnClient(env.settings())
    sub = client.say("discord:7", "Tell me a long story about a dragon who learns to bake bread.")
    key = stream_key(sub.job_id)

    def chunks_so_far():
        return [decode_event(f[b"e"]) for _, f in client.r.xrange(key)]

    wait_for(lambda: sum(isinstance(e, Chunk) for e in chunks_so_far()) >= 3, 120, "the first chunks")
    processes.kill(first)  # SIGKILL: no cleanup, no goodbye
    assert first.returncode == -9
    assert not any(isinstance(e, Done) for e in chunks_so_far())

    start_worker(SHALLOW_MAX_NEW_TOKENS="12")
    reply = ReplyText()
    events = list(client.follow(sub.job_id, timeout=240, poll=0.5))
    for e in events:
        reply.feed(e)
    done = events[-1]
    assert isinstance(done, Done), done
    starts = [e for e in chunks_so_far() if isinstance(e, Start)]
    assert [s.attempt for s in starts] == [1, 2]
    assert done.attempt == 2 and reply.text == done.text
    # the follower's text is the second attempt's alone, not the dead attempt's prefix plus it
    second = "".join(e.text for e in chunks_so_far() if isinstance(e, Chunk) and e.attempt == 2)
    assert second.strip() == done.text
    all_events = chunks_so_far()
    assert sum(isinstance(e, Done) for e in all_events) == 1
    history = client.store.history("discord:7", Mode.CHAT)
    assert history == [
        {"role": "user", "content": "Tell me a long story about a dragon who learns to bake bread."},
        {"role": "assistant", "content": done.text},
    ]
    assert client.store.turn_in_flight("discord:7") is None
