#!/usr/bin/env bash
# Multi-GPU check on one host with at least 2 GPUs: builds the command line and the process-group
# tests with CUDA and NCCL into build-gpu, then
#   1. runs test_process_group (TCP group, launcher, data parallel on CPU; NCCL collectives
#      against the in-process group, data-parallel equivalence on 2 GPUs, a hung rank's timeout),
#   2. `longtape dist-check --backend nccl` with an all_reduce bandwidth measurement,
#   3. ring (contiguous, zigzag) and head_parallel (not overlapped, pipelined over head groups and
#      over token chunks) attention over NCCL against one GPU at N=256K,
#   4. data-parallel training throughput (tokens/s) on 1 and on 2 GPUs, same per-rank batch.
# DIST_NPROCS (default "2") lists the process counts of steps 3 and 4, e.g. "2 4" on a 4-GPU host.
# Environment: CUDA_ARCH (default 90), DIST_STEPS (default 30), DIST_BATCH (per rank, default 8),
# DIST_SEQ (default 8192), DIST_ATTENTION_N (default 262144), DIST_HEAD_GROUPS (head_parallel's pipeline
# group counts of step 3, default "1,0": not overlapped, then automatic), DIST_TOKEN_CHUNKS (its token
# chunk counts, default "0": automatic); results and logs go to $OUT (default build-gpu/dist).
set -uo pipefail
cd "$(dirname "$0")/.."
build_dir=build-gpu
out=${OUT:-$build_dir/dist}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
extra=()
[ -d .deps/prefix ] && extra+=("-DCMAKE_PREFIX_PATH=$PWD/.deps/prefix")
echo "== GPUs:"; nvidia-smi -L 2>/dev/null || echo "none found"
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DCMAKE_CUDA_STANDARD=17 "${extra[@]}" >"$out/configure.log" 2>&1 \
  || { tail -30 "$out/configure.log"; exit 1; }
grep -q "LONGTAPE_WITH_NCCL" "$build_dir/build.ninja" || echo "WARNING: NCCL was not found: the NCCL tests will skip"
cmake --build "$build_dir" -j "$(nproc)" --target longtape_cli test_process_group >"$out/build.log" 2>&1 \
  || { grep -E "error|FAILED" "$out/build.log" | head -40; exit 1; }
bin=$PWD/$build_dir/bin
status=0

echo "== 1. test_process_group"
LONGTAPE_BIN=$bin timeout 500 "$bin/test_process_group" >"$out/tests.log" 2>&1 || status=1
grep -E "^\[doctest\] (test cases|assertions)" "$out/tests.log"
[ $status -ne 0 ] && grep -v "^\[doctest\]" "$out/tests.log" | head -80

echo "== 2. dist-check over NCCL on 2 GPUs"
timeout 200 "$bin/longtape" launch --nproc 2 --timeout 60 -- longtape dist-check --backend nccl --device cuda \
  --bench-mb 256 2>&1 | tee "$out/dist_check.log" || status=1

nprocs=${DIST_NPROCS:-2}
for p in $nprocs; do
  echo "== 3. ring and head_parallel attention over NCCL on $p GPUs against one (N=${DIST_ATTENTION_N:-262144}, bf16)"
  timeout 300 "$bin/longtape" launch --nproc "$p" --timeout 120 -- longtape dist-check --backend nccl --device cuda \
    --attention "${DIST_ATTENTION_N:-262144}" --repeats 3 --head-groups "${DIST_HEAD_GROUPS:-1,0}" \
    --token-chunks "${DIST_TOKEN_CHUNKS:-0}" 2>&1 \
    | tee "$out/attention_$p.log" || status=1
done

echo "== 4. data-parallel training throughput (per-rank batch ${DIST_BATCH:-8}, seq ${DIST_SEQ:-8192})"
for n in 1 $nprocs; do
  timeout 300 "$bin/longtape" launch --nproc $n --timeout 120 -- longtape train --parallel data --device cuda \
    --steps "${DIST_STEPS:-30}" --batch "${DIST_BATCH:-8}" --seq-len "${DIST_SEQ:-8192}" --eval-every 0 \
    --eval-batches 1 --metrics "$out/dp$n.json" >"$out/dp$n.log" 2>&1 || { status=1; tail -20 "$out/dp$n.log"; }
  python3 - "$out/dp$n.json" "$n" "${DIST_BATCH:-8}" "${DIST_SEQ:-8192}" <<'PY' || status=1
import json, sys
doc = json.load(open(sys.argv[1]))
rows, ranks, batch, seq = doc["rows"], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
skip = min(5, len(rows) - 2)  # warm-up steps
steps = rows[-1]["step"] - rows[skip]["step"]
seconds = rows[-1]["elapsed_s"] - rows[skip]["elapsed_s"]
print(f"{ranks} GPU(s): {steps * batch * ranks * seq / seconds:,.0f} tokens/s over steps {rows[skip]['step'] + 1}-{rows[-1]['step']}"
      f" ({seconds / steps * 1e3:.1f} ms/step, final loss {rows[-1]['loss']:.4f})")
PY
done
echo "== $([ $status -eq 0 ] && echo ALL OK || echo FAILURES) (logs in $out)"
exit $status
