"""`shallow worker`: load the model once, then run RQ's worker loop in this one process.

A SimpleWorker, not RQ's forking Worker: a forked work-horse would lose the loaded model (and CUDA).
Without a work-horse nobody beats the heart while a job runs, so this worker beats it from a thread,
with a short time-to-live: when the process dies (kill -9, a lost box), its job is seen as abandoned
within `SHALLOW_HEARTBEAT_TTL` seconds and any other worker's maintenance hands it on (RQ's retry).
"""
from __future__ import annotations

import logging
import os
import random
import signal
import sys
import threading
from dataclasses import replace

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.exceptions import StopRequested
from rq.timeouts import TimerDeathPenalty
from rq.utils import now
from rq.worker import WorkerStatus

from shared import collector
from shared.errors import ConfigError
from shared.redis_conn import connect, redact
from shared.sessions import SessionStore
from shared.settings import Settings
from worker import jobs
from worker.supervisor import SIBLINGS_ENV
from worker.backends import load_backend

logger = logging.getLogger(__name__)

SWITCH_INTERVAL = 0.001  # seconds a thread may hold the interpreter lock while others wait (Python's default: 0.005)


class ShallowWorker(SimpleWorker):
    """RQ's SimpleWorker with a heartbeat thread while a job runs and a short abandonment time."""

    def __init__(self, *args, heartbeat_ttl: int = 15, stop_timeout: float = 60.0, **kwargs) -> None:
        self.heartbeat_ttl = heartbeat_ttl
        self.stop_timeout = stop_timeout
        super().__init__(*args, **kwargs)

    def handle_warm_shutdown_request(self) -> None:
        """First SIGTERM: finish the reply being written, for at most `stop_timeout` seconds, then exit.

        RQ itself turns a second SIGTERM into a cold shutdown; the timer sends that second signal when the
        bound passes. A job cut off that way is abandoned, and another worker retries it (one reply: see jobs.py).
        """
        super().handle_warm_shutdown_request()
        if self.get_state() == WorkerStatus.BUSY and self.stop_timeout > 0:
            logger.info("finishing the current reply first (at most %.0fs); a second SIGTERM stops at once", self.stop_timeout)
            timer = threading.Timer(self.stop_timeout, os.kill, args=(os.getpid(), signal.SIGTERM))
            timer.daemon = True
            timer.start()

    def get_heartbeat_ttl(self, job: Job, working_time: float = 0.0) -> int:
        return self.heartbeat_ttl

    def execute_job(self, job: Job, queue: Queue) -> None:
        execution = self.prepare_execution(job)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(job, execution, stop), name="heartbeat", daemon=True)
        beat.start()
        try:
            self.perform_job(job, queue, execution)
        finally:
            stop.set()
            beat.join()
        self.set_state(WorkerStatus.IDLE)

    def _beat(self, job: Job, execution, stop: threading.Event) -> None:
        interval = max(1.0, self.heartbeat_ttl / 3)
        while not stop.wait(interval):
            try:
                with self.connection.pipeline() as p:
                    execution.heartbeat(job.started_job_registry, self.heartbeat_ttl, p)
                    self.heartbeat(self.worker_ttl, pipeline=p)
                    p.execute()
            except Exception:  # a missed beat is retried at the next one; the job goes on
                logger.warning("heartbeat for job %s failed", job.id, exc_info=True)


class SlotWorker(ShallowWorker):
    """One of several RQ worker loops in one process (`--slots N`), each in its own thread.

    Each is a full RQ worker (its own name, state, heartbeats, started/finished/failed registries), so
    every job keeps RQ's semantics; they share the process's model. Signals reach the main thread,
    which stops the slots (see run_slots); job timeouts use a timer instead of SIGALRM.
    """

    death_penalty_class = TimerDeathPenalty
    BEAT_EVERY = 1.0  # seconds: a beat asked for sooner after the last one is skipped (the key lives worker_ttl + 60 s)

    def __init__(self, *args, turnstile: threading.Semaphore | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._wait = round(random.uniform(2.0, 6.0), 3)
        self._turnstile = turnstile  # shared by the slots of a front: one of them waits on Redis at a time
        self._listening = False

    def _install_signal_handlers(self) -> None:
        pass  # signals are the main thread's; it tells every slot

    def dequeue_job_and_maintain_ttl(self, timeout, *args, **kwargs):
        """Wait for a job as RQ does, but each slot with a wait of its own length (2 to 6 s).

        Redis hands a new job to the client that has waited longest. Slots that all time out and wait
        again together queue up process by process, so with two worker processes every job went to the
        slots of one of them until it had taken 256: at 16 or 64 channels the second GPU stood idle
        (measured, issue 11). Waits of different lengths interleave the processes in that line.

        The slots of a front (`--fronts`) share a turnstile: one of them waits on Redis at a time, and
        when it takes a job the next takes its place at the back of Redis' line. So jobs go round the
        fronts, each to the front that has waited longest, instead of filling one front's slots first:
        16 fronts of 16 slots at 16 channels had put 7-9 turns in three fronts and none in eight, and a
        front's jobs share one interpreter lock (measured on the H200, session 9).
        """
        self._holding_job = False
        if timeout is not None:
            timeout = self._wait
        if self._turnstile is None:
            return super().dequeue_job_and_maintain_ttl(timeout, *args, **kwargs)
        self.set_state(WorkerStatus.IDLE)
        while not self._turnstile.acquire(timeout=self._wait):  # another slot of this front is listening
            self.heartbeat()  # registered all the while; a stopping slot leaves here
        self._listening = True
        try:
            return super().dequeue_job_and_maintain_ttl(timeout, *args, **kwargs)
        finally:
            self._stop_listening()

    def _stop_listening(self) -> None:
        if self._listening:
            self._listening = False
            self._turnstile.release()

    def reorder_queues(self, reference_queue) -> None:
        self._holding_job = True  # RQ calls this right after it took a job: that job must run, stopping or not
        self._stop_listening()  # the next idle slot of this front takes its place in Redis' line now
        super().reorder_queues(reference_queue)

    def set_state(self, state: str, pipeline=None):
        """RQ writes the state again each time a slot goes back to waiting: not when Redis has it already."""
        if pipeline is None and state == self._state:
            return
        super().set_state(state, pipeline)

    def heartbeat(self, timeout: int | None = None, pipeline=None):
        """RQ's idle loop beats between waits for a job: where a stopping slot leaves (within one wait).

        RQ also beats once more after taking a job, before running it; leaving there would strand the job
        in RQ's intermediate queue until maintenance finds it (a reply ~60 s late), so a slot that holds
        a job runs it first. RQ beats before and after each wait, three commands each time; within
        BEAT_EVERY seconds of the last beat that is skipped (the job's own beats, in a pipeline, are not).
        """
        if (pipeline is None and self._stop_requested and not getattr(self, "_holding_job", False)
                and self.get_state() == WorkerStatus.IDLE):
            raise StopRequested()
        last = getattr(self, "last_heartbeat", None)
        if pipeline is None and last is not None and (now() - last).total_seconds() < self.BEAT_EVERY:
            return None
        return super().heartbeat(timeout, pipeline)


def build_worker(settings: Settings, connection, name: str | None = None, cls: type[ShallowWorker] = ShallowWorker,
                 **extra) -> ShallowWorker:
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer)
    return cls(
        [queue],
        connection=connection,
        serializer=JSONSerializer,
        name=name,
        heartbeat_ttl=settings.heartbeat_ttl,
        stop_timeout=settings.stop_timeout,
        # idle workers wake every few seconds (worker_ttl - 15) to beat and run maintenance, which is
        # where abandoned jobs of dead workers are found and retried
        worker_ttl=20,
        maintenance_interval=max(5, settings.heartbeat_ttl // 2),
        job_monitoring_interval=max(1, settings.heartbeat_ttl // 3),
        **extra,
    )


def run(settings: Settings, *, burst: bool = False, name: str | None = None) -> int:
    """Load the model, then work until stopped. Returns the process exit code."""
    connection = connect(settings.redis_url)
    logger.info("connected to Redis at %s, queue %r", redact(settings.redis_url or "redis://localhost:6379/0"), settings.queue)
    if settings.slots > 1 and settings.backend not in ("batched",):
        logger.warning("SHALLOW_SLOTS=%d without SHALLOW_BACKEND=batched: the slots share one model without batching",
                       settings.slots)
    from worker import remote

    backend = remote.connect_from_env(settings)  # a front of `--fronts`: the model is in the parent process
    if backend is None:
        fronts = resolve_fronts(settings)
        settings = replace(settings, fronts=fronts)
        backend = load_backend(settings)
        if fronts > 0:  # hold the model; the jobs run in front processes
            settle_collector()
            try:
                return remote.serve(settings, backend, name)
            finally:
                backend.close()
    store = SessionStore(connection, settings.session_ttl, settings.stream_ttl, settings.stream_maxlen, settings.history_keep)
    settle_collector()
    try:
        if settings.slots > 1:
            return run_slots(settings, connection, backend, store, burst=burst, name=name,
                             one_listener=isinstance(backend, remote.RemoteBackend))
        return _run_one(settings, connection, backend, store, burst=burst, name=name)
    finally:
        backend.close()


def settle_collector() -> None:
    """Before serving: what is alive now (the libraries, the model, the tokenizer) is kept out of the garbage
    collector's full passes (`shared.collector`). One full pass over a worker with SmolLM2 loaded took 166-233 ms
    on the 2-core CI machine, every reply of the process stopped meanwhile; they are rare (none in 962 turns
    there), and frozen they look only at what was made since. Full collections still longer than 50 ms are logged."""
    import gc

    collector.freeze()
    collector.Pauses(log_over_ms=50).start()
    logger.info("%d objects kept out of the garbage collector's full passes", gc.get_freeze_count())


SLOTS_PER_FRONT = 16  # auto: one front process per 16 slots (H200: 16 fronts of 16 beat 8 of 32 at 256 channels)
MIN_AUTO_SLOTS = 32  # auto: fewer slots stay in one process (two fronts at least, or none)


def resolve_fronts(settings: Settings) -> int:
    """How many front processes this worker runs (`--fronts`, SHALLOW_FRONTS; None: auto).

    Auto: on CUDA, with the batched backend's slot engine and 32 slots or more, one front per 16 slots,
    at most one per CPU this process may use (shared with the worker processes beside it under
    `--processes`/`--gpus`). Measured on an H200 with 256 channels: 16,977 tokens/s with 16 fronts
    against 7,082 in one process (docs/serving.md). Elsewhere none: on a CPU the model takes every core.
    """
    slot_engine = settings.backend == "batched" and settings.batch_engine == "slots"
    if settings.fronts is not None:
        if settings.fronts > 0 and not slot_engine:
            raise ConfigError("--fronts (SHALLOW_FRONTS) needs SHALLOW_BACKEND=batched with the slot engine "
                              f"(SHALLOW_BATCH_ENGINE=slots); this worker has {settings.backend!r}")
        return settings.fronts
    if not slot_engine or settings.slots < MIN_AUTO_SLOTS or settings.device == "cpu":
        return 0
    import torch

    if not torch.cuda.is_available():
        return 0
    siblings = max(1, int(os.environ.get(SIBLINGS_ENV) or 1))
    cpus = max(1, len(os.sched_getaffinity(0)) // siblings)
    fronts = min(settings.slots // SLOTS_PER_FRONT, cpus)
    return fronts if fronts >= 2 else 0


def _run_one(settings: Settings, connection, backend, store: SessionStore, *, burst: bool, name: str | None) -> int:
    worker = build_worker(settings, connection, name)
    jobs.install(jobs.Runtime(settings=settings, backend=backend, connection=connection, store=store, name=worker.name))
    logger.info("worker %s ready", worker.name)
    worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))
    return 0


def run_slots(settings: Settings, connection, backend, store: SessionStore, *, burst: bool, name: str | None,
              one_listener: bool = False) -> int:
    """`settings.slots` RQ worker loops in threads over one model; the main thread handles the signals.
    `one_listener` (the fronts of `--fronts`): one slot at a time waits on Redis for a job (SlotWorker).

    First SIGTERM/SIGINT: every slot stops taking jobs and finishes the reply it is writing (at most
    SHALLOW_STOP_TIMEOUT seconds); a second: cold stop, the replies being written are retried elsewhere.
    """
    import socket

    base = name or f"{socket.gethostname()}.{os.getpid()}"
    turnstile = threading.Semaphore(1) if one_listener else None
    workers = [build_worker(settings, connection, f"{base}.{k}", cls=SlotWorker, turnstile=turnstile)
               for k in range(settings.slots)]
    jobs.install(jobs.Runtime(settings=settings, backend=backend, connection=connection, store=store, name=base))
    level = logging.getLevelName(logging.getLogger().level)
    threads = [
        threading.Thread(target=w.work, kwargs={"burst": burst, "logging_level": level}, name=f"slot-{k}", daemon=True)
        for k, w in enumerate(workers)
    ]
    signals = {"n": 0}

    def on_signal(signum, frame) -> None:  # noqa: ANN001 - signal's signature
        signals["n"] += 1
        if signals["n"] == 1:
            busy = [w for w in workers if w.get_state() == WorkerStatus.BUSY]
            logger.info("stopping %d slots; %d replies being written are finished first (at most %ds)",
                        len(workers), len(busy), settings.stop_timeout)
            for w in workers:
                w._stop_requested = True  # RQ's loop checks it before taking the next job
            if busy and settings.stop_timeout > 0:
                timer = threading.Timer(settings.stop_timeout, os.kill, args=(os.getpid(), signal.SIGTERM))
                timer.daemon = True
                timer.start()
            return
        logger.warning("cold stop: replies being written are handed to other workers")
        for w in workers:
            try:
                w.register_death()
            except Exception:  # the process ends either way
                pass
        os._exit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Hundreds of threads share one interpreter lock here. A thread back from Redis (or the engine back
    # from the GPU) waits for the lock until the running thread is made to yield: after 5 ms by default,
    # for every round trip of every job. A shorter interval hands it over sooner.
    sys.setswitchinterval(SWITCH_INTERVAL)
    for t in threads:
        t.start()
    logger.info("worker %s ready: %d slots", base, len(workers))
    while any(t.is_alive() for t in threads):
        for t in threads:
            t.join(0.5)
    return 0
