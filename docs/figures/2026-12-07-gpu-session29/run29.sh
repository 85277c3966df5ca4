# ran in session 30 as `TESTS=tests/gpu/test_length_passes.py LIMIT=570 bash docs/figures/2026-12-07-gpu-session29/run29.sh` on an H100 (no H200 came): a and b finished, c (4 passes) ran out of time; the test was not reached
# session 29, issue 9: each step's padded batch sorted by length and trained in N passes (`--length-passes N`: the
# same 8 conversations and the same loss a step, each pass padded only to its own longest). The epoch's settings
# (`cpp` preset) for STEPS (200) steps, the rate after SKIP (80), one pass (a), 2 passes (b), 4 passes (c), each its
# own bench and JSON on one machine; then PROFILE ("tag:shallow train flags", optional: torch.profiler over 5 steady
# steps), then the GPU tests (TESTS, e.g. tests/gpu/test_length_passes.py) with the time left.
source .gpu/env.sh
start=$SECONDS
out=/tmp/s29; keep=$OUT/s29; mkdir -p $out $keep
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $keep/gpu.txt
tags=""
for run in ${RUNS-a:cpp b:cpp+passes2 c:cpp+passes4}; do
  IFS=: read tag presets <<< "$run"; tags="$tags $tag"
  TAG=$tag PRESETS=$presets STEPS=${STEPS:-200} SKIP=${SKIP:-80} timeout $(( ${LIMIT:-560} - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-$tag.txt 2>&1
  echo "== $run rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-$tag.txt | tail -1; grep -iE "error|Traceback|real\)" $out/train-$tag.txt | head -5
  cp $out/*.json $out/*.txt $keep/ 2>/dev/null
done
python - $out $tags <<'PY'
import json, os, sys
runs = {t: json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in sys.argv[2:] if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")}
for t, r in runs.items():
    print(t, r["preset"], r.get("error"), r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"),
          r.get("length_passes"), (r.get("batches") or {}).get("trainer"), r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
first = next(iter(runs.values()), None)
for t, r in list(runs.items())[1:]:
    if first and "curve" in first and "curve" in r:
        a = dict(first["curve"])
        print(t, "max loss gap against the first at the same tokens seen", round(max([abs(a[x] - y) for x, y in r["curve"] if x in a] or [float("nan")]), 6))
PY
if [ -n "${PROFILE:-}" ]; then
  IFS=: read ptag pargs <<< "$PROFILE"
  TAG=$ptag ARGS="$pargs" STEPS=60 SKIP=45 timeout $(( ${LIMIT:-560} - (SECONDS - start) )) bench/gpu_train.sh $out profile > $out/profile-run-$ptag.txt 2>&1
  echo "== profile $PROFILE rc=$? at $((SECONDS - start)) s"; head -40 $out/profile-run-$ptag.txt
  cp $out/profile-* $keep/ 2>/dev/null
fi
left=$(( ${LIMIT:-560} - (SECONDS - start) ))
if [ -n "${TESTS:-}" ] && [ $left -gt 150 ]; then
  source bench/gpu_models.sh
  SHALLOW_TEST_LLAMA_DIR=$base timeout $left python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s $TESTS > $keep/gpu-tests.txt 2>&1
  echo "== gpu tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|overlap:|dequantized:|guards skipped|Error" $keep/gpu-tests.txt | tail -8
fi
echo "done at $((SECONDS - start)) s"
