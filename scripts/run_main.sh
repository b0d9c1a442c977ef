#!/usr/bin/env bash
# Sets everything up, builds, and runs the main job: a long-sequence language model with dilated
# attention learning the associative-recall task (on the GPU when there is one), then the
# per-variant cost summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${LONGTAPE_BUILD_DIR:-build}
device=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && grep -q "LONGTAPE_WITH_CUDA:INTERNAL=ON" "$build_dir/CMakeCache.txt" 2>/dev/null; then
  device=cuda
fi
mkdir -p runs
"$build_dir/bin/longtape" train --device "$device" --metrics runs/main_metrics.csv --checkpoint runs/main.safetensors "$@"
"$build_dir/bin/longtape" bench --quick --device "$device" --out-dir runs/bench
