#!/usr/bin/env bash
# Builds longtape with the CUDA backend into build-gpu and runs the whole test suite on the GPU,
# then prints a short summary (GPU, build status, tests passed/failed). Run from anywhere on a
# machine with a GPU and the CUDA toolkit:
#   bash scripts/gpu_check.sh                 # everything
#   GPU_CHECK_TESTS=cuda bash scripts/gpu_check.sh   # only tests whose name matches a regex
# Environment: CUDA_ARCH (default 90), GPU_CHECK_JOBS (default: all cores), GPU_CHECK_TESTS,
# GPU_CHECK_SANITIZE=1 to also run the parity suite under compute-sanitizer (memcheck with the
# caching pool bypassed, so every allocation has its exact size; racecheck on the block-reduction
# kernels).
#
# A GPU machine without the Debian header packages (Eigen, doctest, nlohmann-json, CLI11) can use
# a copy of them staged in .deps/prefix (git-ignored); stage it on a machine that has them with
#   bash scripts/gpu_check.sh --stage-deps
# and ship .deps along with the checkout.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--stage-deps" ]; then
  set -e
  prefix=.deps/prefix
  rm -rf "$prefix"
  mkdir -p "$prefix/include" "$prefix/share" "$prefix/lib/cmake"
  cp -r /usr/include/eigen3 /usr/include/nlohmann /usr/include/doctest /usr/include/CLI "$prefix/include/"
  [ -d /usr/include/stb ] && cp -r /usr/include/stb "$prefix/include/"
  mkdir -p "$prefix/share/eigen3" "$prefix/share/cmake"
  cp -r /usr/share/eigen3/cmake "$prefix/share/eigen3/"
  cp -r /usr/share/cmake/nlohmann_json /usr/share/cmake/CLI11 "$prefix/share/cmake/"
  cp -r /usr/lib/cmake/doctest "$prefix/lib/cmake/"
  # doctest's package file names /usr literally; make it relative to where it lies.
  sed -i 's|^set(_IMPORT_PREFIX "/usr")|get_filename_component(_IMPORT_PREFIX "${CMAKE_CURRENT_LIST_DIR}/../../.." ABSOLUTE)|' \
    "$prefix/lib/cmake/doctest/doctestTargets.cmake"
  du -sh "$prefix"
  exit 0
fi

build_dir=build-gpu
jobs=${GPU_CHECK_JOBS:-$(nproc)}
arch=${CUDA_ARCH:-90}
log_dir=${OUT:-$build_dir}
mkdir -p "$log_dir"
extra=()
if [ -d .deps/prefix ]; then
  extra+=("-DCMAKE_PREFIX_PATH=$PWD/.deps/prefix")
fi
export PATH=/usr/local/cuda/bin:$PATH

gpu=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
echo "== GPU: ${gpu:-none found}"
echo "== nvcc: $(nvcc --version 2>/dev/null | tail -1)  cmake: $(cmake --version | head -1)"

start=$(date +%s)
# CMAKE_CUDA_STANDARD 17: the .cu files are C++17, and CMake releases before 3.26 cannot ask
# nvcc for C++20.
if ! cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_STANDARD=17 "${extra[@]}" >"$log_dir/configure.log" 2>&1; then
  tail -40 "$log_dir/configure.log"
  echo "== SUMMARY: configure FAILED (log: $log_dir/configure.log)"
  exit 1
fi
configured=$(date +%s)

# Keep going past failing targets so one broken file does not hide every other result.
cmake --build "$build_dir" -j "$jobs" -- -k 0 >"$log_dir/build.log" 2>&1
build_status=$?
built=$(date +%s)
if [ $build_status -ne 0 ]; then
  grep -E "FAILED|error" "$log_dir/build.log" | head -40
fi

# The CPU/GPU parity suite first, on its own: its assertion count, its failures in full, and a
# check that it really ran on the GPU (without one, every GPU test skips with a message).
parity_line="(not built)"
if [ -x "$build_dir/bin/test_cuda_parity" ]; then
  "$build_dir/bin/test_cuda_parity" >"$log_dir/parity.log" 2>&1
  parity_status=$?
  parity_line=$(grep -E "^\[doctest\] (test cases|assertions)" "$log_dir/parity.log" | tr -s ' ' | tr '\n' ' ')
  [ $parity_status -ne 0 ] && grep -v "^\[doctest\]" "$log_dir/parity.log" | head -150
  echo "== test_cuda_parity: $parity_line"
fi

ctest_args=(--test-dir "$build_dir" --output-on-failure -j "$jobs" --timeout 400)
[ -n "${GPU_CHECK_TESTS:-}" ] && ctest_args+=(-R "$GPU_CHECK_TESTS")
ctest "${ctest_args[@]}" 2>&1 | tee "$log_dir/ctest.log"
done_at=$(date +%s)

# Runs a test binary under compute-sanitizer and records one summary line: memcheck without the
# caching pool (so that reads past a block are seen), racecheck as the tests run.
# sanitize LABEL TOOL SECONDS BINARY LOG [doctest arguments...]
sanitize_lines=()
sanitize() {
  local label=$1 tool=$2 seconds=$3 binary="$build_dir/bin/$4" log="$log_dir/$5"
  shift 5
  [ -x "$binary" ] || return 0
  local no_pool=()
  [ "$tool" = memcheck ] && no_pool=(env LONGTAPE_NO_CACHING_ALLOCATOR=1)
  ${no_pool[@]+"${no_pool[@]}"} timeout "$seconds" compute-sanitizer --tool "$tool" --error-exitcode 9 "$binary" "$@" \
    >"$log" 2>&1
  local status=$?
  sanitize_lines+=("$label: exit $status ($(grep -E "RACECHECK SUMMARY|ERROR SUMMARY" "$log" | tail -1)) $(grep -E "^\[doctest\] assertions" "$log" | tr -s ' ')")
}
if [ "${GPU_CHECK_SANITIZE:-0}" = 1 ]; then
  sanitize "memcheck" memcheck 240 test_cuda_parity memcheck.log
  sanitize "racecheck" racecheck 150 test_cuda_parity racecheck.log -tc="*reduce kernels*"
  # The op table's CUDA rows; at its larger shapes softmax, LayerNorm and the reductions run
  # several warps per row.
  sanitize "op table memcheck" memcheck 300 test_op_table memcheck_op_table.log -tc="op table: the CUDA*"
  sanitize "op table racecheck" racecheck 200 test_op_table racecheck_op_table.log -tc="*at larger shapes*"
  sanitize "fused attention memcheck" memcheck 300 test_fused_attention_cuda memcheck_fused.log
  sanitize "fused attention racecheck" racecheck 300 test_fused_attention_cuda racecheck_fused.log
  sanitize "fused f32 attention memcheck" memcheck 300 test_fused_attention_f32_cuda memcheck_fused_f32.log
  sanitize "fused f32 attention racecheck" racecheck 300 test_fused_attention_f32_cuda racecheck_fused_f32.log \
    -tc="*backward*"
fi

echo "== SUMMARY"
echo "GPU: ${gpu:-none found}"
echo "build: $([ $build_status -eq 0 ] && echo ok || echo "FAILED (see $log_dir/build.log)")," \
  "configure $((configured - start)) s, build $((built - configured)) s, tests $((done_at - built)) s"
grep -E "tests passed|tests failed" "$log_dir/ctest.log" | tail -1
echo "test_cuda_parity: $parity_line"
for line in ${sanitize_lines[@]+"${sanitize_lines[@]}"}; do echo "$line"; done
grep -E "^\s+[0-9]+ - .*\((Failed|Not Run|Timeout|SEGFAULT|Subprocess aborted|Exception)" "$log_dir/ctest.log" || true
# GPU test cases are skipped (doctest's skip) when no GPU is visible: any skip here means nothing ran on it.
if grep -qE "^\[doctest\] test cases:.*[1-9][0-9]* skipped" "$log_dir/parity.log" 2>/dev/null; then
  echo "WARNING: GPU tests were skipped"
fi
if [ $build_status -ne 0 ] || ! grep -q "100% tests passed" "$log_dir/ctest.log"; then exit 1; fi
