# session 22: the four GPU test files together (int4 and the training test not run since sessions 17-18), on whatever
# card came (the H200s were not lent at the time)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s22t; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout $(( 585 - (SECONDS - start) )) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  --durations=0 tests/gpu > $out/gpu-tests.txt 2>&1
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E |s call" $out/gpu-tests.txt | tail -12
echo "done at $((SECONDS - start)) s"
