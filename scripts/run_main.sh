#!/usr/bin/env bash
# Sets everything up, builds, and runs the main job: a long-sequence language model with dilated
# attention learning the associative-recall task (on the GPU when there is one), then the
# per-variant cost summary. Extra arguments go to `longtape train`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${LONGTAPE_BUILD_DIR:-build}
mkdir -p runs
"$build_dir/bin/longtape" train --metrics runs/main_metrics.csv --checkpoint runs/main.safetensors "$@"
"$build_dir/bin/longtape" bench --quick --out-dir runs/bench
