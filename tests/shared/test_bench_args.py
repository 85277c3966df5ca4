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


def test_a_row_records_what_it_cost_redis_and_the_host(redis_proc):
    """Redis' own CPU and its commands over a row (INFO cpu, commandstats), and the host's busy cores: the
    commands sent between two snapshots are counted per turn, the heaviest first."""
    import os
    import subprocess
    import sys

    from bench.serve import cpu_load, cpu_snapshot, redis_load, redis_snapshot

    r = redis_proc.client()
    child = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass"],
                             start_new_session=True)  # a 'worker' that spins for 0.6 s of CPU, in a session of its own
    try:
        before, cpu_before = redis_snapshot(r), cpu_snapshot([child.pid])
        with r.pipeline(transaction=False) as p:
            for i in range(40):
                p.xadd("s", {"k": "x" * 100})
            for i in range(20):
                p.expire("s", 60)
            p.execute()
        child.wait(30)
        after, cpu_after = redis_snapshot(r), cpu_snapshot([child.pid])
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    load = redis_load(before, after, wall=2.0, turns=4)
    assert load["commands"]["xadd"]["per_turn"] == 10 and load["commands"]["expire"]["per_turn"] == 5
    assert list(load["commands"])[0] == "xadd"  # the heaviest first: 40 XADDs take longer than 20 EXPIREs
    assert load["commands_per_turn"] >= 15 and load["command_usec_per_turn"] > 0 and load["cpu_per_s"] >= 0
    # the child's CPU is read while it lives; it is gone at the second snapshot, so only the host sees all of it
    assert cpu_before is not None and cpu_after is not None
    host = cpu_load(cpu_before, cpu_after, wall=1.0)
    assert host["host_cores"] == os.cpu_count() and host["host_cores_busy"] >= 0.5  # the child's 0.6 s, at least
    assert cpu_load(None, cpu_after, 1.0) == {}


def test_the_stagger_spreads_the_channels_first_turns(redis_proc, tmp_path, monkeypatch):
    """--stagger S: each channel waits its own delay, between 0 and S, before its first turn (the same one in
    every run); 0 sends them all at once."""
    import threading
    import time
    from dataclasses import replace

    import bench.serve as serve
    from shared.settings import Settings

    settings = replace(Settings.from_env(), redis_url=redis_proc.url, home=tmp_path)
    sent: dict[int, float] = {}
    lock = threading.Lock()

    def chat(self, channel, *args, **kwargs):
        with lock:
            sent[int(channel.rsplit(":", 1)[1])] = time.perf_counter() - began
        raise RuntimeError("no worker here")  # counted as the turn's error; the bench goes on

    monkeypatch.setattr("shared.client.TurnClient.chat", chat)
    began = time.perf_counter()
    played = serve.play_channels(settings, list(range(6)), turns=1, new_tokens=4, run_id="s", stagger=1.0)
    assert len(played["results"]) == 6 and all(t.error for _, t in played["results"])
    delays = [serve.random.Random(i).uniform(0.0, 1.0) for i in range(6)]
    assert max(delays) - min(delays) > 0.3
    for i in range(6):
        assert delays[i] - 0.05 <= sent[i] <= delays[i] + 0.5, (i, sent[i], delays[i])
    sent.clear()
    began = time.perf_counter()
    serve.play_channels(settings, list(range(6)), turns=1, new_tokens=4, run_id="t")
    assert max(sent.values()) < 0.3  # no stagger: all at once


def test_the_stagger_is_checked():
    from bench.serve import parse_args

    assert parse_args(["--stagger", "1.5"]).stagger == 1.5
    with pytest.raises(SystemExit):
        parse_args(["--stagger", "-1"])


def test_a_redis_that_refuses_info_leaves_those_columns_empty(redis_proc, caplog):
    """A managed Redis may refuse INFO: the bench says so once a row and goes on, its Redis columns empty."""
    import redis

    from bench.serve import Row, redis_load, redis_snapshot, redis_table

    admin = redis_proc.client()
    admin.execute_command("ACL", "SETUSER", "noinfo", "on", "nopass", "~*", "&*", "+@all", "-info")
    try:
        r = redis.Redis.from_url(redis_proc.url, username="noinfo", password="")
        with caplog.at_level("WARNING", logger="bench.serve"):
            assert redis_snapshot(r) is None
        assert "refuses INFO" in caplog.text
        assert redis_load(None, None, 1.0, 4) == {}
        row = Row(mode="end-to-end", channels=4, turns=4, new_tokens=8, wall_s=1.0, tokens=32, tokens_per_s=32.0,
                  per_stream_tokens_per_s_p50=None, ttft_p50_s=None, ttft_p95_s=None, queue_wait_p50_s=None,
                  queue_wait_p95_s=None, overhead_p50_ms=None, overhead_p95_ms=None, errors=0,
                  extra={"redis": {}, "cpu": {"host_cores_busy": 1.5, "host_cores": 2, "worker_cores_busy": 1.0}})
        assert "| 4 | 1.50 of 2 | 1.00 | - | - | - | - |" in redis_table([row])
    finally:
        admin.execute_command("ACL", "DELUSER", "noinfo")
