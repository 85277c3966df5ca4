# session 17, call 4: the int4 GPU test (fixed) and the slot engine GPU test
source .gpu/env.sh
start=$SECONDS
out=$OUT/s17d; mkdir -p $out
source bench/gpu_models.sh
echo "== models at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout $((265 - (SECONDS - start))) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_int4.py tests/gpu/test_slot_engine.py > $out/gpu-tests.txt 2>&1
echo "== rc=$? at $((SECONDS - start)) s"
grep -E "int4:|passed|failed|Error|^E " $out/gpu-tests.txt | tail -14
