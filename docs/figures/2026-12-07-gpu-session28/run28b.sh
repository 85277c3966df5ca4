# session 28, issue 9: unsloth is now imported before trl, so its own SFTTrainer runs (it chooses padding-free
# batches on sm90). The epoch's settings (`cpp` preset) for 250 steps, the rate over steps 101-250: the defaults now
# (d), then the padded batches of every run before (q: `--padding-free false`), each its own bench and JSON on one
# machine; then the GPU tests with the time left.
source .gpu/env.sh
start=$SECONDS
out=/tmp/s28b; keep=$OUT/s28b; mkdir -p $out $keep
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $keep/gpu.txt
for run in ${RUNS:-d:cpp q:cpp+padded}; do
  IFS=: read tag presets <<< "$run"
  TAG=$tag PRESETS=$presets STEPS=${STEPS:-250} SKIP=100 timeout $(( ${LIMIT:-560} - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-$tag.txt 2>&1
  echo "== $run rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-$tag.txt | tail -1; grep -iE "error|Traceback" $out/train-$tag.txt | head -5
  cp $out/*.json $out/*.txt $keep/ 2>/dev/null
done
python - $out <<'PY'
import json, os, sys
runs = {t: json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in ("d", "q") if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")}
for t, r in runs.items():
    print(t, r["preset"], r.get("error"), r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"), r.get("batches"),
          r.get("overlap_steps"), r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
if "d" in runs and "q" in runs and "curve" in runs["d"]:
    a, b = dict(runs["q"]["curve"]), runs["d"]["curve"]
    print("max loss gap at the same tokens seen", round(max([abs(a[x] - y) for x, y in b if x in a] or [float("nan")]), 5))
PY
left=$(( ${LIMIT:-560} - (SECONDS - start) ))
if [ $left -gt 200 ]; then
  source bench/gpu_models.sh
  SHALLOW_TEST_LLAMA_DIR=$base timeout $left python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s ${TESTS:-tests/gpu} > $keep/gpu-tests.txt 2>&1
  echo "== gpu tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|overlap:|dequantized:|guards skipped|Error" $keep/gpu-tests.txt | tail -8
fi
echo "done at $((SECONDS - start)) s"
