#!/usr/bin/env bash
# Issue 8, one stream: the slot engine's decoding step at 1 and 16 rows in several builds (fused projections,
# torch.compile of the forward pass or of the whole step), ms per step and the top kernels. Usage:
#   bench/gpu_step.sh OUT_DIR [VARIANT ...]   (variants: plain fuse fusemodel fusestep fusestepmax; default all)
set -uo pipefail
out=${1:?OUT_DIR}; shift
mkdir -p "$out"
source "$(dirname "$0")/gpu_models.sh"
export SHALLOW_BASE_MODEL="$base" SHALLOW_ADAPTER="$adapter" SHALLOW_BACKEND=batched SHALLOW_LOAD_IN_4BIT=0 SHALLOW_CONTEXT_TOKENS=${CONTEXT:-1024} \
  SHALLOW_SLOTS=16 SHALLOW_LOG_LEVEL=WARNING SHALLOW_HOME="$out/home"
prof() { python -m bench.engine_profile --rows ${ROWS:-1,16} --positions ${POSITIONS:-256} "$@"; }
variants=${*:-plain fuse fusemodel fusestep fusestepmax}
for v in $variants; do
  echo "== $v $(date +%T)"
  case $v in
    plain) prof --kernels ;;
    fuse) prof --fuse ;;
    fusemodel) timeout ${CT:-300} python -m bench.engine_profile --rows ${ROWS:-1,16} --positions ${POSITIONS:-256} --fuse --compile model ;;
    fusestep) timeout ${CT:-300} python -m bench.engine_profile --rows ${ROWS:-1,16} --positions ${POSITIONS:-256} --fuse --compile step --kernels ;;
    fusestepmax) timeout ${CT:-300} python -m bench.engine_profile --rows ${ROWS:-1,16} --positions ${POSITIONS:-256} --fuse --compile step --mode max-autotune-no-cudagraphs ;;
    *) echo "unknown variant $v" ;;
  esac 2>&1 | grep -v "Loading weights" | tee "$out/$v.txt"
done
