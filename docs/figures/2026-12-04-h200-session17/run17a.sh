# session 17, call 1: int4 (torchao tinygemm) matrix products against bf16; the slot engine's step with int4 weights,
# eager in CUDA graphs and compiled; the compiled step with sampling as a second graph (--compile split)
source .gpu/env.sh
start=$SECONDS
out=$OUT/s17a; mkdir -p $out
lscpu | grep -E 'Model name|^CPU\(s\)'; nvidia-smi --query-gpu=name,memory.used,driver_version --format=csv,noheader
python -m bench.host_probe 2>&1 | tail -1 | tee $out/host.txt
echo "== gemv $(date +%T)"
timeout 150 python -m bench.gemv_probe --rows 1,16 --int4-groups 64,128,256 2>&1 | grep -v Warning | tee $out/gemv.txt
source bench/gpu_models.sh
echo "== models ready $(date +%T) at $((SECONDS - start)) s"
export SHALLOW_BASE_MODEL="$base" SHALLOW_ADAPTER="$adapter" SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_CONTEXT_TOKENS=256 \
  SHALLOW_SLOTS=16 SHALLOW_LOG_LEVEL=WARNING SHALLOW_HOME="$out/home"
left=$(( 575 - (SECONDS - start) ))
timeout $left python -m bench.engine_profile --rows 1,16 --positions 200 --int4 128 --compile model --kernels --lock /tmp/gpu.lock > $out/step-int4-model.txt 2>&1 &
timeout $left python -m bench.engine_profile --rows 1,16 --positions 200 --compile split --lock /tmp/gpu.lock > $out/step-split.txt 2>&1 &
timeout 240 python -m bench.engine_profile --rows 1,16 --positions 200 --int4 128 --kernels --lock /tmp/gpu.lock > $out/step-int4-eager.txt 2>&1
echo "== eager int4 rc=$? $(date +%T)"; grep -E "int4 weights|engine built|ms/step|Error" $out/step-int4-eager.txt
timeout 200 python -m bench.engine_profile --rows 1,16 --positions 200 --lock /tmp/gpu.lock > $out/step-bf16-eager.txt 2>&1
echo "== eager bf16 rc=$? $(date +%T)"; grep -E "engine built|ms/step|Error" $out/step-bf16-eager.txt
wait
for f in int4-model split; do echo "== $f"; grep -E "int4 weights|engine built|ms/step|Error|error" $out/step-$f.txt | tail -8; done
echo "done at $((SECONDS - start)) s"
