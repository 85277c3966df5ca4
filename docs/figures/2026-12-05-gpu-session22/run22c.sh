# session 22, call 3, on call 2's machine: the int4 GPU test (not run since session 18)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s22c; mkdir -p $out
source bench/gpu_models.sh
SHALLOW_TEST_LLAMA_DIR=$base SHALLOW_TEST_ADAPTER_DIR=$adapter timeout 570 python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_int4.py > $out/gpu-tests-int4.txt 2>&1
echo "== int4 GPU test rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E " $out/gpu-tests-int4.txt | tail -6
echo "done at $((SECONDS - start)) s"
