"""int4 weights for the slot engine's merged model (`SHALLOW_WEIGHTS=int4`): the fastest one stream on a GPU.

Decoding one reply reads every weight once a step, so a step at a few rows costs what reading the weights costs.
Here every linear layer of the merged, fused model (the output layer included) is quantized by torchao to 4-bit
integers with a scale and a zero point per group of 128 inputs (`Int4WeightOnlyConfig`, the tinygemm layout), and
its products run in PyTorch's own int4 kernel (`torch.ops.aten._weight_int4pack_mm`): a quarter of the bytes.
Measured on an H200 (Llama-3.2-1B shape, docs/serving.md, session 17): the step's matrix products at one row
0.60 ms against 0.84 in bf16, the compiled step 0.91 ms (against bf16's 1.20-1.30, sessions 16-17); at 16 rows that kernel is slower than
bf16's (1.67 against 0.87 ms), so this is for few streams at once, not for a busy server; and for the same reason
the prompts (tens to thousands of rows a prefill) go through a bf16 copy of the model that the worker keeps beside
(`SlotEngine(prefill_model=...)`, 2.5 GB more for the 1B model). Each next token comes from the int4 weights:
the replies are those of a 4-bit model (like the design card's NF4 base, with the adapter merged before
quantizing rather than kept beside it).
"""
from __future__ import annotations

from shared.errors import ConfigError

GROUP = 128


def refuse_int4(settings, backend: str, device: str) -> None:
    """Before anything loads: a ConfigError where SHALLOW_WEIGHTS=int4 cannot run (the backend, engine, model mode
    or device that `load_backend` would use)."""
    if backend != "batched":
        raise ConfigError(f"SHALLOW_WEIGHTS=int4 is for the slot engine (SHALLOW_BACKEND=batched), "
                          f"and this worker would use the {backend} backend")
    if settings.batch_engine != "slots":
        raise ConfigError("SHALLOW_WEIGHTS=int4 is for the slot engine: leave SHALLOW_BATCH_ENGINE unset (slots)")
    if not device.startswith("cuda"):
        raise ConfigError(f"SHALLOW_WEIGHTS=int4 needs a CUDA GPU (its kernel is PyTorch's CUDA int4 product), "
                          f"and this worker runs on {device}: leave SHALLOW_WEIGHTS unset (full)")
    if settings.load_in_4bit:
        raise ConfigError("SHALLOW_WEIGHTS=int4 quantizes the merged model, and SHALLOW_LOAD_IN_4BIT=1 keeps an NF4 "
                          "base with the adapter beside it: set SHALLOW_LOAD_IN_4BIT=0 for int4")


def quantize_int4(model, group: int = GROUP) -> int:
    """Quantize every `nn.Linear` of `model` (on a CUDA device) in place; returns how many were quantized."""
    import torch

    try:
        from torchao.quantization import Int4WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("SHALLOW_WEIGHTS=int4 needs torchao: pip install -e '.[gpu]'") from None
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.in_features % group == 0]
    if not linears:
        raise ConfigError(f"SHALLOW_WEIGHTS=int4: the model has no linear layer whose inputs split into groups of {group}")
    if any(m.weight.device.type != "cuda" for m in linears):
        raise ValueError("int4 weights need the model on a CUDA device (PyTorch's int4 product is CUDA's)")
    # set_inductor_config=False: torchao would otherwise change the compiler's settings for the whole process
    config = Int4WeightOnlyConfig(group_size=group, int4_packing_format="tile_packed_to_4d", set_inductor_config=False)
    chosen = {id(m) for m in linears}
    quantize_(model, config, filter_fn=lambda m, _name: id(m) in chosen)
    return len(linears)
