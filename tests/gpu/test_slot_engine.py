"""The slot engine on a GPU: CUDA graphs, asynchronous host copies and two launches in flight.

The CPU tests (tests/worker/test_engine.py) run the engine's bookkeeping eagerly, where every copy is
synchronous; here the same replies go through captured graphs while the host hands out the launch before.
The model is the Llama-3.2-1B shape (SHALLOW_TEST_LLAMA_DIR) in fp32, so the batched forward passes and
`generate`'s agree to rounding and greedy decoding picks the same tokens.
"""
from __future__ import annotations

import threading
import time

import pytest

from tests.gpu.test_unsloth_worker import llama_dir  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

PROMPTS = ["Tell me about the sea.", "What is your favourite ship and why?", "Count to twenty.", "Name three rivers.",
           "Write a poem about a cat."]
LENGTHS = [40, 12, 70, 33, 55]


def test_graph_engine_replies_equal_generate(llama_dir):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from worker.engine import Request, SlotEngine, register_attention

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    torch.backends.cuda.matmul.allow_tf32 = False
    tokenizer = AutoTokenizer.from_pretrained(llama_dir)
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, device_map={"": "cuda"},
                                                 attn_implementation=register_attention()).eval()
    prompts = [tokenizer(p)["input_ids"] for p in PROMPTS]
    expected = []
    reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32, device_map={"": "cuda"},
                                                     attn_implementation="sdpa").eval()
    with torch.inference_mode():
        for ids, n in zip(prompts, LENGTHS):
            out = reference.generate(torch.tensor([ids], device="cuda"), max_new_tokens=n, do_sample=False,
                                     repetition_penalty=1.1, pad_token_id=0, eos_token_id=None)
            expected.append(out[0, len(ids):].tolist())
    del reference
    # 3 rows for 5 requests and 192-position rows. Caution: on an H200 a reply of 12-70 tokens takes tens of ms,
    # so with arrivals 0.3 s apart the replies most likely do not overlap (no waiting, no moved rows; the
    # window does wrap, 210 tokens in all). The overlapping cases are covered on the CPU (test_engine.py).
    engine = SlotEngine(model, rows=3, length=192, cuda_graphs=True, pad_id=0)
    assert engine.use_graphs
    got: list[list[int]] = [[] for _ in PROMPTS]

    def run(i: int) -> None:
        time.sleep(0.3 * i)
        request = Request(ids=prompts[i], max_new_tokens=LENGTHS[i], eos=frozenset(), temperature=0.0, top_p=1.0,
                          repetition_penalty=1.1)
        engine.submit(request)
        while (item := request.out.get(timeout=120)) is not None:
            if isinstance(item, BaseException):
                raise item
            got[i].extend(item)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    try:
        agreed = [next((k for k, (a, b) in enumerate(zip(e, g)) if a != b), min(len(e), len(g))) for e, g in zip(expected, got)]
        print("tokens agreeing with generate, per reply:", agreed, "of", LENGTHS)
        assert [len(g) for g in got] == LENGTHS
        assert got == expected
        assert not engine.live and not engine.waiting
    finally:
        engine.stop()
