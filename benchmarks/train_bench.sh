#!/usr/bin/env bash
# Training speed against PyTorch in one GPU call: `longtape train` and benchmarks/torch_train_bench.py
# build the same model (vocab 256, width 384, 6 heads, 6 layers, batch 1, causal dilated attention
# with head_groups mixing, segments 2048,4096,8192, dilations 1,2,4, AdamW; longtape with
# --no-key-shift, which the PyTorch model does not have) and time training steps at each N.
# longtape: median of the per-step differences of elapsed_s over steps 6-25 (each step reads the
# loss back, as a training loop does), peak allocated memory of the run.
#   bash benchmarks/train_bench.sh          (TRAIN_BENCH_LENS="8192 32768", TORCH_MODES=f32,tf32,bf16,bf16-compile)
# TRAIN_GRAPH=1 adds longtape rows with --cuda-graph (the step captured once and replayed; modes
# bf16-graph and f32-graph).
# Results: $OUT/train (or bench-out/train): longtape_<mode>_<N>.json, torch/torch_train_bench.{json,md}
# and summary.md.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench-out}/train
mkdir -p "$out"
bin=${LONGTAPE_BIN_DIR:-build-gpu/bin}
lens=${TRAIN_BENCH_LENS:-8192 32768}
model=(--device cuda --batch 1 --width 384 --heads 6 --layers 6 --segments 2048,4096,8192 --dilations 1,2,4
       --mixing head_groups --lr 1e-3 --keys 16 --values 8 --filler 231 --no-key-shift --steps 25 --eval-every 0
       --eval-batches 1)
modes="bf16 f32"
if [ "${TRAIN_GRAPH:-0}" = 1 ]; then modes="$modes bf16-graph f32-graph"; fi
for n in $lens; do
  for m in $modes; do
    graph=()
    if [ "${m%-graph}" != "$m" ]; then graph=(--cuda-graph); fi
    timeout 300 "$bin/longtape" train "${model[@]}" --seq-len "$n" --precision "${m%-graph}" "${graph[@]}" \
      --metrics "$out/longtape_${m}_$n.json" >"$out/longtape_${m}_$n.log" 2>&1 || tail -5 "$out/longtape_${m}_$n.log"
  done
done
MODES="$modes" python3 - "$out" $lens <<'PY' | tee "$out/summary.md"
import json, os, statistics, sys
out, lens = sys.argv[1], sys.argv[2:]
modes = os.environ["MODES"].split()
print("| implementation | precision | N | step ms (median) | tokens/s | peak MiB | final loss |")
print("|---|---|--:|--:|--:|--:|--:|")
for n in lens:
    for m in modes:
        p, graph = m.removesuffix("-graph"), m.endswith("-graph")
        name = "longtape, CUDA graph" if graph else "longtape"
        path = os.path.join(out, f"longtape_{m}_{n}.json")
        if not os.path.exists(path):
            print(f"| {name} | {p} | {n} | failed | | | |")
            continue
        doc = json.load(open(path))
        t = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(doc["rows"][5:], doc["rows"][6:])]
        ms = statistics.median(t) * 1e3
        peak = doc["final"]["peak_allocated_bytes"] / 2**20
        print(f"| {name} ({doc['attention']['implementation']}) | {doc['compute_precision']} | {n} | {ms:.1f} | "
              f"{int(n) / ms * 1e3:,.0f} | {peak:,.0f} | {doc['rows'][-1]['loss']:.4f} |")
PY
timeout ${TORCH_TIMEOUT:-420} python3 benchmarks/torch_train_bench.py --device cuda --seq-lens "$(echo $lens | tr ' ' ',')" \
  --modes "${TORCH_MODES:-f32,tf32,bf16,bf16-compile}" --steps 20 --warmup 5 --out-dir "$out/torch" >"$out/torch.log" 2>&1
grep -E "^\|" "$out/torch/torch_train_bench.md" 2>/dev/null || tail -20 "$out/torch.log"
