# session 21, call 2: call 1 found the bots' path (`--as-bot`) at 256 channels slow to enqueue (27.7 / 90.9 ms p50 / p95):
# the bots now hand the interpreter lock over every 1 ms (as the worker does); the same run again, then the first turns
# spread over 1 s (4 turns, 64 and 256 channels) from one process, a thread a channel and as a bot, then all at once
# from 8 bench processes
source .gpu/env.sh
start=$SECONDS
out=$OUT/s21b; mkdir -p $out
nvidia-smi --query-gpu=name --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 150 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$" | grep -v "^| channels | host\|^|---|---|---|---|---|---|---|$"
}
run burst-clients1-bot CLIENTS=1 AS_BOT=1
run stagger1-clients1 CLIENTS=1 TURNS=4 CHANNELS=64,256 STAGGER=1
run stagger1-clients1-bot CLIENTS=1 TURNS=4 CHANNELS=64,256 STAGGER=1 AS_BOT=1
run burst-clients8 CLIENTS=8
echo "done at $((SECONDS - start)) s"
