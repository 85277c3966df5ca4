"""SHALLOW_WEIGHTS=int4 on a GPU (worker/quantize.py): the batched backend merges the adapter, fuses and quantizes
the linear layers to torchao's int4 layout, and the slot engine (CUDA graphs) writes what a plain greedy loop writes
with the same weights (the prompt through the bf16 copy, each next token through the int4 one, as the engine runs
them), up to the first step where the loop's two best tokens are within bf16 rounding of each other (random
weights have near ties; the engine's attention over its cache rounds differently, so past a near tie either
token is right).
"""
from __future__ import annotations

import dataclasses

import pytest

from tests.gpu.test_unsloth_worker import adapter_dir, llama_dir  # noqa: F401 - the fixtures

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NEW = 48
TIE = 0.05  # logits closer than this (bf16 keeps ~3 significant digits) may swap between two correct computations


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
        ids = backend.encode([{"role": "user", "content": "Tell me about the sea."}])
        expected, margins = [], []
        with torch.inference_mode():
            out = full(torch.tensor([ids], device="cuda"), use_cache=True)  # the prompt: bf16
            cache, logits = out.past_key_values, out.logits[0, -1].float()
            # on int4 weights the model's logits differ from bf16's by rounding only: a sane quantization
            similarity = torch.nn.functional.cosine_similarity(
                logits, quantized(torch.tensor([ids], device="cuda")).logits[0, -1].float(), dim=0).item()
            for _ in range(NEW):
                top = logits.topk(2)
                margins.append((top.values[0] - top.values[1]).item())
                expected.append(int(top.indices[0]))
                out = quantized(torch.tensor([[expected[-1]]], device="cuda"), past_key_values=cache, use_cache=True)
                cache, logits = out.past_key_values, out.logits[0, -1].float()
        clear = next((i for i, m in enumerate(margins) if m < TIE), NEW)  # steps before the first near tie
        del full, quantized, base

        request = Request(ids=ids, max_new_tokens=NEW, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
        backend.engine.submit(request)
        got: list[int] = []
        while (item := request.out.get(timeout=120)) is not None:
            assert not isinstance(item, BaseException), item
            got.extend(item)
        print(f"int4: {clear} steps before the first near tie; engine {got[:clear + 1]}; loop {expected[:clear + 1]}; "
              f"logits' cosine similarity to bf16 {similarity:.4f}")
        assert len(got) == NEW
        assert clear >= 3, "too few clear steps to compare: a new checkpoint?"
        assert got[:clear] == expected[:clear]
        assert similarity > 0.95
    finally:
        backend.close()
