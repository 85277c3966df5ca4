# session 19, call 3: the defaults end to end (bf16, --slots 256, 16 fronts) with the chunks' lease trim (a reply's text renews
# its stream's EXPIRE once a quarter of the lease has passed, not with every write) and the rows' new columns (the host's busy
# cores, the worker processes' share, Redis' CPU and its commands a turn); 8 bench processes, all channels at once as before
# (call 1's run again), then 4 turns a channel (more turns in the p95), then the first turns spread over 1 s (--stagger 1),
# from 8 bench processes and from 1
source .gpu/env.sh
start=$SECONDS
out=$OUT/s19c; mkdir -p $out
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  env "$@" timeout 200 bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$"
}
run sync-clients8 CLIENTS=8
run sync4-clients8 CLIENTS=8 TURNS=4 CHANNELS=64,256
run stagger1-clients8 CLIENTS=8 TURNS=4 CHANNELS=64,256 STAGGER=1
run stagger1-clients1 CLIENTS=1 TURNS=4 CHANNELS=64,256 STAGGER=1
echo "done at $((SECONDS - start)) s"
