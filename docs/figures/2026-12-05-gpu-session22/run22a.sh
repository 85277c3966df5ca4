# session 22, call 1: issue 9's long run once more on a fresh machine: the `cpp` preset (what an epoch gets), 500 steps,
# the steady rate over steps 101-500 (sessions 18 and 19: 40,648 and 32,638), with the host probed before it
source .gpu/env.sh
start=$SECONDS
out=$OUT/s22a; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout $(( 585 - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train-cpp500.txt 2>&1
echo "== train rc=$? at $((SECONDS - start)) s"; tail -25 $out/train-cpp500.txt
python -m bench.host_probe 2>&1 | tail -1 | tee -a $out/host.txt
rm -rf $out/home
echo "done at $((SECONDS - start)) s"
