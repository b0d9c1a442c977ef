#!/usr/bin/env bash
set -u
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 -DCMAKE_PREFIX_PATH=$PWD/.deps/prefix >/dev/null || exit 1
t0=$(date +%s)
ninja -C build-gpu -j16 longtape_cli test_linear test_layer_norm_fused test_mixed_precision_cuda test_fused_ops test_cuda_parity test_op_table >$OUT/build.log 2>&1 || { grep -E "error|FAILED" $OUT/build.log | head -30; exit 1; }
echo "build $(( $(date +%s) - t0 )) s"
export PATH=/usr/local/cuda/bin:$PATH
b=build-gpu/bin
for t in test_linear test_layer_norm_fused test_mixed_precision_cuda test_fused_ops test_cuda_parity test_op_table; do
  timeout 240 $b/$t > $OUT/$t.log 2>&1; echo "$t exit $? $(grep -E '^\[doctest\] (test cases)' $OUT/$t.log)"
  grep -B2 -A6 "ERROR" $OUT/$t.log | head -30
done
TORCH_MODES=bf16,bf16-compile TRAIN_BENCH_LENS="8192 32768" OUT=$OUT timeout 330 bash benchmarks/train_bench.sh > $OUT/train_bench.log 2>&1
tail -20 $OUT/train_bench.log
date -u
