"""SHALLOW_WEIGHTS=int4 on a GPU (worker/quantize.py): the batched backend loads the merged model with its linear
layers in torchao's int4 layout, and the slot engine over them (CUDA graphs) writes what `generate` writes on the
same int4 weights, up to the first step where `generate`'s two best tokens are within bf16 rounding of each other
(random weights in bf16 have near ties; the engine's attention over its cache rounds differently from
`generate`'s, so past a near tie either token is right).
"""
from __future__ import annotations

import dataclasses

import pytest

from tests.gpu.test_unsloth_worker import llama_dir  # noqa: F401 - the fixture

pytestmark = [pytest.mark.gpu, pytest.mark.slow]

NEW = 48
TIE = 0.05  # logits closer than this (bf16 keeps ~3 significant digits) may swap between two correct computations


def test_int4_weights_serve_what_generate_writes_on_them(llama_dir):  # noqa: F811
    import torch
    from transformers import AutoModelForCausalLM

    from shared.settings import Settings
    from worker.backends import load_backend
    from worker.engine import Request
    from worker.fuse import fuse_projections
    from worker.quantize import quantize_int4

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    settings = dataclasses.replace(Settings.from_env(), base_model=llama_dir, adapter=None, backend="batched",
                                   load_in_4bit=False, weights="int4", slots=2, context_tokens=256, compile_level=0)
    backend = load_backend(settings)
    try:
        assert "int4 weights" in backend.description, backend.description
        linears = [m for m in backend.model.modules() if isinstance(m, torch.nn.Linear)]
        int4 = [m for m in linears if type(m.weight).__name__ == "Int4TilePackedTo4dTensor"]
        assert len(int4) == len(linears) == 16 * 4 + 1  # qkv, o, gate_up, down in each layer, and the output layer

        reference = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map={"": "cuda"},
                                                         attn_implementation="sdpa").eval()
        fuse_projections(reference)
        quantize_int4(reference)  # the same weights, quantized the same way
        ids = backend.encode([{"role": "user", "content": "Tell me about the sea."}])
        with torch.inference_mode():
            out = reference.generate(torch.tensor([ids], device="cuda"), max_new_tokens=NEW, do_sample=False,
                                     pad_token_id=0, eos_token_id=None, output_scores=True, return_dict_in_generate=True)
        expected = out.sequences[0, len(ids):].tolist()
        top2 = [s[0].float().topk(2).values for s in out.scores]
        clear = next((i for i, v in enumerate(top2) if v[0] - v[1] < TIE), NEW)  # steps before the first near tie
        # on int4 weights the model's own logits still differ from bf16's by rounding only: a sane quantization
        with torch.inference_mode():
            full = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16, device_map={"": "cuda"}).eval()
            a = full(torch.tensor([ids], device="cuda")).logits[0, -1].float()
            b = reference(torch.tensor([ids], device="cuda")).logits[0, -1].float()
        similarity = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
        del full, reference

        request = Request(ids=ids, max_new_tokens=NEW, eos=frozenset(), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
        backend.engine.submit(request)
        got: list[int] = []
        while (item := request.out.get(timeout=120)) is not None:
            assert not isinstance(item, BaseException), item
            got.extend(item)
        print(f"int4: {clear} steps before the first near tie; engine {got[:clear + 1]}; generate {expected[:clear + 1]}; "
              f"logits' cosine similarity to bf16 {similarity:.4f}")
        assert len(got) == NEW
        assert clear >= 3, "too few clear steps to compare: a new checkpoint?"
        assert got[:clear] == expected[:clear]
        assert similarity > 0.95
    finally:
        backend.close()
