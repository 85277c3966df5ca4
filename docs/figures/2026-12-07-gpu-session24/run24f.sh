# session 24, call 6 (serving): the bots' owed records of replies that end together now go in one HDEL (GroupCommit),
# and `shallow bench --as-bot` forgets its channels after the run, not as each ends. Then the same as call 4's bot rows
# (hiredis in .gpu/site): the enqueue alone with the removal of delivered replies' records, and the defaults played as
# a bot from 1 process and from 8, at 64 and 256 channels (TIME_LEFT: the seconds this call may take)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24f; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
timeout 40 python -m bench.enqueue_cost --turns 200 --burst 64,256 --bots > $out/enqueue.txt 2>&1
grep -E "again|delivered" $out/enqueue.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
run() {  # NAME, then the variables for bench/gpu_serving.sh
  local name=$1; shift
  local left=$(( ${TIME_LEFT:-240} - (SECONDS - start) - 5 ))
  [ $left -gt 30 ] || { echo "== $name skipped: ${left}s left"; return; }
  env "$@" CHANNELS=64,256 timeout $left bench/gpu_serving.sh $out/$name defaults > $out/$name.txt 2>&1
  echo "== $name ($*): rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/$name.txt | grep -v "^$" | head -12
}
run burst-clients1-bot CLIENTS=1 AS_BOT=1
run burst-clients8-bot CLIENTS=8 AS_BOT=1
rm -rf $out/*/home $out/*/*.json
echo "done at $((SECONDS - start)) s"
