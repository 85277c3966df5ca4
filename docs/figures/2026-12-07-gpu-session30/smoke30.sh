# NOT RUN: session 30 had too little device time left to start a machine for it (ready for a later session)
# session 30, the last ~290 s of device time: does `--block-cuda-graphs true` run on unsloth's trainer at all, and
# at what rate? `shallow train` with the defaults + block graphs (Python wrappers: torch 2.11 records no graph of C++-wrapped code), 40 steps on the bench's data,
# Inductor's cudagraphs log on ("Recording function=..." for each graph, "skipping cudagraphs due to ..." where it
# cannot record one). The log comes back.
source .gpu/env.sh
out=/tmp/s30; keep=$OUT/s30; mkdir -p $out $keep
source bench/gpu_models.sh
data=$out/finetome-like.jsonl
python -c "from training.synthetic import write_finetome_like as w; w('$data', 1024, seed=3407)"
TORCH_LOGS=cudagraphs SHALLOW_LOG_LEVEL=WARNING SHALLOW_HOME=$out/home timeout ${LIMIT:-170} python -m shared.cli train \
  --base-model $base --dataset $data --output-dir $out/run --no-resume --save-steps 100000 --max-steps 40 \
  --warmup-steps 5 --logging-steps 1 --block-cuda-graphs true > $keep/train.log 2>&1
echo "rc=$?"; tr '\r' '\n' < $keep/train.log | grep -E "CUDA graph|skipping cudagraphs|Error|error|[0-9]+/40 \[" | tail -25
echo "graphs recorded: $(grep -c 'Recording function=' $keep/train.log)"
cp $out/run/run.json $out/run/history.json $keep/ 2>/dev/null
python - $keep <<'PY'
import json, sys, os
p = sys.argv[1] + "/history.json"
if os.path.exists(p):
    h = [e for e in json.load(open(p)) if "loss" in e and "elapsed_s" in e]
    t = [(b["step"], round(b["elapsed_s"] - a["elapsed_s"], 3), b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) for a, b in zip(h, h[1:])]
    print("steps (step, s, tokens):", t)
    late = t[20:]
    if late:
        print("tok/s over steps 22-40:", round(sum(x[2] for x in late) / sum(x[1] for x in late), 1))
PY
