# session 18, call 3: the defaults end to end again, the channels played from 8 bench processes, then from 1, on one machine
source .gpu/env.sh
start=$SECONDS
out=$OUT/s18c; mkdir -p $out
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
for c in 8 1; do
  CLIENTS=$c timeout 220 bench/gpu_serving.sh $out defaults > $out/defaults-clients$c.txt 2>&1
  echo "== defaults, $c client process(es): rc=$? at $((SECONDS - start)) s"; grep -A14 "^slot engine" $out/defaults-clients$c.txt
done
