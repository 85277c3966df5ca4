# session 18, call 5 (issue 9): the defaults with the C++ wrapper forced (the `cpp` preset: what `--cpp-wrapper auto` turns on for
# runs of 5,000 steps or more), 500 steps, the steady rate after step 100
source .gpu/env.sh; out=$OUT/s18e; mkdir -p $out; python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout 470 bench/gpu_train.sh $out bench 2>&1 | tee $out/train-cpp500.txt | tail -20
