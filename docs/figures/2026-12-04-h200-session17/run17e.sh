# session 17, call 5: the unsloth training GPU test after run.json gained steps_to_take
source .gpu/env.sh
start=$SECONDS
out=$OUT/s17e; mkdir -p $out
base=/tmp/llama1b; python .gpu/make_llama1b.py $base > $out/make_llama1b.log 2>&1
export SHALLOW_CACHE_DIR=/tmp/shallow-cache
echo "== model at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout $((185 - (SECONDS - start))) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_unsloth_train.py > $out/gpu-test-train.txt 2>&1
echo "== rc=$? at $((SECONDS - start)) s"
grep -E "run record|passed|failed|Error|^E " $out/gpu-test-train.txt | tail -8
