# session 24 (written as session 23's run23b, not run then), call 2 (serving): a bot's turns now go to Redis together (`TurnClient.submit_many`). First the enqueue
# alone on this host, the code before (9e4682f, unpack it first: mkdir oldcode && git archive 9e4682f bench bots shared worker | tar -x -C oldcode, and do not commit it) and after, twice each
# (`python -m bench.enqueue_cost --bots`); then the defaults end to end (bf16, --slots 256, automatic fronts) played
# as a bot from 1 and from 8 bench processes
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24b; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
for k in 1 2; do
  (cd oldcode && timeout 60 python -m bench.enqueue_cost --turns 200 --burst 16,64,256 --bots) > $out/enqueue-before-$k.txt 2>&1
  timeout 60 python -m bench.enqueue_cost --turns 200 --burst 16,64,256 --bots > $out/enqueue-after-$k.txt 2>&1
done
grep -H -E "one at a time|again" $out/enqueue-*.txt
echo "== enqueue done at $((SECONDS - start)) s"
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 170 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$"
}
run burst-clients1-bot CLIENTS=1 AS_BOT=1
run burst-clients8-bot CLIENTS=8 AS_BOT=1
rm -rf $out/*/home
echo "done at $((SECONDS - start)) s"
