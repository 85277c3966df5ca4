"""`shallow bench train`: how fast this box fine-tunes, and whether the fast settings learn the same.

Trains on FineTome-shaped data (`training/synthetic.py`: 1-3 exchanges, mostly 200-1,500 tokens, or
`--data FILE`) once per preset, each in a `shallow train` process of its own, and reports real tokens
per second (padding not counted), peak memory, the loss at the end, and, when both presets ran over
the same examples, how far apart their loss curves are (compared at the same share of the tokens
seen; linear interpolation between logged steps).

Presets (`--presets`, in order; the first is the one the others' loss curves are compared with):
  recipe   the lab's settings: micro-batch 2 x accumulation 4 (8 conversations an optimizer step), padded,
           bitsandbytes' 8-bit AdamW, unsloth's gradient checkpointing (activations kept in host memory)
  default  `shallow train`'s defaults: the same 8 conversations a step in one batch of 8, padded (since session
           28), trained in one pass on CUDA and in 2 passes by length without it (`--length-passes auto`, session
           29), torch's fused AdamW, gradient checkpointing by `auto` (off where the longest step fits the GPU
           without it: on an H200, not on a T4)
  gc       the defaults with gradient checkpointing on (checkpoints on the GPU): the defaults before auto
  session4 the defaults of session 4: as default, with the lab's 8-bit AdamW and unsloth's checkpointing
  fused    session4 with torch's fused AdamW (one kernel for all the LoRA tensors, 32-bit states)
  gpuckpt  fused with the checkpoints on the GPU (plain gradient checkpointing): the same as default
  nogc     the defaults without gradient checkpointing (more memory, less compute), whatever auto picks
  packed   trl's best-fit packing, padding-free, into rows of --max-seq-length tokens; as many rows a
           step as carry about the recipe's tokens per step (measured by the recipe run when it ran
           first), no accumulation
  big      packing, 16 rows of --max-seq-length a step: far more tokens a step than the lab's (results
           differ; how fast the box trains when the batch is not held to the lab's)
  sixteen  the defaults with 16 conversations a step in one pass: twice the lab's 8, so twice the tokens
           a step (its loss curve is not the recipe's: half as many steps over the same data)
  workers  the defaults with the batches collated by 2 DataLoader worker processes
  nofreeze the defaults with Python's garbage collector looking at everything (no `gc.freeze()`: the defaults
           before session 11)
  cpp      the defaults with Inductor's C++ wrapper on (`--cpp-wrapper true`: the compiled graphs' launch code in
           C++; `auto`, the default, turns it on only for runs of 5,000 steps or more, so not for the bench's)
  guarded  the defaults with every compiled call's guards checked throughout (`--skip-guards false`: the defaults
           before session 25)
  waiting  the defaults with the training loop waiting for the GPU where the Trainer does (`--overlap-steps false`:
           the defaults before session 26)
  quantized the defaults with the 4-bit base dequantized at every use (`--dequantize-base false`: the defaults
           before session 27)
  padfree  the defaults with padding-free batches (`--padding-free true`: unsloth's own choice on an H100 or H200,
           2.1x slower than padded on an H100 in session 28)
  padded   `--padding-free false`: padded, as the defaults (`auto`) are since session 28
  passes2  the defaults with each step's batch sorted by length and trained in 2 passes of 4 (`--length-passes 2`,
           what `auto` takes without CUDA): the same conversations and loss a step, each pass padded only to its
           own longest row
  passes1  `--length-passes 1`: one pass, as `auto` on CUDA
  passes4  the same in 4 passes of 2 (`--length-passes 4`)
  pad256   the defaults with each batch's rows padded to a multiple of 256 tokens (`--pad-to-multiple-of 256`): the
           padding `graphs` computes, without the graphs
  graphs   the defaults with each compiled decoder block replayed as a CUDA graph (`--block-cuda-graphs true`: rows
           padded to a multiple of --max-seq-length / 8, 256 for 2,048)
Presets join with "+": `sixteen+nogc` is 16 conversations a step without checkpointing. A preset named twice
runs twice (the second finds the first's compiled kernels).

The first run on a machine compiles GPU kernels for the shapes it meets (Triton's cache, ~/.triton) for
its first ~100 steps; a later run finds them compiled. For a steady figure run longer and leave out more
steps (`--steps 60 --skip-steps 30`), on a box that has trained before. Each step's time is kept
(`step_times` in the JSON: real tokens, seconds; `step_gc_pauses`: seconds of each in Python's garbage
collector), and after the first `--skip-steps` the table gives the
median step's rate and the stalls: steps slower than twice the median step per token, with the seconds
they cost beyond it. A steady rate far below the median step's says the run stalled (compiling, most
often), not that the GPU was slow.

A step of the lab's size is host-bound on an H200 (the host launches the kernels through Python), so the same
settings run at different rates on machines whose hosts differ. Before the presets, `bench.host_probe` measures
the host (a Python call, a PyTorch op, a CUDA launch, the processor's name), kept as `host` in the JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.host_probe import measure as measure_host
from training.length_passes import padded_share

ROOT = Path(__file__).resolve().parent.parent
RECIPE_SEQUENCES = 8  # 2 x 4: the lab's conversations per optimizer step


def conversation_tokens(data: Path, base: str) -> list[int]:
    """Each conversation's length in tokens under the model's chat template (what a padded row holds)."""
    from transformers import AutoTokenizer

    from training.data import load_conversations

    tokenizer = AutoTokenizer.from_pretrained(base)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    rows = load_conversations(str(data))
    return [len(tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True)["input_ids"]) for r in rows]


PRESETS = ("recipe", "default", "session4", "fused", "gpuckpt", "nogc", "packed", "big", "sixteen", "workers", "gc", "nofreeze", "cpp",
           "guarded", "waiting", "quantized", "padfree", "padded",
           "passes1", "passes2", "passes4", "pad256", "graphs")


def preset_args(name: str, max_len: int, mean_tokens: float) -> list[str]:
    """The `shallow train` flags of a preset, or of presets joined with "+" (their flags one after the other)."""
    if "+" in name:
        return [a for part in name.split("+") for a in preset_args(part.strip(), max_len, mean_tokens)]
    if name == "recipe":
        return ["--per-device-train-batch-size", "2", "--gradient-accumulation-steps", "4", "--padding-free", "false",
                "--optim", "adamw_8bit", "--gradient-checkpointing", "unsloth"]
    if name == "default":
        return []
    if name == "session4":
        return ["--optim", "adamw_8bit", "--gradient-checkpointing", "unsloth"]
    if name == "nogc":
        return ["--gradient-checkpointing", "false"]
    if name == "gc":
        return ["--gradient-checkpointing", "true"]
    if name == "fused":
        return ["--optim", "adamw_torch_fused", "--gradient-checkpointing", "unsloth"]
    if name == "gpuckpt":
        return ["--optim", "adamw_torch_fused", "--gradient-checkpointing", "true"]
    if name in ("packed", "fast"):  # "fast": this preset's name before the defaults changed
        rows = max(1, round(RECIPE_SEQUENCES * mean_tokens / max_len))
        return ["--packing", "true", "--per-device-train-batch-size", str(rows), "--gradient-accumulation-steps", "1"]
    if name == "big":
        return ["--packing", "true", "--per-device-train-batch-size", "16", "--gradient-accumulation-steps", "1"]
    if name == "sixteen":
        return ["--per-device-train-batch-size", "16", "--gradient-accumulation-steps", "1"]
    if name == "workers":
        return ["--dataloader-num-workers", "2"]
    if name == "nofreeze":
        return ["--no-gc-freeze"]
    if name == "cpp":
        return ["--cpp-wrapper", "true"]
    if name == "guarded":
        return ["--skip-guards", "false"]
    if name == "waiting":
        return ["--overlap-steps", "false"]
    if name == "quantized":
        return ["--dequantize-base", "false"]
    if name == "padfree":
        return ["--padding-free", "true"]
    if name == "padded":
        return ["--padding-free", "false"]
    if name in ("passes1", "passes2", "passes4"):
        return ["--length-passes", name[-1]]
    if name == "pad256":
        return ["--pad-to-multiple-of", "256"]
    if name == "graphs":
        return ["--block-cuda-graphs", "true"]
    raise SystemExit(f"shallow bench train: unknown preset {name!r} ({', '.join(PRESETS)})")


def logged_before(history: list[dict], step: int) -> int:
    """How many of the logged training steps came up to optimizer step `step` (all of them with --logging-steps 1)."""
    return sum(1 for h in history if "elapsed_s" in h and "num_input_tokens_seen" in h and "loss" in h
               and h.get("step", 0) <= step)


def steady_rate(history: list[dict], skip: int = 5) -> float | None:
    """Tokens per second after the first `skip` optimizer steps (compilation and warm-up left out), from the logged
    step after them (with --logging-steps 1, over steps skip+2 on, as every session's figures)."""
    points = [(h["elapsed_s"], h["num_input_tokens_seen"]) for h in history
              if "elapsed_s" in h and "num_input_tokens_seen" in h and "loss" in h]
    if len(points) < 3:
        return None
    skip = logged_before(history, skip) if any("step" in h for h in history) else skip
    k = min(skip, max(1, len(points) - 3))  # short runs (CPU tests): from the second logged step
    (t0, n0), (t1, n1) = points[k], points[-1]
    return round((n1 - n0) / (t1 - t0), 1) if t1 > t0 else None


def step_times(history: list[dict]) -> list[tuple[int, float]]:
    """(real tokens, seconds) of each logged interval (each optimizer step with --logging-steps 1)."""
    points = [(0.0, 0)] + [(h["elapsed_s"], h["num_input_tokens_seen"]) for h in history
                           if "elapsed_s" in h and "num_input_tokens_seen" in h and "loss" in h]
    return [(int(n1 - n0), round(t1 - t0, 3)) for (t0, n0), (t1, n1) in zip(points, points[1:])]


def step_gc_pauses(history: list[dict]) -> list[float]:
    """Seconds each logged interval (each step of `step_times`) spent in Python's garbage collector."""
    points = [0.0] + [h["gc_pause_s"] for h in history if "loss" in h and "elapsed_s" in h
                      and "num_input_tokens_seen" in h and "gc_pause_s" in h]
    return [round(b - a, 4) for a, b in zip(points, points[1:])]


def step_spread(steps: list[tuple[int, float]], skip: int = 5, stall: float = 2.0) -> dict[str, float | int | None]:
    """What the steps after the first `skip` were made of: the median step's tokens per second, and the
    stalls (steps that took more than `stall` x the median step's seconds per token: a kernel compiled for a
    new shape, a checkpoint written, the host busy elsewhere) with the seconds they cost beyond the median's
    rate. A run whose steady rate is far below its median step's has stalled: its figure is not the GPU's."""
    k = min(skip, max(1, len(steps) - 3))
    rest = [(n, s) for n, s in steps[k:] if n > 0 and s > 0]
    if not rest:
        return {"median_step_tokens_per_second": None, "stalled_steps": 0, "stall_seconds": 0.0}
    median = statistics.median(s / n for n, s in rest)  # seconds per token
    stalls = [(n, s) for n, s in rest if s / n > stall * median]
    return {"median_step_tokens_per_second": round(1 / median, 1), "stalled_steps": len(stalls),
            "stall_seconds": round(sum(s - n * median for n, s in stalls), 2)}


def curve(history: list[dict]) -> list[tuple[float, float]]:
    """(tokens seen, loss) at each logged training step."""
    points = [(float(h["num_input_tokens_seen"]), float(h["loss"])) for h in history
              if "loss" in h and "num_input_tokens_seen" in h]
    return points


def curve_gap(a: list[tuple[float, float]], b: list[tuple[float, float]], grid: int = 20) -> dict[str, float]:
    """Mean and largest |loss_a - loss_b| at the same shares of each run's tokens (over the shared span)."""

    def at(points: list[tuple[float, float]], share: float) -> float:
        total = points[-1][0]
        x = share * total
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            if x0 <= x <= x1:
                return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
        return points[0][1] if x < points[0][0] else points[-1][1]

    start = max(a[0][0] / a[-1][0], b[0][0] / b[-1][0])
    shares = [start + (1 - start) * i / (grid - 1) for i in range(grid)]
    gaps = [abs(at(a, s) - at(b, s)) for s in shares]
    return {"mean_abs_gap": round(sum(gaps) / len(gaps), 4), "max_abs_gap": round(max(gaps), 4),
            "final_gap": round(abs(a[-1][1] - b[-1][1]), 4), "from_share": round(start, 3)}


def run_preset(name: str, args: argparse.Namespace, data: Path, out: Path, mean_tokens: float, index: int = 0) -> dict:
    run_dir = out / f"{index}-{name}"
    cmd = [sys.executable, "-m", "shared.cli", "train", "--base-model", args.base_model, "--dataset", str(data),
           "--output-dir", str(run_dir), "--no-resume", "--max-seq-length", str(args.max_seq_length),
           "--save-steps", "100000", "--logging-steps", "1", "--seed", str(args.seed),
           *preset_args(name, args.max_seq_length, mean_tokens), *args.train_args]
    if args.steps:
        cmd += ["--max-steps", str(args.steps)]
    else:
        cmd += ["--num-train-epochs", str(args.epochs)]
    print(f"bench train: {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"), capture_output=True, text=True)
    if proc.returncode != 0:  # said, and the other presets still run
        tail = proc.stderr[-3000:]
        print(f"bench train: the {name} run failed:\n{tail}", file=sys.stderr, flush=True)
        return {"preset": name, "settings": " ".join(preset_args(name, args.max_seq_length, mean_tokens)),
                "error": tail.strip().splitlines()[-1] if tail.strip() else f"exit code {proc.returncode}"}
    record = json.loads((run_dir / "run.json").read_text())
    history = json.loads((run_dir / "history.json").read_text())
    points = curve(history)
    steps = step_times(history)
    return {
        "preset": name,
        "settings": " ".join(preset_args(name, args.max_seq_length, mean_tokens)),
        "backend": record["backend"],
        "steps": record["global_step"],
        "real_tokens": record["train_tokens"],
        "train_seconds": record["train_seconds_this_process"],
        "tokens_per_second": record["tokens_per_second"],
        "steady_tokens_per_second": steady_rate(history, args.skip_steps),
        "steady_after_steps": args.skip_steps,
        **step_spread(steps, logged_before(history, args.skip_steps)),
        "peak_memory_gib": round(record["peak_memory_bytes"] / 2**30, 2),
        "peak_memory_kind": record["peak_memory_kind"],
        "final_loss": points[-1][1] if points else None,
        "garbage_collection": record.get("garbage_collection"),
        "gradient_checkpointing": record["config"].get("gradient_checkpointing"),  # as `auto` resolved it
        "gpu_memory_limit_gib": record.get("gpu_memory_limit_gib"),
        "guards_skipped": record.get("guards_skipped"),  # from which step, and for how many, the guards were skipped
        "overlap_steps": record.get("overlap_steps"),  # whether steps overlapped, and how each batch's tokens were counted
        "dequantized_base": record.get("dequantized_base"),  # the base layers kept dequantized, and their size
        "batches": record.get("batches"),  # the collator, and whether its batches were padding-free
        "length_passes": record.get("length_passes"),  # the steps split into passes by length, and those left whole
        "unsloth_said": [line.strip()[:300] for line in (proc.stdout + proc.stderr).splitlines()
                         if "Unsloth:" in line or "Unsloth should" in line][:30],
        "curve": points,
        "step_times": steps,
        "step_gc_pauses": step_gc_pauses(history),
    }


def table(rows: list[dict], skip: int = 5) -> str:
    head = (f"| preset | settings | steps | real tokens | tok/s | tok/s after {skip} steps | median step tok/s | stalls (s) "
            "| checkpointing | guards skipped | peak memory GiB | loss at the end |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    lines = []
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | {r['settings']} | failed: {r['error'][:120]} | | | | | | | | | |")
            continue
        steady = f"{r['steady_tokens_per_second']:,}" if r.get("steady_tokens_per_second") else "-"
        loss = f"{r['final_loss']:.4f}" if r["final_loss"] is not None else "-"
        median = f"{r['median_step_tokens_per_second']:,}" if r.get("median_step_tokens_per_second") else "-"
        stalls = f"{r.get('stalled_steps', 0)} ({r.get('stall_seconds', 0.0)})"
        skipped = r.get("guards_skipped") or {}
        guards = f"from step {skipped['from_step']} ({skipped['steps']} steps)" if skipped.get("from_step") is not None else "-"
        lines.append(f"| {r['preset']} | {r['settings'] or '(defaults)'} | {r['steps']} | {r['real_tokens']:,} | "
                     f"{r['tokens_per_second']:,} | {steady} | {median} | {stalls} | {r.get('gradient_checkpointing') or '-'} | {guards} | "
                     f"{r['peak_memory_gib']} ({r['peak_memory_kind']}) | {loss} |")
    return "\n".join([head, *lines])


def main(argv: list[str]) -> int:
    from shared.models import resolve_model
    from shared.settings import OFFLINE_BASE_MODEL, Settings

    p = argparse.ArgumentParser(prog="shallow bench train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-model", default=OFFLINE_BASE_MODEL, help="as for shallow train (default: the offline SmolLM2)")
    p.add_argument("--data", type=Path, help="a .jsonl of conversations (default: FineTome-shaped synthetic data)")
    p.add_argument("--examples", type=int, default=64, help="synthetic conversations to write (default 64)")
    p.add_argument("--max-seq-length", type=int, default=2048)
    p.add_argument("--steps", type=int, default=0, help="optimizer steps per preset (default: --epochs over the data)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--presets", default="recipe,default", help=f"comma-separated, from {', '.join(PRESETS)}")
    p.add_argument("--skip-steps", type=int, default=5,
                   help="the steady rate leaves out the first N steps (compilation, warm-up; default 5)")
    p.add_argument("--seed", type=int, default=3407)
    p.add_argument("--out", type=Path, help="keep the runs here (default: a temporary folder)")
    p.add_argument("--json", type=Path, help="also write the results as JSON")
    p.add_argument("train_args", nargs=argparse.REMAINDER, help="after --: more `shallow train` flags for every preset")
    args = p.parse_args(argv)
    args.train_args = [a for a in args.train_args if a != "--"]
    names = [n.strip() for n in args.presets.split(",") if n.strip()]
    for name in names:  # an unknown name is said before anything loads or runs
        preset_args(name, args.max_seq_length, 1.0)
    args.base_model = resolve_model(args.base_model, Settings.from_env().cache_dir, "base model")
    with tempfile.TemporaryDirectory(prefix="shallow-bench-train-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        data = args.data
        if data is None:
            from training.synthetic import write_finetome_like

            data = write_finetome_like(out / "finetome-like.jsonl", args.examples, seed=args.seed)
        host = measure_host("bench train")
        lengths = conversation_tokens(data, args.base_model)
        mean_tokens = sum(min(n, args.max_seq_length) for n in lengths) / len(lengths)
        print(f"bench train: {len(lengths)} conversations, {mean_tokens:.0f} tokens on average", file=sys.stderr, flush=True)
        cut = [min(n, args.max_seq_length) for n in lengths]
        padding = padded_share(cut, RECIPE_SEQUENCES, 1)  # batches as the Trainer draws them, in one pass
        padding["by_passes"] = {n: padded_share(cut, RECIPE_SEQUENCES, n)["padded_tokens"] for n in (2, 4)}
        from training.train import block_graph_multiple  # (transformers, which the token count loaded already)

        multiple = block_graph_multiple(args.max_seq_length)  # what --block-cuda-graphs pads to
        padding["by_multiple"] = {multiple: padded_share(cut, RECIPE_SEQUENCES, 1, multiple=multiple)["padded_tokens"]}
        print(f"bench train: a batch of {padding['rows']} holds {padding['real_tokens']:,.0f} real tokens, "
              f"{padding['padded_tokens']:,.0f} padded ({padding['real_share']:.0%} real); sorted by length in 2 passes "
              + ", in 4 passes ".join(f"{t:,.0f} ({padding['real_tokens'] / t:.0%} real)" for t in padding["by_passes"].values())
              + "".join(f"; rows padded to a multiple of {m} (graphs) {t:,.0f} ({padding['real_tokens'] / t:.0%} real)"
                        for m, t in padding["by_multiple"].items()),
              file=sys.stderr, flush=True)
        rows = []
        for index, name in enumerate(names):
            if rows and rows[0]["preset"] == "recipe" and "error" not in rows[0]:  # a conversation's tokens, as trained
                recipe = rows[0]
                mean_tokens = recipe["real_tokens"] / min(recipe["steps"] * RECIPE_SEQUENCES, len(lengths) * args.epochs)
            rows.append(run_preset(name, args, data, out, mean_tokens, index))
    result: dict = {"conversations": len(lengths), "mean_tokens": round(mean_tokens, 1), "padding": padding, "host": host,
                    "runs": rows}
    print(table(rows, args.skip_steps))
    ok = [r for r in rows if "error" not in r and r["curve"]]
    if len(ok) >= 2:
        result["loss_gaps"] = {}
        for other in ok[1:]:
            gap = curve_gap(ok[0]["curve"], other["curve"])
            result["loss_gaps"][other["preset"] if other["preset"] not in result["loss_gaps"] else f"{other['preset']} (again)"] = gap
            print(f"loss curves, {ok[0]['preset']} vs {other['preset']}, at the same share of tokens seen: {gap}")
        result["loss_gap"] = result["loss_gaps"][ok[1]["preset"]]
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0 if all("error" not in r for r in rows) else 1
