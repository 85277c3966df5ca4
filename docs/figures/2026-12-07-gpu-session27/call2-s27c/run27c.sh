# session 27, call 2 (issue 9): the epoch's settings (`cpp` preset) for 250 steps, the rate over steps 101-250, with
# the new --dequantize-base (auto: on where checkpointing is off, as here: unsloth's LoRA kernels no longer
# dequantize the 4-bit base at every forward and backward) and without it (`quantized`), each its own bench and JSON;
# then, if unsloth's batches were padded (run.json's `batches` says, new), the defaults with padding-free batches
# forced (UNSLOTH_PADDING_CHOICE=padding_free); the GPU tests only if time is left
source .gpu/env.sh
start=$SECONDS
out=/tmp/s27c; keep=$OUT/s27c; mkdir -p $out $keep
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $keep/gpu.txt
for run in ${RUNS:-d1:cpp q1:cpp+quantized}; do
  IFS=: read tag presets <<< "$run"
  TAG=$tag PRESETS=$presets STEPS=${STEPS:-250} SKIP=100 timeout $(( ${LIMIT:-585} - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-$tag.txt 2>&1
  echo "== $run rc=$? at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-$tag.txt | tail -1; grep -iE "error|Traceback" $out/train-$tag.txt | head -5
  cp $out/*.json $out/*.txt $keep/ 2>/dev/null
done
python -c "import json,sys; r=json.load(open('$out/bench-d1.json'))['runs'][0]; print(r.get('batches'), r.get('overlap_steps')); print(*r.get('unsloth_said', []), sep='\n'); sys.exit(0 if r.get('batches', {}).get('padding_free') is False else 1)" \
  && UNSLOTH_PADDING_CHOICE=padding_free TAG=p1 PRESETS=cpp STEPS=${STEPS:-250} SKIP=100 timeout $(( ${LIMIT:-585} - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-p1.txt 2>&1 \
  && { echo "== p1 (padding-free forced) at $((SECONDS - start)) s"; grep -A3 "^| preset" $out/train-p1.txt | tail -1; }
cp $out/*.json $out/*.txt $keep/ 2>/dev/null
python - $out <<'PY'
import json, os, sys
runs = {t: json.load(open(f"{sys.argv[1]}/bench-{t}.json"))["runs"][0] for t in ("d1", "q1", "p1") if os.path.exists(f"{sys.argv[1]}/bench-{t}.json")}
for t, r in runs.items():
    print(t, r["preset"], r.get("steady_tokens_per_second"), r.get("median_step_tokens_per_second"), r.get("dequantized_base"),
          r.get("overlap_steps"), r.get("batches"), r.get("final_loss"), r.get("stalled_steps"), r.get("peak_memory_gib"))
if "d1" in runs and "q1" in runs:
    a, b = runs["q1"]["curve"], runs["d1"]["curve"]
    print("tokens seen at each logged step the same:", [x for x, _ in a] == [x for x, _ in b],
          "max loss gap", round(max(abs(x[1] - y[1]) for x, y in zip(a, b)), 5))
PY
left=$(( ${LIMIT:-585} - (SECONDS - start) ))
if [ $left -gt 200 ]; then
  source bench/gpu_models.sh
  SHALLOW_TEST_LLAMA_DIR=$base timeout $left python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s tests/gpu > $keep/gpu-tests.txt 2>&1
  echo "== gpu tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|overlap:|dequantized:|guards skipped|Error" $keep/gpu-tests.txt | tail -8
fi
echo "done at $((SECONDS - start)) s"
