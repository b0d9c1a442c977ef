#!/usr/bin/env bash
# Builds the CPU-only AddressSanitizer + UndefinedBehaviorSanitizer configuration (CMakePresets.json,
# preset asan-ubsan: build-asan/) and runs the whole test suite under it. Any sanitizer report --
# a memory error, a leak, undefined behaviour -- aborts the test that caused it, so the run fails.
#   bash scripts/sanitize.sh [ctest arguments...]     e.g. bash scripts/sanitize.sh -R test_io
set -euo pipefail
cd "$(dirname "$0")/.."
# allocator_may_return_null: an impossible allocation fails as it would without ASan (bad_alloc or
# null), which the tests of out-of-memory errors rely on, instead of aborting.
export ASAN_OPTIONS=${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1:check_initialization_order=1:allocator_may_return_null=1}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}
cmake --preset asan-ubsan > /dev/null
cmake --build build-asan -j "${LONGTAPE_JOBS:-2}"
# Sanitized code runs several times slower: one test binary per core, generous per-test timeout.
ctest --test-dir build-asan --output-on-failure -j "${LONGTAPE_JOBS:-$(nproc)}" --timeout 1800 "$@"
