# session 17, call 3: one stream end to end, compiled (split), int4 steps with bf16 prefills, 16 slots; the GPU tests
# alongside the worker's compile (their end and the bench's start are timed, to show whether they overlapped)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s17c; mkdir -p $out
source bench/gpu_models.sh
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
echo "== models at $((SECONDS - start)) s"
CHANNELS=1,16 TURNS=4 SLOTS=16 E2E=1 DIRECT=0 SHALLOW_WEIGHTS=int4 timeout $((575 - (SECONDS - start))) bash bench/gpu_serving.sh $out compiled > $out/e2e-int4.log 2>&1 &
bpid=$!
(until grep -q "warm-up turns" $out/e2e-int4.log 2>/dev/null; do sleep 0.5; done; echo "bench measuring from $(date +%T) ($((SECONDS - start)) s)" > $out/bench-start.txt) &
SHALLOW_TEST_LLAMA_DIR=$base timeout 330 python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s tests/gpu > $out/gpu-tests.txt 2>&1
echo "== gpu tests rc=$? ended $(date +%T) ($((SECONDS - start)) s)" | tee -a $out/gpu-tests.txt
grep -E "int4:|passed|failed|Error" $out/gpu-tests.txt | tail -8
wait $bpid; echo "== e2e rc=$? at $((SECONDS - start)) s"; cat $out/bench-start.txt
tail -16 $out/e2e-int4.log
