#!/usr/bin/env bash
# compute-sanitizer on the fused attention kernels (after run_lab.sh has built build-gpu):
# memcheck on the dense, dilated and block-bias cases of the fused CUDA test and on the
# determinism test; racecheck on the determinism test and the block-bias case; memcheck and
# racecheck on the exact-f32 kernels' test. The caching
# allocator is off so that memcheck sees every buffer's true bounds. Summaries go to $OUT/sanitizer.md.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-lab-out}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
export LONGTAPE_NO_CACHING_ALLOCATOR=1
report=$out/sanitizer.md
echo "# compute-sanitizer on the fused attention kernels, $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F)" >"$report"
run() {
  local name=$1
  shift
  echo "## $name" >>"$report"
  echo '`'"$*"'`' >>"$report"
  timeout 900 "$@" >"$out/$name.log" 2>&1
  local status=$?
  grep -E "^\[doctest\] (test cases|assertions)|ERROR SUMMARY|RACECHECK SUMMARY" "$out/$name.log" >>"$report"
  echo "exit $status" >>"$report"
  echo "== $name: exit $status $(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$name.log" | tail -1)"
}
bin=build-gpu/bin
run memcheck_fused compute-sanitizer --tool memcheck --error-exitcode 9 $bin/test_fused_attention_cuda \
  -tc="*dense attention*,*dilated attention*,*block-sparse op*"
run memcheck_det compute-sanitizer --tool memcheck --error-exitcode 9 $bin/test_fused_attention_determinism
run racecheck_det compute-sanitizer --tool racecheck --error-exitcode 9 $bin/test_fused_attention_determinism
run racecheck_bias compute-sanitizer --tool racecheck --error-exitcode 9 $bin/test_fused_attention_cuda \
  -tc="*block-sparse op*"
# The exact-f32 kernels: memcheck on every case (the unaligned-row case covers the scalar loads),
# racecheck on the backward-modes case.
run memcheck_f32 compute-sanitizer --tool memcheck --error-exitcode 9 $bin/test_fused_attention_f32_cuda
run racecheck_f32 compute-sanitizer --tool racecheck --error-exitcode 9 $bin/test_fused_attention_f32_cuda \
  -tc="*backward*"
