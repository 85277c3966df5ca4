"""`shallow worker`: load the model once, then run RQ's worker loop in this one process.

A SimpleWorker, not RQ's forking Worker: a forked work-horse would lose the loaded model (and CUDA).
Without a work-horse nobody beats the heart while a job runs, so this worker beats it from a thread,
with a short time-to-live: when the process dies (kill -9, a lost box), its job is seen as abandoned
within `SHALLOW_HEARTBEAT_TTL` seconds and any other worker's maintenance hands it on (RQ's retry).
"""
from __future__ import annotations

import logging
import os
import signal
import threading

from rq import Queue, SimpleWorker
from rq.job import Job
from rq.serializers import JSONSerializer
from rq.worker import WorkerStatus

from shared.redis_conn import connect, redact
from shared.sessions import SessionStore
from shared.settings import Settings
from worker import jobs
from worker.backends import load_backend

logger = logging.getLogger(__name__)


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


def build_worker(settings: Settings, connection, name: str | None = None) -> ShallowWorker:
    queue = Queue(settings.queue, connection=connection, serializer=JSONSerializer)
    return ShallowWorker(
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
    )


def run(settings: Settings, *, burst: bool = False, name: str | None = None) -> int:
    """Load the model, then work until stopped. Returns the process exit code."""
    connection = connect(settings.redis_url)
    logger.info("connected to Redis at %s, queue %r", redact(settings.redis_url or "redis://localhost:6379/0"), settings.queue)
    backend = load_backend(settings)
    store = SessionStore(connection, settings.session_ttl, settings.stream_ttl, settings.stream_maxlen)
    worker = build_worker(settings, connection, name)
    jobs.install(jobs.Runtime(settings=settings, backend=backend, connection=connection, store=store, name=worker.name))
    logger.info("worker %s ready", worker.name)
    worker.work(burst=burst, logging_level=logging.getLevelName(logging.getLogger().level))
    return 0
