"""What the matrix products of one decoding step cost at one row, and what FP8 weights would cost instead.

    python -m bench.gemv_probe [--rows 1,16] [--reps 50]

The slot engine's one-row step is ~1.33 ms compiled, of which the matrix products are ~0.8 ms (session 6's
profile). This replays only those products, for the Llama-3.2-1B shape with q/k/v and gate/up fused (16 layers of
3072x2048, 2048x2048, 16384x2048 and 2048x8192, then the 128256x2048 output layer), captured in one CUDA graph,
in each way of computing them:

- `bf16`: `F.linear` in bfloat16, as the engine runs them now;
- `fp8-rowwise`: FP8 (e4m3) weights with a scale per output row, the activations quantized per row on the fly
  (their absolute maximum, the scale, the cast: what a dynamic FP8 linear layer does), `torch._scaled_mm`;
- `fp8-rowwise-prequant`: the same products with the activations already in FP8 (the products' own floor);
- `fp8-tensorwise`: one scale per weight and per activation (cuBLASLt's FP8 path);
- `int4-tinygemm`: int4 weights, a scale and zero per group of 128 inputs, through torchao's
  `Int4WeightOnlyConfig(int4_packing_format="tile_packed_to_4d")` (PyTorch's own `_weight_int4pack_mm`); with
  `--int4-groups 64,128,...` one row per group size.

Prints ms per step (all 113 products) and the rate of reading the weights. Random weights; the time does not
depend on the values. Needs CUDA.
"""
from __future__ import annotations

import argparse

LAYERS = 16
HIDDEN = 2048
SHAPES = [(3072, HIDDEN), (HIDDEN, HIDDEN), (16384, HIDDEN), (HIDDEN, 8192)]  # (out, in): qkv, o, gate_up, down
VOCAB = 128256


def main(argv: list[str] | None = None) -> int:
    import torch

    p = argparse.ArgumentParser(prog="python -m bench.gemv_probe")
    p.add_argument("--rows", default="1,16")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--int4-groups", default="128", help="group sizes for the int4 rows ('' for none)")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 2
    dev = torch.device("cuda")
    fp8 = torch.float8_e4m3fn
    fmax = torch.finfo(fp8).max
    shapes = SHAPES * LAYERS + [(VOCAB, HIDDEN)]
    weights = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for n, k in shapes]
    total_bytes = sum(w.numel() for w in weights)  # bf16 bytes / 2 = FP8 bytes

    def rowwise(w):
        scale = (w.abs().amax(dim=1, keepdim=True).float() / fmax).clamp_min(1e-12)
        return (w.float() / scale).to(fp8), scale.t().contiguous()  # (n, k) FP8, (1, n) scale

    def tensorwise(w):
        scale = (w.abs().amax().float() / fmax).clamp_min(1e-12)
        return (w.float() / scale).to(fp8), scale

    int4 = {}
    for group in [int(g) for g in args.int4_groups.split(",") if g]:
        try:
            int4[group] = _int4_linears(weights, group)
        except Exception as exc:  # torchao missing or this PyTorch without the kernel: reported, the rest still run
            print(f"int4 group {group}: cannot quantize: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
    row_w = [rowwise(w) for w in weights]
    tensor_w = [tensorwise(w) for w in weights]

    def quant_rows(x):
        scale = (x.abs().amax(dim=1, keepdim=True).float() / fmax).clamp_min(1e-12)
        return (x.float() / scale).to(fp8), scale

    def quant_tensor(x):
        scale = (x.abs().amax().float() / fmax).clamp_min(1e-12)
        return (x.float() / scale).to(fp8), scale

    for m in [int(r) for r in args.rows.split(",")]:
        inputs = {k: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for k in {k for _, k in shapes}}
        pre = {k: quant_rows(x) for k, x in inputs.items()}

        def bf16():
            for w in weights:
                torch.nn.functional.linear(inputs[w.shape[1]], w)

        def fp8_rowwise():
            for (w, s), (n, k) in zip(row_w, shapes):
                xq, xs = quant_rows(inputs[k])
                torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)

        def fp8_rowwise_prequant():
            for (w, s), (n, k) in zip(row_w, shapes):
                xq, xs = pre[k]
                torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)

        def fp8_tensorwise():
            for (w, s), (n, k) in zip(tensor_w, shapes):
                xq, xs = quant_tensor(inputs[k])
                torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=s, out_dtype=torch.bfloat16)

        def int4_fn(linears):
            def run():
                for lin in linears:
                    lin(inputs[lin.in_features])
            return run

        ways = [("bf16", bf16), ("fp8-rowwise", fp8_rowwise), ("fp8-rowwise-prequant", fp8_rowwise_prequant),
                ("fp8-tensorwise", fp8_tensorwise)]
        ways += [(f"int4-tinygemm-g{group}", int4_fn(linears)) for group, linears in int4.items()]
        for name, fn in ways:
            try:
                ms = _time_graph(fn, args.reps)
            except Exception as exc:  # one way that the installed PyTorch cannot run is reported, the others still run
                print(f"rows {m:4d} {name:22s} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                continue
            read = total_bytes * (2 if name == "bf16" else 0.5 if name.startswith("int4") else 1)
            print(f"rows {m:4d} {name:22s} {ms:.3f} ms/step  ({read / ms / 1e9:.2f} TB/s of weights)")
    return 0


def _int4_linears(weights, group: int):
    import torch

    from worker.quantize import quantize_int4

    linears = torch.nn.Sequential()
    for i, w in enumerate(weights):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
        linears.add_module(str(i), lin)
    quantize_int4(linears, group)  # as SHALLOW_WEIGHTS=int4 quantizes the model
    return list(linears)


def _time_graph(fn, reps: int) -> float:
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / reps


if __name__ == "__main__":
    raise SystemExit(main())
