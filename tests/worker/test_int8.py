"""SHALLOW_WEIGHTS=int8 (worker/quantize.py) on the CPU with SmolLM2: the slot engine over int8 weights
writes, token for token, what `generate` writes with the same int8 weights; wrong combinations are refused."""
from __future__ import annotations

import dataclasses
import threading

import pytest

from shared.errors import ConfigError
from shared.settings import Settings

pytest.importorskip("torchao")

PROMPTS = [
    [{"role": "user", "content": "Tell me about the sea."}],
    [{"role": "user", "content": "Name three rivers."}],
    [{"role": "user", "content": "Write a poem about a cat."}],
]
LENGTHS = [30, 20, 25]


@pytest.fixture(scope="module")
def settings(model_dir):
    return dataclasses.replace(Settings.from_env(), base_model=model_dir, adapter=None)


def test_int8_replies_written_together_equal_generate_with_the_same_weights(settings):
    import torch

    from worker.backends import load_backend
    from worker.quantize import quantize_int8

    reference = load_backend(dataclasses.replace(settings, backend="transformers"))
    ids = torch.tensor([list(range(100, 140))])
    with torch.no_grad():
        before = reference.model(input_ids=ids).logits
        n = quantize_int8(reference.model)
        after = reference.model(input_ids=ids).logits
    assert n > 0
    # the weights are int8 now: the logits move a little (rounding), the model is still the same model
    assert 0 < (after - before).abs().max() < 0.1 * before.abs().max()
    assert (after.argmax(-1) == before.argmax(-1)).float().mean() > 0.8
    batched = load_backend(dataclasses.replace(settings, backend="batched", slots=2, weights="int8"))
    try:
        assert "weights in int8" in batched.description
        greedy = dataclasses.replace(settings.generation, temperature=0.0, repetition_penalty=1.1)
        alone = ["".join(reference.stream(p, greedy, max_new_tokens=k, ignore_eos=True)) for p, k in zip(PROMPTS, LENGTHS)]
        together: list[str | None] = [None] * len(PROMPTS)

        def run(i: int) -> None:
            together[i] = "".join(batched.stream(PROMPTS[i], greedy, max_new_tokens=LENGTHS[i], ignore_eos=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]  # 3 replies, 2 rows
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert together == alone
        assert all(len(text) > 10 for text in alone)
    finally:
        batched.close()


def test_int8_is_refused_where_it_does_not_apply(settings, monkeypatch):
    from worker.backends import load_backend

    monkeypatch.setenv("SHALLOW_WEIGHTS", "int4")
    with pytest.raises(ConfigError, match="SHALLOW_WEIGHTS must be full or int8"):
        Settings.from_env()
    monkeypatch.setenv("SHALLOW_WEIGHTS", "INT8")
    assert Settings.from_env().weights == "int8"
    for other in (dict(backend="transformers"), dict(backend="batched", batch_engine="paged")):
        with pytest.raises(ConfigError, match="slot engine"):
            load_backend(dataclasses.replace(settings, weights="int8", **other))
