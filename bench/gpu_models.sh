# Sourced by the GPU bench scripts (after `out` is set): the Llama-3.2-1B-shaped checkpoint (random weights)
# and a random LoRA adapter, built in /tmp once per machine; sets `base` and `adapter`.
base=${LLAMA_DIR:-/tmp/llama1b}
adapter=${ADAPTER_DIR:-/tmp/llama1b-adapter}
[ -f "$base/config.json" ] || python .gpu/make_llama1b.py "$base" > "$out/make_llama1b.log" 2>&1
[ -f "$adapter/adapter_config.json" ] || python -m bench.make_adapter "$base" "$adapter" > "$out/make_adapter.log" 2>&1
# the compiled kernels (shallow keeps them under SHALLOW_CACHE_DIR/kernels) stay on the machine, out of OUT_DIR
# (which comes back as files) and warm from one call to the next while the machine is held
export SHALLOW_CACHE_DIR=${SHALLOW_CACHE_DIR:-/tmp/shallow-cache}
