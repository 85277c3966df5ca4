"""SlotWorker's own Redis traffic between jobs (worker/main.py), counted by a real redis-server."""
from __future__ import annotations

from dataclasses import replace

from rq.worker import WorkerStatus

from shared.settings import Settings
from worker.main import SlotWorker, build_worker


def calls(r, command: str) -> int:
    return r.info("commandstats").get(f"cmdstat_{command}", {}).get("calls", 0)


def test_a_slot_writes_an_unchanged_state_and_a_recent_beat_once(redis_proc):
    r = redis_proc.client()
    settings = replace(Settings.from_env(), redis_url=redis_proc.url)
    worker = build_worker(settings, r, "slot-test.0", cls=SlotWorker)
    hsets = calls(r, "hset")
    worker.set_state(WorkerStatus.IDLE)
    worker.set_state(WorkerStatus.IDLE)  # as RQ does again when the slot goes back to waiting
    assert calls(r, "hset") == hsets + 1
    assert r.hget(worker.key, "state") == b"idle"
    worker.set_state(WorkerStatus.BUSY)  # a new state is always written
    assert r.hget(worker.key, "state") == b"busy"

    expires = calls(r, "expire")
    worker.heartbeat()
    worker.heartbeat()  # within BEAT_EVERY of the last: skipped
    assert calls(r, "expire") == expires + 2  # one beat: the worker's key and its executions' key
    worker.last_heartbeat = worker.last_heartbeat.replace(year=2000)  # long ago: beats again
    worker.heartbeat()
    assert calls(r, "expire") == expires + 4
