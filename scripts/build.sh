#!/usr/bin/env bash
# Configures and builds longtape into ${LONGTAPE_BUILD_DIR:-build} (CUDA when a toolkit is found).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
build_dir=${LONGTAPE_BUILD_DIR:-build}
jobs=${LONGTAPE_JOBS:-$(nproc)}
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release ${LONGTAPE_CMAKE_ARGS:-} >/dev/null
cmake --build "$build_dir" -j "$jobs"
