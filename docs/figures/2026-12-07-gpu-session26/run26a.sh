# session 26, call 1 (issue 9): the epoch's settings for 500 steps (session 18's `cpp` run: --cpp-wrapper true, the
# guards skipped after the quiet first steps), first with the new --overlap-steps (the default from this session: the
# training loop no longer waits for the GPU where the Trainer did; the machine's first run, so it also compiles the
# kernels), then with it off (`waiting`: the defaults before; a second run, which finds the kernels compiled); each its
# own bench and JSON, compared step by step at the end; then, in what time is left, torch.profiler over 5 steady steps
# of the new defaults (steps 46-50 of 50), with the places the host still waited for the GPU
source .gpu/env.sh
start=$SECONDS
out=$OUT/s26a; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $out/gpu.txt
for run in o1:cpp w1:cpp+waiting; do
  TAG=${run%%:*} PRESETS=${run#*:} STEPS=500 SKIP=100 timeout $(( 585 - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-${run%%:*}.txt 2>&1
  echo "== ${run} rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-${run%%:*}.txt | tail -1
done
python - $out <<'PY'
import json, os, statistics, sys
runs = [json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in ("o1", "w1") if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")]
for r in runs:
    print(r["preset"], r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"), r.get("guards_skipped"),
          r.get("overlap_steps"), r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
if len(runs) == 2:
    a, b = runs[0]["curve"], runs[1]["curve"]
    print("steps", len(b), "max per-step loss gap", round(max(abs(x[1] - y[1]) for x, y in zip(a, b)), 5))
    ta = [t for _, t in runs[0]["step_times"][100:]]; tb = [t for _, t in runs[1]["step_times"][100:]]
    print("steps 101-500 mean / median ms:", [round(1000 * statistics.mean(x), 1) for x in (ta, tb)],
          [round(1000 * statistics.median(x), 1) for x in (ta, tb)])
PY
left=$(( 585 - (SECONDS - start) ))
if [ $left -gt 100 ]; then
  TAG=cpp ARGS="--cpp-wrapper true" STEPS=50 SKIP=45 timeout $left bench/gpu_train.sh $out profile > $out/profile-run.txt 2>&1
  echo "== profile rc=$? at $((SECONDS - start)) s"; head -70 $out/profile-run.txt; grep -A25 "^synchronizing" $out/profile-cpp.txt
fi
rm -rf $out/home $out/*.jsonl
echo "done at $((SECONDS - start)) s"
