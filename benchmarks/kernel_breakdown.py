#!/usr/bin/env python3
"""GPU time per kernel name from an Nsight Compute CSV (one duration metric per launch).

    ncu --metrics gpu__time_duration.sum --csv --log-file run.csv <program> ...
    python3 benchmarks/kernel_breakdown.py run.csv [--steps S] [--top N]

Prints a table sorted by total time: launches, total ms (divided by --steps when given), share.
"""
import argparse
import csv
import collections
import re


def short(name: str) -> str:
    name = name.replace("(anonymous namespace)::", "").replace("<unnamed>::", "")
    name = re.sub(r"\(.*", "", name)          # drop parameter lists
    name = re.sub(r"^void ", "", name)
    base = re.sub(r"<.*>", "", name).split("::")[-1]
    args = re.search(r"<(.*)>", name)
    return (base + (f"<{args.group(1)}>" if args else ""))[:80]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("csv")
    ap.add_argument("--steps", type=float, default=1.0)
    ap.add_argument("--top", type=int, default=30)
    args = ap.parse_args()
    with open(args.csv, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    total = collections.defaultdict(float)
    count = collections.Counter()
    for row in csv.DictReader(lines):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        value = float(row["Metric Value"].replace(",", ""))
        scale = {"nsecond": 1e-6, "usecond": 1e-3, "msecond": 1.0}.get(row.get("Metric Unit", "nsecond"), 1e-6)
        key = short(row["Kernel Name"])
        total[key] += value * scale / args.steps
        count[key] += 1
    grand = sum(total.values())
    print(f"| kernel | launches | ms | share |\n|---|--:|--:|--:|")
    for key, ms in sorted(total.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"| {key} | {count[key] / args.steps:.0f} | {ms:.3f} | {100 * ms / grand:.1f}% |")
    print(f"| all kernels | {sum(count.values()) / args.steps:.0f} | {grand:.3f} | 100% |")


if __name__ == "__main__":
    main()
