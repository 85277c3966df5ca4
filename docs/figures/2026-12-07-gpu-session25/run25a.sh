# session 25, call 1 (issue 9), on an H200: the epoch's settings for 500 steps (session 18's `cpp` run), first with
# every compiled call's guards checked (`guarded`: the defaults before this session), then skipping them after the
# quiet first steps (the new default), then guarded again (a run that finds the kernels compiled, as the second did);
# each its own bench (its own JSON, in case the call's time runs out), the per-step losses compared at the end
source .gpu/env.sh
start=$SECONDS
out=$OUT/s25a; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $out/gpu.txt
for run in g1:cpp+guarded s1:cpp g2:cpp+guarded; do
  TAG=${run%%:*} PRESETS=${run#*:} STEPS=500 SKIP=100 timeout $(( 585 - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-${run%%:*}.txt 2>&1
  echo "== ${run} rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-${run%%:*}.txt | tail -1
done
python - $out <<'PY'
import json, os, sys
runs = [json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in ("g1", "s1", "g2") if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")]
for r in runs:
    print(r["preset"], r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"), r.get("guards_skipped"),
          r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
for r in runs[1:]:  # each step's loss against the first run's
    a, b = runs[0]["curve"], r["curve"]
    print(r["preset"], "steps", len(b), "max per-step loss gap", round(max(abs(x[1] - y[1]) for x, y in zip(a, b)), 5))
PY
rm -rf $out/home $out/*.jsonl
echo "done at $((SECONDS - start)) s"
