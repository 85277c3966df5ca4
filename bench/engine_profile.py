"""Where the slot engine's decoding step spends its time: ms per step by rows, and the top GPU kernels.

    python -m bench.engine_profile --rows 1,16,64,256 --positions 256 [--fuse] [--compile model|split|step] [--mode M] [--inductor KEY=VALUE]

Loads the batched backend as the worker would (SHALLOW_* settings), stops its engine loop, and drives the
step directly (with `--fuse`/`--compile`/`--mode`, on a new engine over the same model built that way): every row live, `--positions` cache positions attended. On CUDA each figure is the
captured step replayed 50 times between two CUDA events; `--kernels` adds a torch.profiler table of the
step run eagerly (the same kernels the graph replays).
"""
from __future__ import annotations

import argparse
import dataclasses
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from shared.settings import Settings
    from worker.batching import BatchedBackend

    p = argparse.ArgumentParser(prog="python -m bench.engine_profile")
    p.add_argument("--rows", default="1,16,64,256")
    p.add_argument("--positions", type=int, default=256)
    p.add_argument("--kernels", action="store_true")
    p.add_argument("--fuse", action="store_true", help="fuse q/k/v and gate/up first (worker/fuse.py)")
    p.add_argument("--compile", choices=["off", "model", "split", "step"], default=None, help="torch.compile what (default: the settings')")
    p.add_argument("--mode", default=None, help="torch.compile mode, e.g. max-autotune-no-cudagraphs")
    p.add_argument("--int4", type=int, default=0, metavar="GROUP",
                   help="int4 weights (torchao's tinygemm layout, a scale and zero per GROUP inputs) on the fused model")
    p.add_argument("--lock", default=None, metavar="FILE",
                   help="hold an exclusive lock on FILE while timing (runs built side by side then time one at a time)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set torch._inductor.config.KEY (a Python literal) before compiling, e.g. coordinate_descent_tuning=True")
    args = p.parse_args(argv)
    rows = [int(r) for r in args.rows.split(",")]
    if args.inductor:
        import ast

        import torch._inductor.config as inductor

        for item in args.inductor:
            key, _, value = item.partition("=")
            inductor_value = ast.literal_eval(value)
            obj = inductor
            *path, last = key.split(".")
            for part in path:
                obj = getattr(obj, part)
            if not hasattr(obj, last):
                raise SystemExit(f"python -m bench.engine_profile: torch._inductor.config has no {key!r}")
            setattr(obj, last, inductor_value)
            print(f"torch._inductor.config.{key} = {inductor_value!r}")
    settings = Settings.from_env()
    settings = dataclasses.replace(settings, backend="batched", slots=max(rows))
    t0 = time.perf_counter()
    backend = BatchedBackend.load(settings)
    print(f"loaded in {time.perf_counter() - t0:.1f} s: {backend.description}")
    engine = backend.engine
    engine.stop()
    if args.int4:
        from worker.quantize import quantize_int4

        t0 = time.perf_counter()
        n = quantize_int4(backend.model, args.int4)
        print(f"int4 weights (group {args.int4}, {n} linear layers) in {time.perf_counter() - t0:.1f} s; "
              f"{torch.cuda.memory_allocated() / 2**30 if torch.cuda.is_available() else 0:.2f} GiB allocated")
    if args.fuse or args.compile is not None or args.mode or args.inductor or args.int4:
        from worker.engine import SlotEngine
        from worker.fuse import fuse_projections

        if args.fuse:
            print(f"fused {fuse_projections(backend.model)} layers")
        compile_ = False if args.compile in (None, "off") else args.compile
        t0 = time.perf_counter()
        engine = SlotEngine(backend.model, engine.rows, engine.length, cuda_graphs=engine.use_graphs,
                            compile=compile_, compile_mode=args.mode)
        engine.stop()
        print(f"engine built (compile {compile_}, mode {args.mode}) and captured in {time.perf_counter() - t0:.1f} s")
    cuda = engine.device.type == "cuda"
    if args.lock:
        import fcntl

        lock = open(args.lock, "a")
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the process ends
    length = next(size for size in engine.len_buckets if size >= args.positions)
    with torch.inference_mode():
        engine.start.zero_()
        engine.temperature.fill_(0.7)
        engine.top_p.fill_(0.9)
        engine.penalty.fill_(1.1)
        for b in rows:
            bucket = next(size for size in engine.row_buckets if size >= b)
            engine.write_at.fill_(length - 60)
            graph = engine.graphs.get((bucket, length))

            def step() -> None:
                engine.col.zero_()
                graph.replay() if graph is not None else engine._step(bucket, length)

            step()
            reps = 50 if cuda else 5
            if cuda:
                torch.cuda.synchronize()
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                engine.write_at.fill_(length - 60)
                begin.record()
                for _ in range(reps):
                    engine.col.zero_()
                    graph.replay() if graph is not None else engine._step(bucket, length)
                    engine.write_at.fill_(length - 60)
                end.record()
                end.synchronize()
                ms = begin.elapsed_time(end) / reps
            else:
                t = time.perf_counter()
                for _ in range(reps):
                    step()
                    engine.write_at.fill_(length - 60)
                ms = (time.perf_counter() - t) * 1000 / reps
            print(f"rows {b:4d} (bucket {bucket}), {length} positions: {ms:.3f} ms/step, {bucket / ms * 1000:,.0f} tok/s if all rows live")
            if args.kernels:
                from torch.profiler import ProfilerActivity, profile

                acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
                with profile(activities=acts) as prof:
                    for _ in range(5):
                        engine.write_at.fill_(length - 60)
                        engine.col.zero_()
                        engine._step(bucket, length)
                    if cuda:
                        torch.cuda.synchronize()
                key = "cuda_time_total" if cuda else "cpu_time_total"
                print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
