# session 18, call 4: call 3 again after the history read joined the attempt count (one round trip fewer before the model)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s18d; mkdir -p $out
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
for c in 8 1; do
  CLIENTS=$c timeout 220 bench/gpu_serving.sh $out defaults > $out/defaults-clients$c.txt 2>&1
  echo "== defaults, $c client process(es): rc=$? at $((SECONDS - start)) s"; grep -A14 "^slot engine" $out/defaults-clients$c.txt
done
