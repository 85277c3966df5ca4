# session 26, call 1 (issue 9): the epoch's settings (session 18's `cpp` run: --cpp-wrapper true, the guards skipped
# after the quiet first steps) for 300 steps, the rate over steps 101-300, three ways, each its own bench and JSON:
#   o1  with the new --overlap-steps (the default from this session: the loop no longer waits for the GPU where the
#       Trainer did); the machine's first run, so it also compiles the kernels
#   w1  with it off (`waiting`: the defaults before), kernels compiled
#   o10 with it on and the loss logged every 10 steps, not every step (the log's .item() is a wait for the GPU too)
# then, in what time is left, torch.profiler over 5 steady steps of the new defaults (steps 46-50 of 50), with the
# places where the host still waited for the GPU
source .gpu/env.sh
start=$SECONDS
out=/tmp/s26a; keep=$OUT/s26a; mkdir -p $out $keep  # the runs' homes stay on the machine; their figures come back
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $keep/gpu.txt
for run in ${RUNS:-o1:cpp: w1:cpp+waiting: o10:cpp:--logging-steps_10}; do
  IFS=: read tag presets args <<< "$run"
  TAG=$tag PRESETS=$presets ARGS="${args//_/ }" STEPS=${STEPS:-300} SKIP=100 timeout $(( ${LIMIT:-585} - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-$tag.txt 2>&1
  echo "== $run rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-$tag.txt | tail -1
  cp $out/*.json $out/*.txt $keep/ 2>/dev/null
done
python - $out <<'PY'
import json, os, sys
runs = {t: json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in ("o1", "w1", "o10") if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")}
for t, r in runs.items():
    print(t, r["preset"], r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"), r.get("guards_skipped"),
          r.get("overlap_steps"), r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
for t in ("o1", "o10"):
    if t in runs and "w1" in runs:
        a, b = runs["w1"]["curve"], runs[t]["curve"]
        same = [x for x, _ in a] == [x for x, _ in b]  # the tokens seen at each logged step: counted on the host (t), by the Trainer (w1)
        print(t, "tokens seen at each logged step as w1's:", same if t == "o1" else "(logged every 10 steps)",
              "max loss gap at the same tokens", round(max([abs(dict(a)[x] - y) for x, y in b if x in dict(a)] or [float("nan")]), 5))
PY
left=$(( ${LIMIT:-585} - (SECONDS - start) ))
if [ $left -gt 100 ]; then
  TAG=cpp ARGS="--cpp-wrapper true" STEPS=50 SKIP=45 timeout $left bench/gpu_train.sh $out profile > $out/profile-run.txt 2>&1
  echo "== profile rc=$? at $((SECONDS - start)) s"; head -70 $out/profile-run.txt; grep -A25 "^synchronizing" $out/profile-cpp.txt
  cp $out/*.txt $keep/ 2>/dev/null
fi
echo "done at $((SECONDS - start)) s"
