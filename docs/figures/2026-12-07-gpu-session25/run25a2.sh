# session 25, call 2 (issue 9): call 1's third run (guarded, the kernels compiled) again, alone: call 1 ran out of time
source .gpu/env.sh; out=$OUT/s25a2; mkdir -p $out; TAG=g2 PRESETS=cpp+guarded STEPS=500 SKIP=100 timeout 250 bench/gpu_train.sh $out bench > $out/train-g2.txt 2>&1; echo rc=$?; grep -A2 "^| preset" $out/train-g2.txt; rm -rf $out/home $out/*.jsonl
