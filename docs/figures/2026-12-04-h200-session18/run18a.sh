# session 18, call 1: the defaults end to end (bf16, --slots 256, automatic fronts) with the overhead's commit split from its
# delivery (the done event's stream entry id), the bench's own CPU, and the channels played from 1 then 4 bench processes;
# then the int4 and slot-engine GPU tests on the current code
source .gpu/env.sh
start=$SECONDS
out=$OUT/s18a; mkdir -p $out
lscpu | grep -E 'Model name|^CPU\(s\)'; nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv,noheader
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
for c in 1 4; do
  CLIENTS=$c timeout 220 bench/gpu_serving.sh $out defaults > $out/defaults-clients$c.txt 2>&1
  echo "== defaults, $c client process(es): rc=$? at $((SECONDS - start)) s"; grep -A14 "^slot engine" $out/defaults-clients$c.txt
done
left=$(( 560 - (SECONDS - start) ))
SHALLOW_TEST_LLAMA_DIR=$base timeout $left python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_int4.py tests/gpu/test_slot_engine.py > $out/gpu-tests-int4-slots.txt 2>&1
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E " $out/gpu-tests-int4-slots.txt | tail -6
