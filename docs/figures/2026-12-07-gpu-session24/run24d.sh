# session 24, call 4 (serving): calls 2-3 ran without hiredis: the GPU machine's prepared .gpu/site lacked it (a
# dependency of shallow's since session 5; bench.host_probe now says "redis_parser"). Unzipped into .gpu/site
# (hiredis-3.5.0-cp312 manylinux wheel), the same as call 2 again: the enqueue alone, then the defaults (bf16,
# --slots 256, automatic fronts) played as a bot from 1 and from 8 bench processes, and from 8 as plain threads
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24d; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
for k in 1 2; do
  timeout 60 python -m bench.enqueue_cost --turns 200 --burst 16,64,256 --bots > $out/enqueue-after-$k.txt 2>&1
done
grep -H -E "one at a time|again" $out/enqueue-*.txt
echo "== enqueue done at $((SECONDS - start)) s"
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 170 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$" | head -${LINES_:-14}
}
run burst-clients1-bot CLIENTS=1 AS_BOT=1
run burst-clients8-bot CLIENTS=8 AS_BOT=1
run burst-clients8 CLIENTS=8
rm -rf $out/*/home $out/*/*.json
echo "done at $((SECONDS - start)) s"
