#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/, clang with ASan and UBSan) and runs each for SECONDS
# (default 60), starting from the committed seed corpus fuzz/corpus/<target>/. New inputs go to
# build-fuzz/corpus/<target>/ (the committed corpus is not changed); a crash leaves its reproducer
# in build-fuzz/crashes/ and makes the script fail. Replay one with: build-fuzz/bin/fuzz_<target> FILE
#   bash scripts/fuzz.sh [SECONDS] [TARGET...]      targets: npy safetensors flags
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-60}
shift || true
targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(npy safetensors flags)
command -v clang++ > /dev/null || { echo "fuzz.sh: clang++ is needed for libFuzzer" >&2; exit 1; }

cmake --preset fuzz > /dev/null
cmake --build build-fuzz -j "${LONGTAPE_JOBS:-2}" $(printf -- '--target fuzz_%s ' "${targets[@]}")

mkdir -p build-fuzz/crashes
status=0
for target in "${targets[@]}"; do
  work=build-fuzz/corpus/$target
  mkdir -p "$work"
  echo "== fuzz_$target for ${seconds}s"
  # Errors meant for bad input are caught in the target; leaks, timeouts (5 s) and memory
  # over 2 GiB count as findings.
  set +e
  build-fuzz/bin/fuzz_"$target" "$work" "fuzz/corpus/$target" -max_total_time="$seconds" \
    -timeout=5 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
    -artifact_prefix="build-fuzz/crashes/$target-" > "build-fuzz/fuzz_$target.log" 2>&1
  rc=$?
  set -e
  grep -E "^(#[0-9]+ +DONE|Done|stat::number_of_executed_units|==[0-9]+==ERROR|SUMMARY)" "build-fuzz/fuzz_$target.log" || true
  if [ $rc -ne 0 ]; then
    tail -n 40 "build-fuzz/fuzz_$target.log"
    status=1
  fi
done
if [ -n "$(ls -A build-fuzz/crashes)" ]; then
  echo "fuzz.sh: reproducers in build-fuzz/crashes/:" >&2
  ls build-fuzz/crashes >&2
  status=1
fi
exit $status
