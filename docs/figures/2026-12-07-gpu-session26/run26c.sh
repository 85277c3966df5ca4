# session 26, a last short call: the new default (--overlap-steps auto) on the GPU for 25 steps of the 1B shape, to
# see that unsloth's loop takes the host's token counts (run.json's overlap_steps) and trains
source .gpu/env.sh
start=$SECONDS
out=/tmp/s26c; keep=$OUT/s26c; mkdir -p $out $keep
nvidia-smi --query-gpu=name --format=csv,noheader | tee $keep/gpu.txt
source bench/gpu_models.sh
python -c "from training.synthetic import write_finetome_like as w; w('$out/d.jsonl', 400, seed=3407)"
SHALLOW_HOME=$out/home timeout $(( ${LIMIT:-150} - (SECONDS - start) )) python -m shared.cli train --base-model "$base" \
  --dataset $out/d.jsonl --output-dir $out/run --max-steps 25 --save-steps 1000 --warmup-steps 5 > $keep/train.log 2>&1
echo "== train rc=$? at $((SECONDS - start)) s"; tail -c 400 $keep/train.log
python -c "import json; r = json.load(open('$out/run/run.json')); print({k: r[k] for k in ('overlap_steps', 'guards_skipped', 'train_tokens', 'tokens_per_second')}, r['config']['overlap_steps'])" | tee $keep/record.txt
