#!/usr/bin/env bash
set -u
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 -DCMAKE_PREFIX_PATH=$PWD/.deps/prefix >/dev/null || exit 1
ninja -C build-gpu -j32 longtape_cli test_process_group >$OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; }
export PATH=/usr/local/cuda/bin:$PATH
b=$PWD/build-gpu/bin
LONGTAPE_BIN=$b timeout 300 $b/test_process_group > $OUT/tests.log 2>&1; echo "tests exit $?"; grep -E "^\[doctest\] (test cases|assertions)" $OUT/tests.log
for ctas in default 16 8; do
  if [ $ctas = default ]; then unset NCCL_MAX_CTAS; else export NCCL_MAX_CTAS=$ctas; fi
  echo "== NCCL_MAX_CTAS=$ctas"
  timeout 200 $b/longtape launch --nproc 2 --timeout 120 -- longtape dist-check --backend nccl --device cuda --attention 262144 --repeats 5 --head-groups 1,0 --attention-cores dilated 2>&1 | grep -v "^dist-check\|^ring" | tee -a $OUT/hp2.log
done
date -u
