# session 21, call 1: the code of sessions 19-21 on a GPU for the first time (redis-py 7.1.0 in .gpu/site; the bench's
# silent-stream look-ups, the bots' coroutine followers, the remote connection's safe close, the bots' loop kept free,
# the owed record in the turn's round trips, the wider pool): the GPU tests of the streaming path, then the defaults
# end to end (bf16, --slots 256, automatic fronts) from one bench process, a thread a channel and then as a bot
source .gpu/env.sh
start=$SECONDS
out=$OUT/s21a; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -c "import redis; print('redis-py', redis.__version__)" | tee -a $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
SHALLOW_TEST_LLAMA_DIR=$base timeout 200 python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_unsloth_worker.py tests/gpu/test_slot_engine.py > $out/gpu-tests.txt 2>&1
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "passed|failed|Error|^E " $out/gpu-tests.txt | tail -6
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 170 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$"
}
run burst-clients1 CLIENTS=1
run burst-clients1-bot CLIENTS=1 AS_BOT=1
echo "done at $((SECONDS - start)) s"
