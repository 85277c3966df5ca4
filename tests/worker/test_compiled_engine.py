"""The slot engine compiled as `SHALLOW_COMPILE_LEVEL=1` builds it (worker/engine.py, compile="split": the forward
pass and, as a second graph, the sampling and bookkeeping after it), on the CPU with SmolLM2 (its q/k/v and gate/up
fused, as the worker runs it): greedy, it writes what `generate` writes. The engine has one row (as
SHALLOW_SLOTS=1 builds it), which never prefills two prompts together: its compile warm-up must not try to.
"""
from __future__ import annotations

import shutil

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm(model_dir):
    """SmolLM2 with the engine's attention (which needs the engine's prepared mask; `generate` does not give one)."""
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine import register_attention

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=register_attention()).eval()


def _engine_reply(engine, ids: list[int], n: int, eos: int) -> list[int]:
    from worker.engine import Request

    request = Request(ids=ids, max_new_tokens=n, eos=frozenset([eos]), temperature=0.0, top_p=1.0, repetition_penalty=1.0)
    engine.submit(request)
    out: list[int] = []
    while True:
        item = request.out.get(timeout=300)
        if item is None:
            return out
        assert not isinstance(item, BaseException), item
        out.extend(item)


def test_the_compiled_engine_writes_what_generate_writes(smollm, model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from worker.engine import SlotEngine
    from worker.fuse import fuse_projections

    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("no C++ compiler: PyTorch's compiler cannot build CPU kernels here")
    chats = [[{"role": "user", "content": "Tell me about the sea."}],
             [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "Name your ship."}]]
    prompts = [tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False) for c in chats]
    reference = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()  # transformers' own attention
    expected = []
    with torch.no_grad():
        for ids in prompts:
            out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                  max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            expected.append([t for t in out[0, len(ids):].tolist() if t != tokenizer.eos_token_id])  # the engine holds it back

    fused = smollm
    assert fuse_projections(fused)
    engine = SlotEngine(fused, 1, 256, compile="split")  # one row: the warm-up must skip its batch of two prompts
    try:
        assert hasattr(engine._finish, "_torchdynamo_orig_callable") and engine.forward is not fused  # both compiled
        assert [_engine_reply(engine, ids, 24, tokenizer.eos_token_id) for ids in prompts] == expected
    finally:
        engine.stop()


def test_an_unknown_compile_choice_is_refused(smollm):  # (fused or not: refused before it is looked at)
    from worker.engine import SlotEngine

    with pytest.raises(ValueError, match="compile must be model, split or step"):
        SlotEngine(smollm, 1, 128, compile="everything")
