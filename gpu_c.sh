#!/usr/bin/env bash
set -u
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 -DCMAKE_PREFIX_PATH=$PWD/.deps/prefix >/dev/null || exit 1
ninja -C build-gpu -j16 longtape_cli test_linear test_mixed_precision_cuda test_fused_ops test_cuda_parity test_op_table >$OUT/build.log 2>&1 || { grep -E "error|FAILED" $OUT/build.log | head -30; exit 1; }
export PATH=/usr/local/cuda/bin:$PATH
b=build-gpu/bin
for t in test_linear test_mixed_precision_cuda test_fused_ops test_cuda_parity test_op_table; do
  timeout 240 $b/$t > $OUT/$t.log 2>&1; echo "$t exit $? $(grep -E '^\[doctest\] (test cases)' $OUT/$t.log)"
  grep -B2 -A8 "ERROR" $OUT/$t.log | head -24
done
TORCH_MODES=bf16,bf16-compile TRAIN_BENCH_LENS="8192 32768" OUT=$OUT timeout 330 bash benchmarks/train_bench.sh > $OUT/train_bench.log 2>&1
grep "^|" $OUT/train_bench.log | cut -c1-200
M="--device cuda --batch 1 --width 384 --heads 6 --layers 6 --segments 2048,4096,8192 --dilations 1,2,4 --mixing head_groups --lr 1e-3 --keys 16 --values 8 --filler 231 --no-key-shift --eval-every 0 --eval-batches 1 --seq-len 32768 --precision bf16"
ncu --metrics gpu__time_duration.sum --csv --log-file $OUT/ncu.csv $b/longtape train $M --steps 3 >/dev/null 2>&1
python3 benchmarks/kernel_breakdown.py $OUT/ncu.csv --steps 3 --top 40 > $OUT/kernels_32k.md
python3 - $OUT/ncu.csv > $OUT/launch_order.txt <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')) if r.get("Metric Name") == "gpu__time_duration.sum"]
n = len(rows) // 3
for r in rows[-n:]:
    print(f'{float(r["Metric Value"].replace(",", "")):>10.0f} {r["Kernel Name"][:110]}')
PY
rm -f $OUT/ncu.csv
head -30 $OUT/kernels_32k.md
date -u
