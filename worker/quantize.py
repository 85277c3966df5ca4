"""Int8 weights for decoding (`SHALLOW_WEIGHTS=int8`): half the bytes a step reads, through torchao.

Decoding one stream reads every weight once a token, so its speed is the memory's: the bf16 1B model
reads ~2.5 GB a step. torchao's int8 weight-only quantization (one scale per output channel) stores
each linear layer's weight in int8 and multiplies in bf16; under `torch.compile` (SHALLOW_COMPILE_LEVEL=1)
the dequantization is fused into the matrix product, so a step reads about half the bytes. The replies
differ slightly from the bf16 model's (int8 rounding of each weight); the adapter is merged first, so it
is quantized with the base.

For the slot engine's merged model only (not the NF4 mode, whose base is already 4-bit). The output
layer is quantized too (it is a fifth of the bytes at 128k words): when it shares its weight with the
input embedding (Llama-3.2-1B does), it gets a copy of its own first, and the embedding stays as it was.
"""
from __future__ import annotations

from shared.errors import ConfigError


def quantize_int8(model) -> int:
    """Quantize the model's linear layers' weights to int8 in place; returns how many layers."""
    import torch

    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError as exc:
        raise ConfigError(f"SHALLOW_WEIGHTS=int8 needs torchao: pip install 'shallow[int8]' ({exc})") from None
    head = model.get_output_embeddings()
    embed = model.get_input_embeddings()
    if head is not None and embed is not None and head.weight is embed.weight:
        head.weight = torch.nn.Parameter(embed.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False  # nothing re-ties them later
    count = sum(1 for m in model.modules() if type(m) is torch.nn.Linear)
    quantize_(model, Int8WeightOnlyConfig())
    return count
