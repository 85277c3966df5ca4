"""One worker process serving several channels at once (`--slots N`, the batched backend), and `shallow bench`.

Each slot is a real RQ worker loop: every job shows as started by a slot, ends on its own (finished,
cancelled), streams its own chunks, and is written to its session once.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys

import pytest
from rq import Worker
from rq.job import Job, JobStatus
from rq.serializers import JSONSerializer

from shared.client import TurnClient
from shared.protocol import Chunk, Done, Mode, Start, decode_event, stream_key
from tests.conftest import ROOT, wait_for

pytestmark = pytest.mark.slow


def events_of(client: TurnClient, job_id: str) -> list:
    return [decode_event(f[b"e"]) for _, f in client.r.xrange(stream_key(job_id))]


def start_slotted(env, processes, slots: int, name: str, **overrides: str):
    proc = processes.start(["worker", "--slots", str(slots), "--name", name],
                           env.vars(SHALLOW_BACKEND="batched", **overrides), name)
    conn = env.redis.client()
    names = {f"{name}.{k}" for k in range(slots)}

    def ready():
        if proc.poll() is not None:
            raise AssertionError(proc.log_path.read_text()[-3000:])
        return {w.name for w in Worker.all(connection=conn)} >= names

    wait_for(ready, 180, f"the {slots} slots of {name}")
    return proc, names


def test_one_process_serves_several_channels_at_once_each_job_on_its_own(env, processes):
    proc, slots = start_slotted(env, processes, 3, "batch", SHALLOW_MAX_NEW_TOKENS="120")
    client = TurnClient(env.settings())
    subs = [client.chat(f"console:b{i}", f"Tell me about the number {i}.", max_new_tokens=24) for i in range(4)]
    long = client.chat("console:long", "Tell me a long story about a clockmaker.", max_new_tokens=120, ignore_eos=True)
    wait_for(lambda: any(isinstance(e, Chunk) for e in events_of(client, long.job_id)), 120, "the long reply to start")
    client.cancel(long.job_id)  # stops alone; the others go on
    ends = {}
    for sub in [*subs, long]:
        events = list(client.follow(sub.job_id, timeout=300, poll=0.2))
        assert isinstance(events[-1], Done), events[-1]
        ends[sub.job_id] = events[-1]
        stream = events_of(client, sub.job_id)
        starts = [e for e in stream if isinstance(e, Start)]
        assert [e.attempt for e in starts] == [1] and starts[0].worker in slots
        assert sum(isinstance(e, Done) for e in stream) == 1
        assert "".join(e.text for e in stream if isinstance(e, Chunk)).strip() == events[-1].text
        assert len(client.store.history(sub.request.channel, Mode.CHAT)) == 2  # written once
    assert ends[long.job_id].finish_reason == "cancelled" and ends[long.job_id].completion_tokens < 120
    assert all(ends[s.job_id].finish_reason in ("stop", "length") for s in subs)
    def fetched():
        return [Job.fetch(s.job_id, connection=client.r, serializer=JSONSerializer) for s in [*subs, long]]

    # RQ marks a job finished just after its function returns, which is after the reply's done event
    wait_for(lambda: all(j.get_status() == JobStatus.FINISHED for j in fetched()), 30, "RQ to finish every job")
    jobs = fetched()
    assert len({j.worker_name for j in jobs}) >= 2  # more than one slot took jobs
    spans = sorted((j.started_at, j.ended_at) for j in jobs)
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])), spans  # they ran at the same time

    # SIGTERM: the slots finish what they are writing, then the process leaves and deregisters them
    last = client.chat("console:last", "Name a colour.", max_new_tokens=40, ignore_eos=True)
    wait_for(lambda: any(isinstance(e, Chunk) for e in events_of(client, last.job_id)), 120, "the last reply to start")
    proc.send_signal(signal.SIGTERM)
    # a turn sent just then is taken by a slot still waiting for work: it must be written, not stranded
    # in RQ's intermediate queue (a slot used to leave right after taking it; the reply came a minute later)
    late = client.chat("console:late", "Name a fruit.", max_new_tokens=8, ignore_eos=True)
    events = list(client.follow(last.job_id, timeout=120, poll=0.2))
    assert isinstance(events[-1], Done) and events[-1].completion_tokens == 40
    late_events = list(client.follow(late.job_id, timeout=30, poll=0.2))
    assert isinstance(late_events[-1], Done) and late_events[-1].completion_tokens == 8
    assert [e.attempt for e in events_of(client, late.job_id) if isinstance(e, Start)] == [1]
    proc.wait(60)
    assert proc.returncode == 0
    assert not {w.name for w in Worker.all(connection=client.r)} & slots


def test_bench_runs_end_to_end_and_direct(env, tmp_path):
    out = tmp_path / "bench.json"
    base = [sys.executable, "-m", "shared.cli", "bench", "--turns", "1", "--new-tokens", "8", "--warmup", "0"]
    environ = env.vars(SHALLOW_BACKEND="batched")
    environ.pop("REDIS_URL")  # its own Redis and worker
    proc = subprocess.run([*base, "--channels", "1,3", "--worker-args", "--slots 3", "--client-processes", "2", "--stagger", "0.2",
                           "--json", str(out)],
                          env=environ, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["channels"] for r in rows] == [1, 3] and all(r["mode"] == "end-to-end" for r in rows)
    for r in rows:
        assert r["errors"] == 0 and r["tokens"] == 8 * r["channels"] and r["tokens_per_s"] > 0
        assert r["ttft_p50_s"] > 0 and r["overhead_p50_ms"] is not None and r["queue_wait_p50_s"] is not None
        split = r["extra"]["overhead_split_ms"]  # the worker's own figures, and what is left of the overhead
        assert set(split) == {"rq_start", "before_model", "flush", "enqueue", "commit", "delivery", "rest"}, split
        # ms clocks (the done event's stream entry id is Redis' ms): a part may read 1 ms under what it was
        assert all(split[k]["p50"] >= -1.0 for k in ("rq_start", "before_model", "flush", "enqueue", "commit", "delivery"))
        assert split["before_model"]["p50"] > 0  # the job reads its history and fits its prompt before the model
        assert r["extra"]["host"]["python_us"] > 0 and r["extra"]["host"]["cpus"] >= 1  # the host it ran on
        # the channels dealt out to 2 client processes (one channel: one process), and their CPU counted
        assert r["extra"]["client_processes"] == min(2, r["channels"]) and r["extra"]["client_cpu_s"] > 0
        assert 0 < r["extra"]["client_cpu_per_process"] <= 1.5 and r["extra"]["stagger_s"] == 0.2
        # what the row cost Redis (its commands: the worker's XADDs of the reply's chunks among them) and the host's
        # cores, the worker processes' share within them
        redis = r["extra"]["redis"]
        assert redis["commands_per_turn"] > 10 and "xadd" in redis["commands"] and redis["cpu_per_s"] is not None
        cpu = r["extra"]["cpu"]
        assert 0 < cpu["worker_cores_busy"] <= cpu["host_cores"] and cpu["host_cores_busy"] > 0
    assert "| end-to-end | 3 |" in proc.stdout and "before_model p50 / p95 ms" in proc.stdout and "delivery p50 / p95 ms" in proc.stdout
    assert "workers' cores busy" in proc.stdout
    # the channels played as the chat bots play theirs: one loop, the bots' own delivery code
    bot = subprocess.run([*base, "--channels", "3", "--worker-args", "--slots 3", "--as-bot", "--json", str(out)],
                         env=environ, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert bot.returncode == 0, bot.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "end-to-end, as a bot" and row["errors"] == 0 and row["tokens"] == 8 * 3
    assert row["ttft_p50_s"] > 0 and row["overhead_p50_ms"] is not None and row["queue_wait_p50_s"] is not None
    split = row["extra"]["overhead_split_ms"]  # the done event's stream entry is not seen there: commit and delivery as one
    assert {"rq_start", "before_model", "enqueue", "commit + delivery", "rest"} <= set(split), split
    assert "delivery" not in split and "commit" not in split
    assert split["commit + delivery"]["p50"] > 0  # the worker's clock at its commit -> the final text shown
    assert "| end-to-end, as a bot | 3 |" in bot.stdout and "commit + delivery p50 / p95 ms" in bot.stdout
    direct = subprocess.run([*base, "--direct", "--channels", "2", "--json", str(out)],
                            env=environ, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert direct.returncode == 0, direct.stderr[-3000:]
    (row,) = json.loads(out.read_text())
    assert row["mode"] == "direct" and row["tokens"] == 16 and row["errors"] == 0

