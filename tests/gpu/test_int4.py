"""SHALLOW_WEIGHTS=int4 on a GPU (worker/quantize.py): the batched backend merges the adapter, fuses and quantizes
the linear layers to torchao's int4 layout, and the slot engine (CUDA graphs) writes what a plain greedy loop writes
with the same weights (the prompt through the bf16 copy, each next token through the int4 one, as the engine runs
them), up to the first step where the loop's two best tokens are within bf16 rounding of each other (random
weights have near ties; the engine's attention over its cache rounds differently, so past a near tie either
token is right), over as many prompts (of 24) as give 12 such steps. How much int4 changes a trained model's replies is not measured here: random
weights are all there is on the GPU machine (their int4 logits are far from their bf16 ones, cosine 0.72,
as int4 rounds Gaussian weights by ~10%).
"""
from __future__ import annotations

import dataclasses

import pytest

from tests.gpu.test_unsloth_worker import adapter_dir, llama_dir  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NEW = 24
# two logits within this many bf16 steps (units in the last place at the top logit's size) of each other may swap
# between two correct computations (different kernels and summation orders: the engine's int4 products run 2 rows,
# the loop's 1). Session 17 used 0.03, under one bf16 step for logits of 4-8; on session 18's run the engine and the
# loop parted at a margin of 0.031 (two steps for logits of 2-4)
TIE_ULPS = 4


def near_tie(top: float, margin: float) -> bool:
    import math

    ulp = 2.0 ** (math.floor(math.log2(max(abs(top), 1e-6))) - 7)  # bf16 keeps 8 significant bits
    return margin <= TIE_ULPS * ulp

PROMPTS = ["Tell me about the sea.", "What is your favourite ship and why?", "Count to twenty.", "Name three rivers.",
           "Write a poem about a cat.", "Where do whales sleep?", "Why is the sky blue?", "Describe a storm at sea.",
           "What do owls eat?", "Tell me a story about a dragon.", "How is bread made?", "What is the tallest mountain?",
           "Sing me a sea shanty.", "Who was the first pirate?", "Explain the tides.", "List four planets.",
           "What colour is a parrot?", "How far away is the moon?", "Give me a riddle.", "What is a compass for?",
           "Name a famous castle.", "How do ships float?", "What is your name?", "Say something kind."]
# random weights often have a near tie at a prompt's first steps (session 25: 3 clear steps over the first six
# prompts, margins of 0.0 among them), so the test goes through prompts until it has compared this many clear steps
ENOUGH_CLEAR_STEPS = 12


def test_int4_weights_serve_what_a_greedy_loop_writes_on_them(llama_dir, adapter_dir):  # noqa: F811
    import copy

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from shared.settings import Settings
    from worker.backends import load_backend
    from worker.engine import Request
    from worker.fuse import fuse_projections
    from worker.quantize import quantize_int4

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings = dataclasses.replace(Settings.from_env(), base_model=llama_dir, adapter=adapter_dir, backend="batched",
                                   load_in_4bit=False, weights="int4", slots=2, context_tokens=256, compile_level=0)
    backend = load_backend(settings)
    try:
        assert "int4 weights" in backend.description, backend.description
        linears = [m for m in backend.model.modules() if isinstance(m, torch.nn.Linear)]
        int4 = [m for m in linears if type(m.weight).__name__ == "Int4TilePackedTo4dTensor"]
        assert len(int4) == len(linears) == 16 * 4 + 1  # qkv, o, gate_up, down in each layer, and the output layer

        base = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map={"": "cuda"},
                                                    attn_implementation="sdpa")
        full = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload().eval()
        fuse_projections(full)
        quantized = copy.deepcopy(full)
        quantize_int4(quantized)  # the same weights, quantized the same way
        # int4 products against bf16 ones on the same input, layer 0's q/k/v: 4-bit groups of 128 round each
        # weight by up to half a step (a step is ~1/15 of a group's range: ~10% of a Gaussian weight's spread)
        x = torch.randn(4, full.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            exact = full.model.layers[0].self_attn.qkv_proj(x).float()
            rounded = quantized.model.layers[0].self_attn.qkv_proj(x).float()
        product_error = ((rounded - exact).norm() / exact.norm()).item()
        clear_steps, compared = 0, []
        for text in PROMPTS:
            ids = backend.encode([{"role": "user", "content": text}])
            expected, margins = [], []
            with torch.inference_mode():
                out = full(torch.tensor([ids], device="cuda"), use_cache=True)  # the prompt: bf16
                cache, logits = out.past_key_values, out.logits[0, -1].float()
                for _ in range(NEW):  # each next token: int4
                    top = logits.topk(2)
                    margins.append((top.values[0].item(), (top.values[0] - top.values[1]).item()))
                    expected.append(int(top.indices[0]))
                    out = quantized(torch.tensor([[expected[-1]]], device="cuda"), past_key_values=cache, use_cache=True)
                    cache, logits = out.past_key_values, out.logits[0, -1].float()
            clear = next((i for i, (t, m) in enumerate(margins) if near_tie(t, m)), NEW)  # steps before the first near tie
            request = Request(ids=ids, max_new_tokens=NEW, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
            backend.engine.submit(request)
            got: list[int] = []
            while (item := request.out.get(timeout=120)) is not None:
                assert not isinstance(item, BaseException), item
                got.extend(item)
            assert len(got) == NEW
            compared.append((got[:clear], expected[:clear], [round(m, 3) for _, m in margins[:clear + 1]]))
            clear_steps += clear
            if clear_steps >= ENOUGH_CLEAR_STEPS:
                break
        for got_clear, expected_clear, margins_seen in compared:
            print(f"int4: engine {got_clear} loop {expected_clear} margins {margins_seen}")
        print(f"int4: {clear_steps} clear steps compared; layer 0 q/k/v product error {product_error:.3f}")
        assert all(g == e for g, e, _ in compared)
        assert clear_steps >= 6, f"too few steps without a near tie to compare over {len(compared)} prompts: a new checkpoint?"
        assert 0.01 < product_error < 0.2  # quantized (not left in bf16), and by 4-bit groups, not worse
    finally:
        backend.close()
