"""worker/fuse.py: a Llama layer's q/k/v and gate/up projections as one matrix product each, same function."""
from __future__ import annotations

import copy

import pytest


@pytest.fixture(scope="module")
def model(model_dir):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def test_fused_model_computes_the_same_logits_with_fewer_products(model):
    import torch

    from worker.fuse import FusedAttention, FusedMLP, fuse_projections

    fused = copy.deepcopy(model)
    assert fuse_projections(fused) == model.config.num_hidden_layers
    layer = fused.model.layers[0]
    assert isinstance(layer.self_attn, FusedAttention) and isinstance(layer.mlp, FusedMLP)
    assert not hasattr(layer.self_attn, "q_proj") and not hasattr(layer.mlp, "gate_proj")
    linears = sum(isinstance(m, torch.nn.Linear) for m in fused.model.layers.modules())
    assert linears == 4 * model.config.num_hidden_layers  # qkv, o, gate_up, down
    ids = torch.randint(0, model.config.vocab_size, (2, 29))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        got = fused(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert fuse_projections(fused) == 0  # already fused: nothing left to fuse


def test_models_it_cannot_fuse_are_left_alone(model):
    from peft import LoraConfig, get_peft_model

    from worker.fuse import fuse_projections

    with_adapter = get_peft_model(copy.deepcopy(model), LoraConfig(r=4, target_modules=["q_proj", "up_proj"]))
    assert fuse_projections(with_adapter) == 0  # an adapter kept beside the weights (the 4-bit mode)
    inner = with_adapter.base_model.model  # the Llama model inside, its projections wrapped by peft's layers
    assert inner.config.model_type == "llama" and inner.model.layers
    assert fuse_projections(inner) == 0
    assert type(inner.model.layers[0].self_attn).__name__ == "LlamaAttention"  # left as it was
    other = copy.deepcopy(model)
    other.config.model_type = "mistral"
    assert fuse_projections(other) == 0
