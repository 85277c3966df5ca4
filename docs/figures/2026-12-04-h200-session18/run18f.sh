# session 18, call 6 (issue 9), the same machine right after call 5: the defaults as a 500-step run gets them (Python wrappers)
source .gpu/env.sh; out=$OUT/s18f; mkdir -p $out; python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=default500 PRESETS=default STEPS=500 SKIP=100 timeout 250 bench/gpu_train.sh $out bench 2>&1 | tee $out/train-default500.txt | tail -4
