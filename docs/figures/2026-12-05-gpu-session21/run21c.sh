# session 21, call 3 (issue 9): session 18's and 19's long run again on this session's machine: the C++ wrapper (`cpp` preset:
# what `--cpp-wrapper auto` gives an epoch), 500 steps, the steady rate after step 100 (sessions 16/18/19: 38,496 / 40,648 / 32,638)
source .gpu/env.sh; out=$OUT/s21c; mkdir -p $out; nvidia-smi --query-gpu=name --format=csv,noheader | tee $out/gpu.txt
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout 540 bench/gpu_train.sh $out bench 2>&1 | tee $out/train-cpp500.txt | tail -8
