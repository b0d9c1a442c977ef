#!/usr/bin/env python3
"""Merge a `longtape bench` JSON and a benchmarks/torch_bench.py JSON into one markdown table with ratios.

    python3 benchmarks/merge.py bench-out/bench.json bench-out/torch_bench.json -o bench-out/merged.md \
        [--csv bench-out/merged.csv] [--plots bench-out]

Rows are matched on (variant, dtype, batch, N, heads, head_dim, causal) and, for dilated attention,
(segment lengths, dilation rates, mixing). Ratios are longtape / PyTorch: below 1 means longtape is
faster or uses less memory. Rows measured by only one side are listed too. Each side's implementation
and compute precision (what ran, and the precision its math ran in) are columns of their own: the
dtype column is only the inputs' dtype. With --plots, writes
merged_time_vs_n_<dtype>.png and merged_memory_vs_n_<dtype>.png (longtape solid, PyTorch dashed)
through gnuplot when it is installed (the .gp script and data are written either way).
Standard library only.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

MIB = 1024.0 ** 2


def key_of(row):
    cfg = row.get("config", {})
    dilated = row["variant"] == "dilated"
    return (row["variant"], row["dtype"], row["batch"], row["seq_len"], row["heads"], row["head_dim"],
            bool(row["causal"]),
            tuple(cfg.get("segment_lengths", [])) if dilated else (),
            tuple(cfg.get("dilation_rates", [])) if dilated else (),
            cfg.get("mixing", "lse") if dilated else "")


def series_of(row):
    k = key_of(row)
    return k[:3] + k[4:]  # everything but N


def measured(row):
    return row is not None and row.get("status") == "measured"


def fmt(x, digits=3):
    if x is None:
        return "-"
    if x == 0:
        return "0"
    if abs(x) >= 1000:
        return "%.0f" % x
    return "%.*g" % (digits, x)


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def fig(row, phase, key):
    if not measured(row):
        return None
    return row.get(phase, {}).get(key)


def machine_line(doc):
    m = doc.get("machine", {})
    gpu = m.get("gpu")
    where = ("%s (driver %s, CUDA %s)" % (gpu.get("name"), gpu.get("driver_version"), gpu.get("cuda_runtime_version"))
             if gpu else "CPU " + m.get("cpu", "?"))
    extra = (" torch " + m["torch_version"]) if m.get("torch_version") else ""
    return "%s %s, %s%s, %s" % (doc.get("tool"), doc.get("tool_version", ""), where, extra, doc.get("created_utc", ""))


def merge(ours, theirs):
    """Rows (key, longtape row or None, torch row or None) in longtape's order, then torch-only rows."""
    by_key = {key_of(r): r for r in theirs.get("results", [])}
    rows, used = [], set()
    for r in ours.get("results", []):
        k = key_of(r)
        rows.append((k, r, by_key.get(k)))
        used.add(k)
    for r in theirs.get("results", []):
        if key_of(r) not in used:
            rows.append((key_of(r), None, r))
    return rows


def config_text(row):
    return row.get("config_label", "-")


def ran(row, key):
    """implementation or compute_precision of a row: the forward's, and the forward+backward's when
    that phase ran differently (longtape records both); '-' for a side that has no row."""
    if row is None:
        return "-"
    cell = str(row.get(key) or "-")
    fwdbwd = (row.get("forward_backward") or {}).get(key)
    if fwdbwd and fwdbwd != row.get(key):
        cell += " (fwd+bwd: %s)" % fwdbwd
    return cell


def md_cell(text):
    return str(text).replace("|", "\\|")


def markdown(ours, theirs):
    lines = ["# longtape vs PyTorch: attention forward and forward+backward", "",
             "- longtape: " + machine_line(ours), "- PyTorch: " + machine_line(theirs),
             "- longtape command: `%s`" % ours.get("config", {}).get("command_line", ""),
             "- PyTorch command: `%s`" % theirs.get("config", {}).get("command_line", ""),
             "- ratio = longtape / PyTorch (below 1: longtape faster or smaller); times are medians in ms; "
             "peak = allocated bytes during forward+backward, inputs included", ""]
    impls = sorted({r.get("implementation", "") for r in theirs.get("results", []) if r.get("implementation")})
    if impls:
        lines.append("- PyTorch implementations: " + "; ".join(impls))
    for note in theirs.get("notes", []):
        lines.append("- PyTorch note: " + note)
    lines += ["",
              "| variant | config | dtype | B | N | H | D | implementation longtape | precision longtape | "
              "implementation torch | precision torch | fwd ms longtape | fwd ms torch | fwd ratio | "
              "f+b ms longtape | f+b ms torch | f+b ratio | f+b TFLOP/s longtape | f+b TFLOP/s torch | "
              "peak MiB longtape | peak MiB torch | mem ratio |",
              "|---|---|---|--:|--:|--:|--:|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for k, a, b in merge(ours, theirs):
        row = a if a is not None else b
        cells = [row["variant"], md_cell(config_text(row)), row["dtype"], str(row["batch"]),
                 str(row["seq_len"]), str(row["heads"]), str(row["head_dim"])]
        cells += [md_cell(ran(r, key)) for r in (a, b) for key in ("implementation", "compute_precision")]
        fa, fb = fig(a, "forward", "median_ms"), fig(b, "forward", "median_ms")
        ba, bb = fig(a, "forward_backward", "median_ms"), fig(b, "forward_backward", "median_ms")
        ta, tb = fig(a, "forward_backward", "tflops"), fig(b, "forward_backward", "tflops")
        ma = fig(a, "forward_backward", "peak_allocated_bytes")
        mb = fig(b, "forward_backward", "peak_allocated_bytes")
        ma = ma / MIB if ma is not None else None
        mb = mb / MIB if mb is not None and mb > 0 else None
        cells += [fmt(fa), fmt(fb), fmt(ratio(fa, fb), 2), fmt(ba), fmt(bb), fmt(ratio(ba, bb), 2), fmt(ta), fmt(tb),
                  fmt(ma, 4), fmt(mb, 4), fmt(ratio(ma, mb), 2)]
        status = []
        for side, r in (("longtape", a), ("torch", b)):
            if r is None:
                status.append("%s: not run" % side)
            elif not measured(r):
                status.append("%s %s: %s" % (side, r["status"], r.get("reason", "")))
        if status:
            cells[-1] = cells[-1] + " (" + "; ".join(status).replace("|", "\\|")[:200] + ")"
        lines.append("| " + " | ".join(cells) + " |")

    ml_a = {series_of(dict(r, seq_len=0)): r for r in ours.get("max_seq_len", [])}
    ml_b = {series_of(dict(r, seq_len=0)): r for r in theirs.get("max_seq_len", [])}
    if ml_a or ml_b:
        budget = ours.get("config", {}).get("max_len_budget_gib") or theirs.get("config", {}).get("max_len_budget_gib")
        lines += ["", "## Longest sequence within %s GiB (forward+backward)" % budget, "",
                  "| variant | config | dtype | B | H | D | max N longtape | max N torch | ratio |",
                  "|---|---|---|--:|--:|--:|--:|--:|--:|"]
        for s in list(ml_a) + [s for s in ml_b if s not in ml_a]:
            a, b = ml_a.get(s), ml_b.get(s)
            row = a or b
            na = a["max_seq_len"] if measured(a) else None
            nb = b["max_seq_len"] if measured(b) else None
            cap = lambda r, n: ("%d%s" % (n, "+" if r.get("reached_cap") else "")) if n is not None else "-"
            lines.append("| %s | %s | %s | %d | %d | %d | %s | %s | %s |" % (
                row["variant"], config_text(row), row["dtype"], row["batch"], row["heads"], row["head_dim"],
                cap(a, na) if a else "-", cap(b, nb) if b else "-", fmt(ratio(na, nb), 2)))
    return "\n".join(lines) + "\n"


def csv_text(ours, theirs):
    header = ["variant", "config_label", "dtype", "batch", "seq_len", "heads", "head_dim", "causal",
              "longtape_implementation", "longtape_compute_precision", "torch_implementation",
              "torch_compute_precision", "longtape_fwd_ms", "torch_fwd_ms", "fwd_ratio", "longtape_fwdbwd_ms", "torch_fwdbwd_ms", "fwdbwd_ratio",
              "longtape_peak_bytes", "torch_peak_bytes", "mem_ratio", "longtape_status", "torch_status"]
    out = [",".join(header)]
    for k, a, b in merge(ours, theirs):
        row = a if a is not None else b
        fa, fb = fig(a, "forward", "median_ms"), fig(b, "forward", "median_ms")
        ba, bb = fig(a, "forward_backward", "median_ms"), fig(b, "forward_backward", "median_ms")
        ma, mb = fig(a, "forward_backward", "peak_allocated_bytes"), fig(b, "forward_backward", "peak_allocated_bytes")
        cells = [row["variant"], csv_quote(config_text(row)), row["dtype"], row["batch"], row["seq_len"], row["heads"],
                 row["head_dim"], row["causal"]]
        cells += [csv_quote(ran(r, key)) if r is not None else None
                  for r in (a, b) for key in ("implementation", "compute_precision")]
        cells += [fa, fb, ratio(fa, fb), ba, bb, ratio(ba, bb), ma, mb,
                 ratio(ma, mb) if mb else None, a["status"] if a else "not run", b["status"] if b else "not run"]
        out.append(",".join("" if c is None else str(c) for c in cells))
    return "\n".join(out) + "\n"


def csv_quote(text):
    return '"%s"' % str(text).replace('"', '""')


def write_plots(ours, theirs, out_dir):
    """gnuplot data and script; draws the PNGs when gnuplot is installed. Returns (pngs, note)."""
    # Only what both tools ran (dense, dilated), each (variant, config) in one colour: longtape
    # solid, PyTorch dashed.
    series = {}  # dtype -> (tool, label) -> [(N, ms, MiB)]
    label = lambda r: ("%s %s" % (r["variant"], "" if r.get("config_label") in (None, "-") else r["config_label"])).strip()
    # longtape labels name a requested implementation (impl=fused); PyTorch has none to match.
    same_setting = lambda r: " ".join(item for item in label(r).split() if not item.startswith("impl="))
    in_torch = {same_setting(r) for r in theirs.get("results", []) if measured(r)}
    for tool, doc in (("longtape", ours), ("torch", theirs)):
        for r in doc.get("results", []):
            if not measured(r) or same_setting(r) not in in_torch:
                continue
            series.setdefault(r["dtype"], {}).setdefault((tool, label(r)), []).append(
                (r["seq_len"], r["forward_backward"]["median_ms"], r["forward_backward"]["peak_allocated_bytes"] / MIB))
    if not series:
        return [], "no measured rows to plot"
    script = ['if (strstrt(GPVAL_TERMINALS, "pngcairo") > 0) {', '  set terminal pngcairo size 1000,800 noenhanced font ",11"',
              "} else {", "  set terminal png size 1000,800 noenhanced", "}",
              "set logscale x 2", "set logscale y 10", "set grid xtics ytics mxtics mytics", "set key below left Left reverse",
              'set xlabel "sequence length N"', 'set format x "%.0f"']
    pngs = []
    where = machine_line(ours)
    for dtype, by_title in sorted(series.items()):
        data = "merged_%s.dat" % dtype
        titles = sorted(by_title, key=lambda key: (key[1], key[0]))
        colours = {lab: i + 1 for i, lab in enumerate(sorted({key[1] for key in titles}))}
        with open(os.path.join(out_dir, data), "w") as f:
            for key in titles:
                f.write("# %s\n" % key[1])
                for n, ms, mib in sorted(by_title[key]):
                    f.write("%d %r %r\n" % (n, ms, mib))
                f.write("\n\n")
        for name, column, ylabel in (("time", 2, "forward+backward time (ms, median)"),
                                     ("memory", 3, "forward+backward peak allocated (MiB)")):
            png = "merged_%s_vs_n_%s.png" % (name, dtype)
            script += ['set output "%s"' % png, 'set title "longtape (solid) vs PyTorch (dashed), %s\\n%s"' % (dtype, where),
                       'set ylabel "%s"' % ylabel]
            clauses = []
            for i, key in enumerate(titles):
                if name == "memory" and key[0] == "torch" and all(p[2] == 0 for p in by_title[key]):
                    continue
                dash = "dt 2" if key[0] == "torch" else "dt 1"
                clauses.append('"%s" index %d using 1:%d with linespoints lw 2 lc %d %s title "%s %s"' % (
                    data, i, column, colours[key[1]], dash, key[0], key[1].replace('"', "'")))
            script.append("plot " + ", \\\n     ".join(clauses))
            script.append("unset output")
            pngs.append(png)
    with open(os.path.join(out_dir, "merged.gp"), "w") as f:
        f.write("\n".join(script) + "\n")
    if shutil.which("gnuplot") is None:
        return [], "gnuplot is not installed: run `gnuplot merged.gp` in %s to draw the plots" % out_dir
    done = subprocess.run(["gnuplot", "merged.gp"], cwd=out_dir, capture_output=True, text=True)
    if done.returncode != 0:
        return [], "gnuplot failed: " + done.stderr.strip()[:300]
    return pngs, ""


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("longtape_json")
    p.add_argument("torch_json")
    p.add_argument("-o", "--output", help="markdown file (default: print)")
    p.add_argument("--csv", help="also write the merged rows as CSV")
    p.add_argument("--plots", metavar="DIR", help="write merged gnuplot plots into DIR")
    args = p.parse_args(argv)
    with open(args.longtape_json) as f:
        ours = json.load(f)
    with open(args.torch_json) as f:
        theirs = json.load(f)
    if ours.get("tool") != "longtape" or theirs.get("tool") != "pytorch":
        p.error("expected a longtape JSON then a pytorch JSON, got tools %r and %r" % (ours.get("tool"), theirs.get("tool")))
    text = markdown(ours, theirs)
    if args.plots:
        os.makedirs(args.plots, exist_ok=True)
        pngs, note = write_plots(ours, theirs, args.plots)
        if pngs:
            text += "\n" + "\n".join("![%s](%s)" % (png, png) for png in pngs) + "\n"
        if note:
            text += "\nNote: " + note + "\n"
            print("merge: " + note, file=sys.stderr)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
        print("wrote " + args.output, file=sys.stderr)
    else:
        sys.stdout.write(text)
    if args.csv:
        with open(args.csv, "w") as f:
            f.write(csv_text(ours, theirs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
