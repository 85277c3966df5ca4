"""Fewer, larger matrix products for decoding: a Llama layer's q/k/v and gate/up projections fused.

Decoding one token reads every weight once; at a few rows a step is a chain of small matrix-vector
products, each a kernel of its own. Here the three attention projections of a layer (which read the
same input) become one product, and so do the MLP's gate and up projections: 7 products a layer
become 4, and the larger ones run closer to the memory's speed. The weights are concatenated once at
load (the adapter merged first), so the model computes exactly the same function.

Only for transformers' Llama architecture (Llama 3.2, SmolLM2): the fused attention's forward is
transformers' `LlamaAttention.forward` with the three projections replaced by one.
"""
from __future__ import annotations

import sys

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS


def fusable(model) -> bool:
    """Plain (not quantized) Llama-architecture weights, every layer with the modules fused here."""
    if getattr(model.config, "model_type", None) != "llama":
        return False
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not layers:
        return False
    for layer in layers:
        attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
        linears = [getattr(attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        linears += [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")]
        if any(type(m) is not torch.nn.Linear for m in linears):  # peft, bitsandbytes or other wrappers: left alone
            return False
    return True


def _concat(linears):
    first = linears[0]
    fused = torch.nn.Linear(first.in_features, sum(m.out_features for m in linears), bias=first.bias is not None,
                            device=first.weight.device, dtype=first.weight.dtype)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([m.weight for m in linears]))
        if first.bias is not None:
            fused.bias.copy_(torch.cat([m.bias for m in linears]))
    fused.requires_grad_(False)
    return fused


def fuse_projections(model) -> int:
    """Fuse every layer of `model` in place; returns how many layers were fused (0: not a fusable model)."""
    if not fusable(model):
        return 0
    layers = model.model.layers
    for layer in layers:
        layer.self_attn = FusedAttention(layer.self_attn)
        layer.mlp = FusedMLP(layer.mlp)
    return len(layers)


class FusedAttention(torch.nn.Module):
    def __init__(self, attn) -> None:
        super().__init__()
        for name in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                     "is_causal"):
            setattr(self, name, getattr(attn, name))
        self.sizes = [attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features]
        self.qkv_proj = _concat([attn.q_proj, attn.k_proj, attn.v_proj])
        self.o_proj = attn.o_proj
        family = sys.modules[type(attn).__module__]
        self._rotary = family.apply_rotary_pos_emb
        self._eager = family.eager_attention_forward

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        q, k, v = self.qkv_proj(hidden_states).split(self.sizes, dim=-1)
        query_states = q.view(hidden_shape).transpose(1, 2)
        key_states = k.view(hidden_shape).transpose(1, 2)
        value_states = v.view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = self._rotary(query_states, key_states, cos, sin)
        if past_key_values is not None:
            key_states, value_states = past_key_values.update(key_states, value_states, self.layer_idx)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        out, weights = attention(self, query_states, key_states, value_states, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
                                 **kwargs)
        return self.o_proj(out.reshape(*input_shape, -1).contiguous()), weights


class FusedMLP(torch.nn.Module):
    def __init__(self, mlp) -> None:
        super().__init__()
        self.gate_up_proj = _concat([mlp.gate_proj, mlp.up_proj])
        self.down_proj = mlp.down_proj
        self.act_fn = mlp.act_fn

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act_fn(gate) * up)
