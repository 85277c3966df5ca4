# session 24, call 3: issue 8's one int4 stream alone on the box (`bench/gpu_serving.sh OUT int4alone`: a 16-slot
# int4 worker on its own Redis, torch.compile, 8 timed turns of one channel after 2 untimed ones)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24c; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
timeout 540 bench/gpu_serving.sh $out int4alone > $out/int4.txt 2>&1
echo "== int4alone rc=$? at $((SECONDS - start)) s"; tail -8 $out/int4.txt; grep -iE "error|Traceback" $out/worker-int4.log | head -5
rm -rf $out/home
echo "done at $((SECONDS - start)) s"
