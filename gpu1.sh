#!/usr/bin/env bash
set -u
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 -DCMAKE_PREFIX_PATH=$PWD/.deps/prefix >/dev/null || exit 1
ninja -C build-gpu -j16 longtape_cli test_fused_attention_f32_cuda >$OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
export PATH=/usr/local/cuda/bin:$PATH
M="--device cuda --batch 1 --width 384 --heads 6 --layers 6 --segments 2048,4096,8192 --dilations 1,2,4 --mixing head_groups --lr 1e-3 --keys 16 --values 8 --filler 231 --no-key-shift --eval-every 0 --eval-batches 1 --seq-len 32768 --precision bf16"
build-gpu/bin/longtape train $M --steps 8 --profile > $OUT/profile_32k.txt 2>&1
ncu --metrics gpu__time_duration.sum --csv --log-file $OUT/ncu.csv build-gpu/bin/longtape train $M --steps 3 >/dev/null 2>&1
python3 benchmarks/kernel_breakdown.py $OUT/ncu.csv --steps 3 --top 45 > $OUT/kernels_32k.md
head -50 $OUT/kernels_32k.md
rm -f $OUT/ncu.csv
export LONGTAPE_NO_CACHING_ALLOCATOR=1
b=build-gpu/bin
timeout 200 compute-sanitizer --tool memcheck --error-exitcode 9 $b/test_fused_attention_f32_cuda > $OUT/memcheck_f32.log 2>&1; echo "memcheck exit $?"
timeout 240 compute-sanitizer --tool racecheck --error-exitcode 9 $b/test_fused_attention_f32_cuda -tc="*backward*" > $OUT/racecheck_f32.log 2>&1; echo "racecheck exit $?"
grep -hE "^\[doctest\] (test cases|assertions)|ERROR SUMMARY|RACECHECK SUMMARY" $OUT/*check_f32.log
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader; date -u
