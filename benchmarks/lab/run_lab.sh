#!/usr/bin/env bash
# The kernel lab in one GPU call: builds the lab and the fused-kernel tests, checks the Hopper
# kernels' SASS (warpgroup MMA present, no spills), runs the fused CUDA tests against the float64
# oracle, then times each kernel version with attention_lab. Results go to $OUT (or lab-out/).
#   bash benchmarks/lab/run_lab.sh [LAB_ARGS...]    e.g. --quick, --only dense
# LAB_VARIANTS (default: "default;--portable") lists the lab flag sets to time, ';'-separated
# (e.g. "default;--dtype f32" adds the exact-f32 kernels).
# LAB_TESTS=0 skips the tests.
set -uo pipefail
cd "$(dirname "$0")/../.."
out=${OUT:-lab-out}
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH
extra=()
[ -d .deps/prefix ] && extra+=("-DCMAKE_PREFIX_PATH=$PWD/.deps/prefix")
echo "== GPU: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null | head -1)  date: $(date -u +%F)"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DLONGTAPE_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DCMAKE_CUDA_STANDARD=17 "${extra[@]}" >"$out/lab_configure.log" 2>&1 || { tail -30 "$out/lab_configure.log"; exit 1; }
cmake --build build-gpu -j "${LAB_JOBS:-16}" --target attention_lab test_fused_attention_cuda \
  test_fused_attention_f32_cuda test_fused_attention_determinism >"$out/lab_build.log" 2>&1 || { grep -E "error|FAILED" "$out/lab_build.log" | head -30; exit 1; }

echo "== ptxas C7520 (wgmma serialized) warnings in this build: $(grep -c C7520 "$out/lab_build.log")"
# SASS of the sm_90a objects: warpgroup MMA instructions and local-memory traffic per kernel.
for obj in $(find build-gpu -path '*longtape_sm90a.dir*' -name '*.o'); do
  sass=$(cuobjdump -sass "$obj" 2>/dev/null)
  echo "== SASS $(basename "$obj"): HGMMA $(grep -c HGMMA <<<"$sass"), HMMA $(grep -c ' HMMA' <<<"$sass"), LDL/STL $(grep -cE ' (LDL|STL)' <<<"$sass")"
done

if [ "${LAB_TESTS:-1}" != 0 ]; then
  for t in test_fused_attention_cuda test_fused_attention_f32_cuda test_fused_attention_determinism; do
    build-gpu/bin/$t >"$out/$t.log" 2>&1
    echo "== $t: exit $? $(grep -E '^\[doctest\] (test cases|assertions)' "$out/$t.log" | tr -s ' ' | tr '\n' ' ')"
    grep -E "ERROR|CHECK|seed|fused .*error" "$out/$t.log" | head -20
  done
fi

IFS=';' read -ra variants <<<"${LAB_VARIANTS:-default;--portable}"
for v in "${variants[@]}"; do
  flags=()
  [ "$v" != default ] && read -ra flags <<<"$v"
  echo "== attention_lab ${flags[*]} $*"
  build-gpu/bin/attention_lab "${flags[@]}" "$@" 2>&1 | tee -a "$out/attention_lab.md"
done
