#!/usr/bin/env bash
# Issue 9 on the GPU box: `shallow bench train` on the Llama-3.2-1B-shaped checkpoint (random weights, 4-bit
# base, LoRA r=16), and where the host's time goes in a training step. Usage:
#   bench/gpu_train.sh OUT_DIR [bench|pyspy|...]
#     bench   PRESETS (default recipe,default) for STEPS (default 25) steps on EXAMPLES (1024) conversations,
#             the steady rate after SKIP (5) steps; ARGS: more `shallow train` flags; TAG names the JSON
#     pyspy   py-spy samples (collapsed stacks) of SECONDS_ (20) seconds of `shallow train` with ARGS once it has
#             done SKIP (20) of its STEPS (300) steps (NATIVE=1: with C frames), then the top functions (bench.stacks)
#     profile torch.profiler over 5 steps after SKIP (40) of STEPS (50): top GPU and host operations (ARGS, TAG)
#     long    peak memory with 8 conversations of 2,048 tokens a step (the longest the defaults allow), PRESETS
#     kernels what keeping the compiled kernels saves a new process (a recreated container): the defaults for STEPS (40)
#             steps, twice, in fresh processes over one new kernel cache (SHALLOW_CACHE_DIR): the first compiles, the
#             second finds them; each run's training seconds, its first steps and its rate (unsloth's generated
#             Python, ./unsloth_compiled_cache, is not in that cache and stays warm for both)
#     ab      the presets in AB (space-separated, default "default nofreeze") taken in turns, ROUNDS (2) times, after
#             one untimed run of WARM (30) steps that compiles the kernels: each a `bench` run of STEPS (100), the
#             steady rate after SKIP (50); then each run's steady and median-step rate. Runs of the same settings
#             differ by 10-30% between machines (docs/training.md, session 11): only runs on one machine compare
# (on the project's GPU machine: source .gpu/env.sh first)
set -uo pipefail
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
source "$(dirname "$0")/gpu_models.sh"
export SHALLOW_HOME="$out/home" SHALLOW_LOG_LEVEL=WARNING
data=$out/finetome-like.jsonl
[ -f "$data" ] || python -c "from training.synthetic import write_finetome_like as w; w('$data', ${EXAMPLES:-1024}, seed=3407)"
for stage in "$@"; do
  echo "== $stage $(date +%T)"
  case $stage in
    bench)
      python -m shared.cli bench train --base-model "$base" --data "$data" --steps ${STEPS:-25} --skip-steps ${SKIP:-5} --presets ${PRESETS:-recipe,default} \
        --json "$out/bench-${TAG:-train}.json" -- --warmup-steps 5 ${ARGS:-} 2>&1 | grep -v -E "Loading weights|it/s\]|s/it\]" | tail -25 ;;
    pyspy)  # steady steps only: py-spy attaches once the run has done SKIP (20) steps, for SECONDS (20)
      log=$out/pyspy-${TAG:-default}.log; n=${STEPS:-300}
      python -m shared.cli train --base-model "$base" --dataset "$data" --output-dir "$out/run-${TAG:-default}" --no-resume \
        --save-steps 100000 --max-steps $n --warmup-steps 5 ${ARGS:-} > "$log" 2>&1 & tpid=$!
      until [ "$(tr '\r' '\n' < "$log" | grep -oE "[0-9]+/$n \[" | tail -1 | cut -d/ -f1)" -ge ${SKIP:-20} ] 2>/dev/null; do
        kill -0 $tpid 2>/dev/null || break; sleep 0.5; done
      .gpu/bin/py-spy record --pid $tpid --rate ${RATE:-200} --duration ${SECONDS_:-20} ${NATIVE:+--native} --format raw \
        --output "$out/train-${TAG:-default}.stacks" > /dev/null 2>&1
      wait $tpid; tail -c 300 "$log"; echo
      python -m bench.stacks "$out/train-${TAG:-default}.stacks" --top 45 > "$out/stacks-${TAG:-default}.txt"; gzip -f "$out/train-${TAG:-default}.stacks"
      head -100 "$out/stacks-${TAG:-default}.txt"; rm -rf "$out/run-${TAG:-default}" ;;
    profile)  # torch.profiler over 5 steady steps (after SKIP, default 40, of STEPS, default 50) of `shallow train` with ARGS:
              # the top operations by GPU and by host time, and the GPU's busy time against the steps' wall time
      run=$out/run-prof-${TAG:-default}
      python -m shared.cli train --base-model "$base" --dataset "$data" --output-dir "$run" --no-resume --save-steps 100000 \
        --max-steps ${STEPS:-50} --warmup-steps ${SKIP:-40} --profile-steps 5 --logging-steps 1 ${ARGS:-} > "$out/profile-${TAG:-default}.log" 2>&1
      cp "$run/profile.txt" "$out/profile-${TAG:-default}.txt" && head -45 "$out/profile-${TAG:-default}.txt"
      python - "$run/history.json" <<'PY'
import json, sys
h = [e for e in json.load(open(sys.argv[1])) if "loss" in e and "elapsed_s" in e]
t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(h, h[1:])]
print("step seconds (logged):", [round(x, 3) for x in t[-20:]])
PY
      rm -rf "$run" ;;
    long)  # peak memory at the longest steps: 8 conversations of max-seq-length (2,048) tokens each, PRESETS
      python - "$out/long.jsonl" <<'PY'
import json, random, sys
from training.synthetic import WORDS
rng = random.Random(0)
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        convo = [{"from": "human", "value": " ".join(rng.choices(WORDS, k=40)) + "?"},
                 {"from": "gpt", "value": " ".join(rng.choices(WORDS, k=2600)) + "."}]
        f.write(json.dumps({"conversations": convo}) + "\n")
PY
      python -m shared.cli bench train --base-model "$base" --data "$out/long.jsonl" --steps ${STEPS:-4} --skip-steps 1 --presets ${PRESETS:-default,nogc} \
        --json "$out/bench-long.json" -- --warmup-steps 1 ${ARGS:-} 2>&1 | grep -v -E "Loading weights|it/s\]|s/it\]" | tail -6 ;;
    ab)
      python -m shared.cli bench train --base-model "$base" --data "$data" --steps ${WARM:-30} --presets default \
        --json "$out/ab-warm.json" -- --warmup-steps 5 ${ARGS:-} > /dev/null 2>&1
      for round in $(seq ${ROUNDS:-2}); do
        for preset in ${AB:-default nofreeze}; do
          python -m shared.cli bench train --base-model "$base" --data "$data" --steps ${STEPS:-100} --skip-steps ${SKIP:-50} \
            --presets "$preset" --json "$out/ab-$preset-$round.json" -- --warmup-steps 5 ${ARGS:-} > /dev/null 2>&1
        done
      done
      python - "$out" <<'PY'
import glob, json, os, sys
print("| run | tok/s after SKIP steps | median step tok/s | stalls (s) | peak GiB | final loss | host: CUDA launch / Python call us |\n|---|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ab-*-*.json")), key=os.path.getmtime):
    result = json.load(open(path)); h = result.get("host") or {}
    for r in result["runs"]:
        if "error" in r:
            print(f"| {os.path.basename(path)} | failed: {r['error'][:80]} | | | | | |"); continue
        print(f"| {os.path.basename(path)[3:-5]} | {r['steady_tokens_per_second']} | {r['median_step_tokens_per_second']} | "
              f"{r['stalled_steps']} ({r['stall_seconds']}) | {r['peak_memory_gib']} | {r['final_loss']:.4f} | "
              f"{h.get('cuda_launch_us')} / {h.get('python_us')} |")
PY
      ;;
    kernels)
      kc=$(mktemp -d /tmp/shallow-kernels-XXXX)
      for run in cold warm; do
        SHALLOW_CACHE_DIR=$kc python -m shared.cli bench train --base-model "$base" --data "$data" --steps ${STEPS:-40} --skip-steps 5 \
          --presets default --json "$out/kernels-$run.json" -- --warmup-steps 5 ${ARGS:-} > "$out/kernels-$run.log" 2>&1
      done
      python - "$out" "$kc" <<'PY'
import json, os, subprocess, sys
print("| run | training s | steps 1-3 s | tok/s, whole run | tok/s after 5 steps |\n|---|---|---|---|---|")
for run in ("cold", "warm"):
    path = os.path.join(sys.argv[1], f"kernels-{run}.json")
    if not os.path.exists(path):
        print(f"| {run} | no result: see kernels-{run}.log | | | |"); continue
    for r in json.load(open(path))["runs"]:
        if "error" in r:
            print(f"| {run} | failed: {r['error'][:80]} | | | |"); continue
        first = ", ".join(f"{t:.1f}" for _, t in r["step_times"][:3])
        print(f"| {run} | {r['train_seconds']} | {first} | {r['tokens_per_second']} | {r['steady_tokens_per_second']} |")
print("kernel cache after both:", subprocess.run(["du", "-sh", sys.argv[2]], capture_output=True, text=True).stdout.split()[0])
PY
      rm -rf "$kc" ;;
    *) echo "unknown stage $stage" ;;
  esac
done
