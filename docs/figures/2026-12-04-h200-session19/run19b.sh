# session 19, call 2 (issue 9), on call 1's machine: the C++ wrapper (`cpp` preset: what `--cpp-wrapper auto` gives an epoch),
# 500 steps, the steady rate after step 100: does session 18's 40,648 tokens/s repeat on another machine
source .gpu/env.sh; out=$OUT/s19b; mkdir -p $out; python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout 470 bench/gpu_train.sh $out bench 2>&1 | tee $out/train-cpp500.txt | tail -6
