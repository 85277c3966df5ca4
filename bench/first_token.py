"""Where one reply's time goes, one request at a time: prompt encoding, the prefill alone, time to first
piece and the whole reply through the batched backend (the worker's SHALLOW_* settings).

    python -m bench.first_token --replies 5 --new-tokens 128
"""
from __future__ import annotations

import argparse
import dataclasses
import time


def main(argv: list[str] | None = None) -> int:
    import torch

    from bench.serve import PROMPTS
    from shared.prompts import CHAT_SYSTEM_PROMPT
    from shared.settings import Settings
    from worker.batching import BatchedBackend

    p = argparse.ArgumentParser(prog="python -m bench.first_token")
    p.add_argument("--replies", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args(argv)
    settings = dataclasses.replace(Settings.from_env(), backend="batched")
    t0 = time.perf_counter()
    backend = BatchedBackend.load(settings)
    print(f"loaded in {time.perf_counter() - t0:.1f} s: {backend.description}")
    cuda = backend.engine.device.type == "cuda"
    for i in range(args.replies):
        messages = [{"role": "system", "content": CHAT_SYSTEM_PROMPT}, {"role": "user", "content": PROMPTS[i % len(PROMPTS)]}]
        t = time.perf_counter()
        ids = backend.encode(messages)
        encode = time.perf_counter() - t
        with torch.inference_mode(), backend.engine._prefill_attention():  # the prefill alone (no cache), as the engine runs it
            if cuda:
                torch.cuda.synchronize()
            t = time.perf_counter()
            backend.model(input_ids=torch.tensor([ids], device=backend.engine.device), logits_to_keep=1)
            if cuda:
                torch.cuda.synchronize()
            prefill = time.perf_counter() - t
        t = time.perf_counter()
        gen = backend.stream(messages, settings.generation, max_new_tokens=args.new_tokens, ignore_eos=True)
        first = None
        for piece in gen:
            if first is None and piece:
                first = time.perf_counter() - t
        total = time.perf_counter() - t
        print(f"reply {i}: {len(ids)} prompt tokens, encode {encode * 1000:.1f} ms, prefill alone {prefill * 1000:.1f} ms, "
              f"first piece {first * 1000 if first else float('nan'):.1f} ms, {gen.completion_tokens} tokens in "
              f"{total * 1000:.1f} ms: {gen.completion_tokens / total:.1f} tok/s")
        print("  " + timeline(backend.engine, ids, settings.generation, args.new_tokens))
    backend.close()
    return 0


def timeline(engine, ids: list[int], gen, new_tokens: int) -> str:
    """One reply's token ids straight through the engine (no text), with the engine's marks: ms from the submit."""
    import time

    from worker.engine import Request

    request = Request(ids=ids, max_new_tokens=new_tokens, eos=frozenset(), temperature=gen.temperature, top_p=gen.top_p,
                      repetition_penalty=gen.repetition_penalty, marks=[])
    t0 = time.perf_counter()
    engine.submit(request)
    got, first = 0, None
    while True:
        item = request.out.get(timeout=60)
        if isinstance(item, BaseException):
            raise item
        if item is None:
            break
        if first is None:
            first = time.perf_counter()
        got += len(item)
    end = time.perf_counter()
    marks = ", ".join(f"{name} {(t - t0) * 1000:.1f}" for name, t in request.marks)
    return (f"engine alone (ms from submit): {marks}, first tokens out {(first - t0) * 1000:.1f}, {got} tokens at "
            f"{(end - t0) * 1000:.1f} ({got / (end - t0):.1f} tok/s; after the first: "
            f"{(end - first) * 1000 / max(1, got - 1):.3f} ms a token)")


if __name__ == "__main__":
    raise SystemExit(main())
