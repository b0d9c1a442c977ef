#!/usr/bin/env bash
# The GPU attention benchmark: builds the longtape command line with CUDA (reusing build-gpu when
# it is there), runs `longtape bench --device cuda` and benchmarks/torch_bench.py on the same grid,
# merges both into one table with ratios, and copies the results to $OUT when it is set.
#
#   bash scripts/gpu_bench.sh
#
# Grid (override through the environment): N = 4096..65536, B = 1, H = 8, D = 64, bf16 and f32,
# dilated segments 2048,4096,8192,16384 with rates 1,2,4,8, both mixing modes, non-causal.
# Each tool runs under a time budget (180 s and 75 s; cases left when it is spent are reported as
# skipped, longest sequences first, and the max-length search stops), and a single forward+backward
# slower than BENCH_CASE_LIMIT seconds stops its series, so the measurement takes at most about
# 5 minutes plus the build (incremental when build-gpu is there) and start-up.
#
# Environment: BENCH_OUT_DIR (default bench-gpu), BENCH_SEQ_LENS, BENCH_DTYPES, BENCH_HEADS,
# BENCH_HEAD_DIM, BENCH_BATCH, BENCH_DEVICE (default cuda; cpu for a smoke test), LONGTAPE_BUILD_DIR
# (default build-gpu), BENCH_SEGMENTS, BENCH_DILATIONS, BENCH_MIXING, BENCH_VARIANTS
# (default: every registered variant), LONGTAPE_BUDGET_S (default 180), TORCH_BUDGET_S (default
# 75), BENCH_MAX_LEN_GIB (default 8; 0 skips the max-length search), BENCH_MAX_LEN_CAP (default
# 1048576), BENCH_CASE_LIMIT (default 3 s), CUDA_ARCH (default 90), GPU_BENCH_JOBS.
#
# A GPU machine without the Debian header packages needs .deps/prefix (see scripts/gpu_check.sh
# --stage-deps). Plots: where gnuplot is missing (the GPU image has none), the gnuplot scripts and
# data are in the output; draw them elsewhere with
#   tar xzf gpu_bench.tar.gz && cd bench-gpu && gnuplot plots.gp && gnuplot merged.gp
set -uo pipefail
cd "$(dirname "$0")/.."

out_dir=${BENCH_OUT_DIR:-bench-gpu}
build_dir=${LONGTAPE_BUILD_DIR:-build-gpu}
device=${BENCH_DEVICE:-cuda}
seq_lens=${BENCH_SEQ_LENS:-4096,8192,16384,32768,65536}
dtypes=${BENCH_DTYPES:-bf16,f32}
heads=${BENCH_HEADS:-8}
head_dim=${BENCH_HEAD_DIM:-64}
batch=${BENCH_BATCH:-1}
segments=${BENCH_SEGMENTS:-2048,4096,8192,16384}
dilations=${BENCH_DILATIONS:-1,2,4,8}
mixing=${BENCH_MIXING:-lse,head_groups}
variants=${BENCH_VARIANTS:-}
longtape_budget=${LONGTAPE_BUDGET_S:-180}
torch_budget=${TORCH_BUDGET_S:-75}
max_len_gib=${BENCH_MAX_LEN_GIB:-8}
max_len_cap=${BENCH_MAX_LEN_CAP:-1048576}
case_limit=${BENCH_CASE_LIMIT:-3}
arch=${CUDA_ARCH:-90}
jobs=${GPU_BENCH_JOBS:-$(nproc)}

mkdir -p "$out_dir"
log="$out_dir/gpu_bench.log"
: >"$log"
say() { echo "== $*" | tee -a "$log"; }
export PATH=/usr/local/cuda/bin:$PATH
start=$(date +%s)

say "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)"
say "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)  nvcc: $(nvcc --version 2>/dev/null | tail -1)"
say "torch: $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda)' 2>&1 | tail -1)"

# ---- build (only the command line; tests are not needed here)
extra=()
[ -d .deps/prefix ] && extra+=("-DCMAKE_PREFIX_PATH=$PWD/.deps/prefix")
if [ ! -f "$build_dir/build.ninja" ]; then
  say "configuring $build_dir"
  if ! cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON \
      -DCMAKE_CUDA_ARCHITECTURES="$arch" -DCMAKE_CUDA_STANDARD=17 "${extra[@]}" >>"$log" 2>&1; then
    tail -30 "$log"
    say "configure FAILED"
    exit 1
  fi
fi
say "building longtape (target longtape_cli)"
if ! cmake --build "$build_dir" --target longtape_cli -j "$jobs" >>"$log" 2>&1; then
  grep -E "FAILED|error" "$log" | head -30
  say "build FAILED"
  exit 1
fi
built=$(date +%s)
say "build took $((built - start)) s"

# ---- longtape
lt_args=(bench --device "$device" --dtype "$dtypes" --seq-lens "$seq_lens" --batch "$batch" --heads "$heads"
  --head-dim "$head_dim" --segments "$segments" --dilations "$dilations" --mixing "$mixing" --causal off
  --warmup 3 --repeats 10 --case-time-limit "$case_limit" --time-budget "$longtape_budget"
  --max-len-budget-gib "$max_len_gib" --max-len-cap "$max_len_cap" --max-len-granule 4096 --max-len-dtype bf16
  --out-dir "$out_dir")
[ -n "$variants" ] && lt_args+=(--variants "$variants")
say "longtape ${lt_args[*]}"
timeout $((longtape_budget + 150)) "$build_dir/bin/longtape" "${lt_args[@]}" 2>>"$out_dir/longtape_progress.log" | tee -a "$log"
lt_status=${PIPESTATUS[0]}
lt_done=$(date +%s)
say "longtape bench exit $lt_status after $((lt_done - built)) s"

# ---- PyTorch, same grid (dense and dilated)
torch_args=(--device "$device" --dtype "$dtypes" --seq-lens "$seq_lens" --batch "$batch" --heads "$heads"
  --head-dim "$head_dim" --segments "$segments" --dilations "$dilations" --mixing "$mixing" --causal off
  --warmup 3 --repeats 10 --case-time-limit "$case_limit" --time-budget "$torch_budget"
  --max-len-budget-gib "$max_len_gib" --max-len-cap "$max_len_cap" --max-len-granule 4096 --max-len-dtype bf16
  --out-dir "$out_dir")
say "python3 benchmarks/torch_bench.py ${torch_args[*]}"
PYTHONUNBUFFERED=1 timeout $((torch_budget + 120)) python3 benchmarks/torch_bench.py "${torch_args[@]}" \
  2>>"$out_dir/torch_progress.log" >>"$log"
torch_status=$?
torch_done=$(date +%s)
say "torch_bench exit $torch_status after $((torch_done - lt_done)) s"
tail -5 "$out_dir/torch_progress.log" | tee -a "$log"

# ---- merge, validate
if [ -f "$out_dir/bench.json" ] && [ -f "$out_dir/torch_bench.json" ]; then
  python3 benchmarks/merge.py "$out_dir/bench.json" "$out_dir/torch_bench.json" -o "$out_dir/merged.md" \
    --csv "$out_dir/merged.csv" --plots "$out_dir" 2>&1 | tee -a "$log"
  cat "$out_dir/merged.md" | tee -a "$log" >/dev/null
fi
for f in "$out_dir/bench.json" "$out_dir/torch_bench.json"; do
  [ -f "$f" ] && python3 benchmarks/validate.py "$f" 2>&1 | tee -a "$log"
done
say "total $(( $(date +%s) - start )) s"

# ---- results back (at most 8 files: the tarball holds everything, the rest are for reading)
if [ -n "${OUT:-}" ]; then
  tar czf "$OUT/gpu_bench.tar.gz" -C "$(dirname "$out_dir")" "$(basename "$out_dir")"
  for f in bench.json bench.md torch_bench.json merged.md gpu_bench.log; do
    [ -f "$out_dir/$f" ] && cp "$out_dir/$f" "$OUT/"
  done
fi
[ "$lt_status" -eq 0 ] && [ "$torch_status" -eq 0 ]
