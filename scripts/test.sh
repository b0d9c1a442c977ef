#!/usr/bin/env bash
# Sets everything up, builds, and runs the whole test suite (GPU tests skip without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/build.sh
build_dir=${LONGTAPE_BUILD_DIR:-build}
ctest --test-dir "$build_dir" --output-on-failure -j "${LONGTAPE_JOBS:-$(nproc)}"
