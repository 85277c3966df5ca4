# session 24 (written as session 23's run23a, not run then: no GPU lent), call 1: issue 9's 500-step run of the `cpp` preset (session 18: 40,648 tok/s, session 19: 32,638 on a
# slower host), with the host probe before and after it (the steps are bound by the host as much as by the GPU)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24a; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout $(( 580 - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train.txt 2>&1
echo "== train rc=$? at $((SECONDS - start)) s"; tail -20 $out/train.txt
python -m bench.host_probe 2>&1 | tail -1 | tee -a $out/host.txt
rm -rf $out/home $out/*.jsonl
echo "done at $((SECONDS - start)) s"
