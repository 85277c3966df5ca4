# session 17, call 2: the int4 GPU test, and one stream end to end: compiled (split) with int4 weights, 16 slots
source .gpu/env.sh
start=$SECONDS
out=$OUT/s17b; mkdir -p $out
source bench/gpu_models.sh
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
echo "== models at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout 240 python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s tests/gpu/test_int4.py > $out/gpu-test-int4.txt 2>&1 &
tpid=$!
CHANNELS=1,16 TURNS=3 SLOTS=16 E2E=1 DIRECT=0 SHALLOW_WEIGHTS=int4 timeout $((580 - (SECONDS - start))) bash bench/gpu_serving.sh $out compiled > $out/e2e-int4.log 2>&1
echo "== e2e rc=$? at $((SECONDS - start)) s"
wait $tpid
grep -E "int4:|passed|failed|Error" $out/gpu-test-int4.txt | tail -8
tail -25 $out/e2e-int4.log
