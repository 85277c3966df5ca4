# session 19, call 1: the defaults end to end (bf16, --slots 256, automatic fronts) on the code of session 18's end, never run
# on a GPU (a reply's start event through the process's writer, its last text with the done event, the lease trim), the
# channels played from 8 bench processes then from 1; then the GPU tests with the time left (the unsloth worker first: the
# stream's end changed)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s19a; mkdir -p $out
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
for c in 8 1; do
  CLIENTS=$c timeout 220 bench/gpu_serving.sh $out defaults > $out/defaults-clients$c.txt 2>&1
  echo "== defaults, $c client process(es): rc=$? at $((SECONDS - start)) s"; grep -A14 "^slot engine" $out/defaults-clients$c.txt
done
left=$(( 575 - (SECONDS - start) ))
SHALLOW_TEST_LLAMA_DIR=$base timeout $left python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_unsloth_worker.py tests/gpu/test_int4.py tests/gpu/test_slot_engine.py > $out/gpu-tests.txt 2>&1
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "int4:.*clear|passed|failed|Error|^E " $out/gpu-tests.txt | tail -8
