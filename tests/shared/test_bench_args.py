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
