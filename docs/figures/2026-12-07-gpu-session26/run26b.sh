# session 26, call 2: the GPU tests (tests/gpu; the training test now trains with --overlap-steps on, the new default,
# as it trains) while an int4 worker compiles, then issue 8's one int4 stream alone on the box (`bench/gpu_serving.sh OUT
# int4alone`, held by HOLD until the tests have ended)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s26b; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
touch $out/hold
HOLD=$out/hold timeout 570 bench/gpu_serving.sh $out int4alone > $out/int4.txt 2>&1 & ipid=$!
SHALLOW_TEST_LLAMA_DIR=$base timeout $(( 560 - (SECONDS - start) - 90 )) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu > $out/gpu-tests.txt 2>&1
echo "== gpu tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|guards skipped|overlap:|run record" $out/gpu-tests.txt | tail -6
rm -f $out/hold
wait $ipid; echo "== int4alone rc=$? at $((SECONDS - start)) s"; tail -6 $out/int4.txt; grep -iE "error|Traceback" $out/worker-int4.log | head -5
rm -rf $out/home
echo "done at $((SECONDS - start)) s"
