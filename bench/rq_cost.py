"""What RQ's worker loop costs per job, with nothing else in it: the floor under the pipeline overhead.

    python -m bench.rq_cost --jobs 400

Starts a redis-server of its own (Unix socket), enqueues `--jobs` jobs whose function does nothing
(`os.getpid`), runs one RQ SimpleWorker over them in burst mode and prints, per job: wall time, the
worker's CPU time and the Redis commands it sent (counted by the server). In `shallow worker` every job
of a process pays this on one interpreter lock, so jobs that arrive together wait for each other's.
"""
from __future__ import annotations

import argparse
import time

from bench import own_redis


def main(argv: list[str] | None = None) -> int:
    from rq import Queue, SimpleWorker
    from rq.serializers import JSONSerializer

    from shared.redis_conn import connect

    p = argparse.ArgumentParser(prog="python -m bench.rq_cost")
    p.add_argument("--jobs", type=int, default=400)
    args = p.parse_args(argv)
    with own_redis("shallow-rqcost-") as url:
        r = connect(url)
        q = Queue("rq-cost", connection=r, serializer=JSONSerializer)
        for _ in range(args.jobs):
            q.enqueue("os.getpid")
        worker = SimpleWorker([q], connection=r, serializer=JSONSerializer)

        def commands() -> dict[str, int]:
            return {k: v["calls"] for k, v in r.info("commandstats").items()}

        before = commands()
        wall, cpu = time.perf_counter(), time.process_time()
        worker.work(burst=True, logging_level="WARNING")
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        after = commands()
        per = {k.removeprefix("cmdstat_"): (v - before.get(k, 0)) / args.jobs for k, v in after.items()}
        per.pop("info", None)  # the counting itself
        done = q.finished_job_registry.count
        n = args.jobs
        print(f"{done} of {n} jobs finished: {wall / n * 1000:.2f} ms wall, {cpu / n * 1000:.2f} ms of worker CPU and "
              f"{sum(per.values()):.1f} Redis commands per job")
        print("commands per job: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items(), key=lambda kv: -kv[1]) if v >= 0.5))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
