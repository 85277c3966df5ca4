# session 19, call 5: the GPU tests of the streaming path on the session's last code (the chunks' lease trim came after
# call 1's test run): the unsloth worker end to end, then the slot engine against generate
source .gpu/env.sh
start=$SECONDS
out=$OUT/s19e; mkdir -p $out
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout $(( 200 - (SECONDS - start) )) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_unsloth_worker.py tests/gpu/test_slot_engine.py > $out/gpu-tests.txt 2>&1
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E " $out/gpu-tests.txt | tail -6
