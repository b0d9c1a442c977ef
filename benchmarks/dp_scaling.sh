#!/usr/bin/env bash
# Data-parallel scaling in one GPU call: `longtape train --parallel data` on 1, 2, 4 ... GPUs of one
# host at the same per-rank batch, each process count in several modes: as built ("now"), with the
# earlier bucket and data-thread settings (one 25 MiB bucket size, every batch made on the training
# thread: --bucket-mb 25 and LONGTAPE_DATA_PREFETCH=0; "earlier"), with 1 MiB buckets throughout
# ("small": for a model of a few MiB, most of the reduction during backward), and, when BASE_TREE
# names another source tree (e.g. `mkdir -p bench-out/base && git archive <rev> -- ':!docs' | tar -x
# -C bench-out/base`), that tree's build as it is ("base"). Prints ms/step, tokens/s and the scaling against one GPU of the same mode (median of
# the per-step differences of elapsed_s over steps 6..DP_STEPS), then rank 0's profile of one step
# on 1 and on the most GPUs (host time of the phases; the read in 'grad norm + clip' waits for the GPU).
#   bash benchmarks/dp_scaling.sh [--build-only]   (DP_NPROCS="1 2 4", DP_MODES="now earlier small", DP_STEPS=30, DP_BATCH=8,
#                                                   DP_SEQ=8192; builds build-gpu/bin/longtape and
#                                                   BASE_TREE/build-gpu/bin/longtape when missing)
# Results: $OUT/dp (or bench-out/dp): dp_<nproc>_<mode>.{json,log}, profile_<nproc>.log, summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}/dp
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
# build TREE LABEL: the command line of TREE into TREE/build-gpu (once).
build() {
  [ -x "$1/build-gpu/bin/longtape" ] && return 0
  local extra=()
  [ -d .deps/prefix ] && extra+=("-DCMAKE_PREFIX_PATH=$PWD/.deps/prefix")
  cmake -S "$1" -B "$1/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCH:-90}" -DCMAKE_CUDA_STANDARD=17 "${extra[@]}" >"$out/configure_$2.log" 2>&1 \
    && cmake --build "$1/build-gpu" -j "$(nproc)" --target longtape_cli >"$out/build_$2.log" 2>&1 \
    || { tail -30 "$out/configure_$2.log" "$out/build_$2.log"; exit 1; }
}
build . now
read -ra modes <<<"${DP_MODES:-now earlier small}"
if [ -n "${BASE_TREE:-}" ]; then
  build "$BASE_TREE" base
  modes=(base "${modes[@]}")
fi
[ "${1:-}" = --build-only ] && { echo "built"; exit 0; }
gpus=$(nvidia-smi -L 2>/dev/null | wc -l)
nprocs=()
for n in ${DP_NPROCS:-1 2 4}; do [ "$n" -le "$gpus" ] && nprocs+=("$n"); done
[ ${#nprocs[@]} -gt 0 ] || { echo "no GPU found"; exit 1; }
steps=${DP_STEPS:-30}
model=(--parallel data --device cuda --batch "${DP_BATCH:-8}" --seq-len "${DP_SEQ:-8192}" --eval-every 0
       --eval-batches 1)
for n in "${nprocs[@]}"; do
  for mode in "${modes[@]}"; do
    bin=build-gpu/bin; env_set=(); flags=()
    [ $mode = base ] && bin=$BASE_TREE/build-gpu/bin
    [ $mode = earlier ] && env_set=(LONGTAPE_DATA_PREFETCH=0) && flags=(--bucket-mb 25)
    [ $mode = small ] && flags=(--bucket-mb 1,1)
    env "${env_set[@]}" timeout 300 "$bin/longtape" launch --nproc "$n" --timeout 120 -- longtape train "${model[@]}" \
      --steps "$steps" "${flags[@]}" --metrics "$out/dp_${n}_$mode.json" >"$out/dp_${n}_$mode.log" 2>&1 \
      || tail -5 "$out/dp_${n}_$mode.log"
  done
done
python3 - "$out" "${DP_BATCH:-8}" "${DP_SEQ:-8192}" "${modes[*]}" "${nprocs[@]}" <<'PY' | tee "$out/summary.md"
import json, os, statistics, sys
out, batch, seq, modes, nprocs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4].split(), sys.argv[5:]
print("| GPUs | layout | ms/step (median) | tokens/s | scaling vs 1 GPU (same layout) | buckets |")
print("|--:|---|--:|--:|--:|---|")
base = {}
for mode in modes:
    for n in nprocs:
        path = os.path.join(out, f"dp_{n}_{mode}.json")
        if not os.path.exists(path):
            print(f"| {n} | {mode} | failed | | | |")
            continue
        rows = json.load(open(path))["rows"]
        t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rows[5:], rows[6:])]
        ms = statistics.median(t) * 1e3
        tps = int(n) * batch * seq / (ms / 1e3)
        base.setdefault(mode, tps / int(n))
        log = open(os.path.join(out, f"dp_{n}_{mode}.log")).read()
        buckets = next((l.split(", ")[-1] for l in log.splitlines() if l.startswith("data parallel:")), "")
        print(f"| {n} | {mode} | {ms:.2f} | {tps:,.0f} | {tps / base[mode]:.2f}x | {buckets} |")
PY
for n in 1 "${nprocs[-1]}"; do
  timeout 300 build-gpu/bin/longtape launch --nproc "$n" --timeout 120 -- longtape train "${model[@]}" --steps 8 --profile \
    >"$out/profile_$n.log" 2>&1 || tail -5 "$out/profile_$n.log"
  echo "== profile of one step on $n GPU(s), rank 0: host time of the phases (the read of the loss and norm, in"
  echo "   'grad norm + clip', waits for the GPU; full table in $out/profile_$n.log):"
  sed -n '/^profile of step/,$p' "$out/profile_$n.log" \
    | grep -E "calls|train step|data batch|global batch rows|forward \+ loss|backward|gradient exchange|grad norm|optimizer step" | head -12
done
