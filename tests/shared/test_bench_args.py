"""bench/serve.py: how many RQ workers a `shallow worker ARGS` registers (the bench waits for all of them)."""
from __future__ import annotations

import pytest


@pytest.mark.parametrize("args, expected", [
    ([], 1),
    (["--slots", "64"], 64),
    (["--processes", "2", "--slots", "128"], 256),
    (["--gpus", "0,1", "--slots", "8"], 16),
    (["--fronts", "4", "--slots", "256"], 256),
    (["--fronts", "3", "--slots", "8"], 8),  # 3 fronts of 3, 3 and 2 slots: the slots are shared out
    (["--gpus", "0,1", "--fronts", "2", "--slots", "4"], 8),
])
def test_registrations_per_worker(monkeypatch, args, expected):
    from bench.serve import registrations_per_worker

    monkeypatch.delenv("SHALLOW_SLOTS", raising=False)
    monkeypatch.delenv("SHALLOW_FRONTS", raising=False)
    assert registrations_per_worker(args) == expected


def test_the_bench_opens_its_connections_before_the_timed_turns(redis_proc):
    """A running bot has its connections open: the bench opens one per channel before timing the channels'
    first turns, which would otherwise each open one at the same instant."""
    from bench.serve import open_connections

    r = redis_proc.client()
    open_connections(r, 8)
    opened = r.info("stats")["total_connections_received"]
    assert r.info("clients")["connected_clients"] == 8  # all open (the info calls use one of them)
    open_connections(r, 8)
    assert r.info("stats")["total_connections_received"] == opened  # kept open, none opened again


def test_the_bench_reader_reads_a_turn_added_while_it_is_blocked_at_once(redis_proc, tmp_path):
    """A turn added while the bench's reader is blocked in an XREAD over other streams wakes it (through a stream of
    the reader's own): its done event is read at once, not when the block (1 s) ends. And the done event's stream
    entry id is kept, for the overhead's commit/delivery split."""
    import time
    from dataclasses import replace

    from bench.serve import StreamReader, Turn
    from shared.client import TurnClient
    from shared.protocol import EVENT_FIELD, Done, encode_event, stream_key
    from shared.settings import Settings

    client = TurnClient(replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path))
    reader = StreamReader(client, timeout=60)
    try:
        assert reader.BLOCK_MS >= 1000
        reader.add("job-a", Turn(channel=0))  # nothing comes on this one: the reader blocks on it
        time.sleep(0.3)
        turn = Turn(channel=1, enqueued=time.perf_counter())
        done = reader.add("job-b", turn)
        added = time.perf_counter()
        entry = client.r.xadd(stream_key("job-b"), {EVENT_FIELD: encode_event(Done(text="hi", prompt_tokens=3,
                                                                                     completion_tokens=7))})
        assert done.wait(5)
        waited = time.perf_counter() - added
        assert waited < 0.5, f"the done event was read {waited:.2f} s after its turn was added"
        assert turn.tokens == 7 and turn.done_entry_ms == int(entry.split(b"-")[0])
        assert turn.done_wall is not None and turn.done_wall * 1000 >= turn.done_entry_ms - 1
    finally:
        reader.stop()
    assert not client.r.exists(reader.wake.key)


def test_a_bench_client_process_that_dies_without_a_word_is_told_as_such():
    import multiprocessing

    from bench.serve import _receive

    parent_end, child_end = multiprocessing.get_context("fork").Pipe(duplex=False)
    child_end.send("ready")
    child_end.close()
    assert _receive(parent_end) == "ready"
    assert _receive(parent_end) == {"error": "it ended without sending its turns"}


def test_a_bench_client_process_that_fails_stops_the_row_at_once(redis_proc, tmp_path, monkeypatch):
    """One client process failing before the row starts is one clear error, and the others (waiting for the row's
    start) are stopped at once, not waited for."""
    import time
    from dataclasses import replace

    import pytest

    import bench.serve as serve
    from shared.errors import ShallowError
    from shared.settings import Settings

    settings = replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path)
    monkeypatch.setattr("shared.client.TurnClient.workers_alive", lambda self: 1)  # no turn is sent: no worker needed
    real = serve.play_channels

    def play(settings, channel_ids, *args, **kwargs):
        if 1 in channel_ids:
            raise RuntimeError("no connection for you")
        return real(settings, channel_ids, *args, **kwargs)

    monkeypatch.setattr(serve, "play_channels", play)  # a fault put in: the forked children run this module's one
    began = time.monotonic()
    with pytest.raises(ShallowError, match="RuntimeError: no connection for you"):
        serve.run_end_to_end(settings, channels=3, turns=1, new_tokens=4, run_id="t", client_processes=3)
    assert time.monotonic() - began < 8
