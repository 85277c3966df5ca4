# session 27, call 2: the GPU tests (tests/gpu; the training test checks that unsloth's padding-free batches are counted
# on the host under --overlap-steps, and run.json now says why a batch was not), then torch.profiler over 5 steady steps
# of the defaults (steps 46-50 of 50) with the places where the host still waits for the GPU (sync points by caller)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s27b; work=/tmp/s27b; mkdir -p $out $work
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader | tee $out/gpu.txt
source bench/gpu_models.sh
SHALLOW_TEST_LLAMA_DIR=$base timeout $(( ${LIMIT:-560} - (SECONDS - start) - 170 )) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu > $out/gpu-tests.txt 2>&1
echo "== gpu tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|overlap:|guards skipped|run record|Error" $out/gpu-tests.txt | tail -8
left=$(( ${LIMIT:-560} - (SECONDS - start) ))
TAG=default STEPS=50 SKIP=45 timeout $left bench/gpu_train.sh $work profile > $out/profile-run.txt 2>&1
echo "== profile rc=$? at $((SECONDS - start)) s"; grep -E "overlap|why" $out/profile-run.txt | head -3
cp $work/*.txt $work/*.json $out/ 2>/dev/null
head -45 $work/profile-default.txt; grep -A30 "^synchronizing" $work/profile-default.txt
echo "done at $((SECONDS - start)) s"
