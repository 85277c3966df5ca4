# session 24, call 5 (issue 9): `auto` checkpointing now plans with 5 bytes a unit, not 6 (training/train.py
# ACTIVATION_BYTES), so an 80 GB card leaves it off. On an H100: first the peak at the longest steps the defaults
# allow (`long`: 8 conversations of 2,048 tokens, PRESETS=default), then call 1's 500-step `cpp` run again
source .gpu/env.sh
start=$SECONDS
out=$OUT/s24e; mkdir -p $out
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $out/gpu.txt
PRESETS=default timeout 170 bench/gpu_train.sh $out long > $out/long.txt 2>&1
echo "== long rc=$? at $((SECONDS - start)) s"; tail -5 $out/long.txt; grep -h "checkpointing" $out/long.txt | head -2
TAG=cpp500 PRESETS=cpp STEPS=500 SKIP=100 timeout $(( 570 - (SECONDS - start) )) bench/gpu_train.sh $out bench > $out/train.txt 2>&1
echo "== train rc=$? at $((SECONDS - start)) s"; tail -4 $out/train.txt
rm -rf $out/home $out/*.jsonl
echo "done at $((SECONDS - start)) s"
