# session 22, call 2: the bots' path from 8 processes (eight bots on one worker): the defaults (bf16, --slots 256) with
# AS_BOT=1 CLIENTS=8 (session 21: one process, 76.6-111.5 ms p95 at 256), then the training GPU test (not run since session 16)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s22b; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -c "import redis; print('redis-py', redis.__version__)" | tee -a $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 170 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$" | head -16
}
run burst-clients8-bot CLIENTS=8 AS_BOT=1
SHALLOW_TEST_LLAMA_DIR=$base timeout $(( 590 - (SECONDS - start) )) python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_unsloth_train.py > $out/gpu-tests-train.txt 2>&1
echo "== GPU training test rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E " $out/gpu-tests-train.txt | tail -6
echo "done at $((SECONDS - start)) s"
