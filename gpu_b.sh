#!/usr/bin/env bash
set -u
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 -DCMAKE_PREFIX_PATH=$PWD/.deps/prefix >/dev/null || exit 1
ninja -C build-gpu -j16 longtape_cli test_mixed_precision_cuda >$OUT/build.log 2>&1 || { grep -E "error|FAILED" $OUT/build.log | head -30; exit 1; }
export PATH=/usr/local/cuda/bin:$PATH
b=build-gpu/bin
for i in 1 2 3; do timeout 240 $b/test_mixed_precision_cuda -tc="*gelu_mlp*" > $OUT/mp.log 2>&1; echo "mp exit $? $(grep -E '^\[doctest\] (test cases)' $OUT/mp.log)"; grep -A12 "ERROR" $OUT/mp.log | head -30; done
M="--device cuda --batch 1 --width 384 --heads 6 --layers 6 --segments 2048,4096,8192 --dilations 1,2,4 --mixing head_groups --lr 1e-3 --keys 16 --values 8 --filler 231 --no-key-shift --eval-every 0 --eval-batches 1 --seq-len 32768 --precision bf16"
ncu --metrics gpu__time_duration.sum --csv --log-file $OUT/ncu.csv $b/longtape train $M --steps 3 >/dev/null 2>&1
python3 benchmarks/kernel_breakdown.py $OUT/ncu.csv --steps 3 --top 40 > $OUT/kernels_32k.md
cat $OUT/kernels_32k.md
rm -f $OUT/ncu.csv
