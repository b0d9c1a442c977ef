#!/usr/bin/env python3
"""PyTorch side of the attention benchmark: the same grid as `longtape bench`, the same JSON schema.

    python3 benchmarks/torch_bench.py --device cuda --dtype bf16,f32 --seq-lens 4096,8192 \
        --heads 8 --head-dim 64 --segments 2048,4096 --dilations 1,2 --mixing lse,head_groups \
        --out-dir bench-out

Variants (the semantics of docs/attention.md, inputs (B, N, H, D) like longtape):
  dense    torch.nn.functional.scaled_dot_product_attention (PyTorch picks its fastest kernel).
  dilated  gather -> attention -> scatter per branch and head offset:
           head_groups: heads in G contiguous groups, group g runs branch g at offset g mod r_g with
             scaled_dot_product_attention, output divided by G.
           lse: every head in every branch (offset h mod r_i), branches merged by their log-sum-exp.
             PyTorch's public SDPA does not return the lse, so the fast path calls the attention
             kernels behind it (flash for bf16/f16, memory-efficient for f32 on CUDA, the flash CPU
             kernel on the CPU) through a custom autograd function whose backward is the kernels'
             own backward run per branch with the FINAL output and lse, which gives the exact
             gradient of the merged softmax (the lse weights are not detached). A plain
             matmul/softmax implementation ("math") is the reference: the fast path is checked
             against it at start-up (forward and gradients) and replaced by it if it disagrees or
             the kernels are missing in this PyTorch build.
Timing: CUDA events (or a monotonic clock on the CPU) after warm-up, median of the timed runs;
forward timed under no_grad, forward+backward back-propagates a random output gradient. Peak
memory: torch.cuda max_memory_allocated / max_memory_reserved after emptying the cache and
resetting the peak (CPU memory is not measured: reported as 0 with a note).
Every row records its implementation and compute_precision, the precision the attention math ran in
(benchmarks/torch_precision.py): the dtype column is only the inputs' dtype.
Writes DIR/torch_bench.json (validates against benchmarks/bench_schema.json) and DIR/torch_bench.md.
"""
import argparse
import datetime
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from torch_precision import compute_precision, sdpa_kernel

GIB = 1024.0 ** 3
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}


# ---------------------------------------------------------------------------------------------
# Index arithmetic (mirrors attention/patterns.cpp)

def effective_segment(n, w):
    return min(w, n)


def stream_groups(n, w, r, offset):
    """Streams of one branch at one offset, grouped by equal length: a list of (positions, count,
    length) where positions lists count streams of `length` positions back to back."""
    w = effective_segment(n, w)
    streams = []
    for start in range(0, n, w):
        end = min(start + w, n)
        first = start + offset
        streams.append(list(range(first, end, r)) if first < end else [])
    groups = []
    i = 0
    while i < len(streams):
        j = i
        while j < len(streams) and len(streams[j]) == len(streams[i]):
            j += 1
        if streams[i]:
            positions = [p for s in streams[i:j] for p in s]
            groups.append((positions, j - i, len(streams[i])))
        i = j
    return groups


def head_group_sizes(heads, groups):
    return [heads // groups + (1 if g < heads % groups else 0) for g in range(groups)]


def stream_pairs(length, causal):
    return length * (length + 1) // 2 if causal else length * length


def attended_pairs(variant, cfg, n):
    """Attended (query, key) pairs of one sequence, all heads, with multiplicity (as longtape)."""
    heads, causal = cfg["num_heads"], cfg["causal"]
    if variant == "dense":
        return heads * stream_pairs(n, causal)
    branches = list(zip(cfg["segment_lengths"], cfg["dilation_rates"]))
    total = 0
    if cfg["mixing"] == "lse":
        for h in range(heads):
            for w, r in branches:
                total += sum(cnt * stream_pairs(length, causal) for _, cnt, length in stream_groups(n, w, r, h % r))
    else:
        sizes = head_group_sizes(heads, len(branches))
        for g, (w, r) in enumerate(branches):
            per_head = sum(cnt * stream_pairs(length, causal) for _, cnt, length in stream_groups(n, w, r, g % r))
            total += sizes[g] * per_head
    return total


def config_label(variant, cfg):
    items = []
    if variant == "dilated":
        items += ["w=" + ",".join(map(str, cfg["segment_lengths"])), "r=" + ",".join(map(str, cfg["dilation_rates"])),
                  cfg["mixing"]]
    if cfg["causal"]:
        items.append("causal")
    return " ".join(items) if items else "-"


# ---------------------------------------------------------------------------------------------
# Attention kernels with log-sum-exp

def math_attention(q, k, v, causal, scale):
    """(..., L, D) -> out, lse (..., L); differentiable through both."""
    work = torch.promote_types(q.dtype, torch.float32)
    scores = torch.matmul(q.to(work), k.to(work).transpose(-1, -2)) * scale
    if causal:
        length = scores.shape[-1]
        mask = torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, v.to(work)).to(q.dtype), lse


class KernelOps:
    """Forward with lse and the matching backward of one PyTorch attention kernel, on (B, H, L, D).
    forward returns (out, lse (B, H, L) f32, extras); backward takes the extras of that forward."""

    def __init__(self, name, forward, backward):
        self.name, self.forward, self.backward = name, forward, backward


def flash_cuda_ops():
    aten = torch.ops.aten

    def forward(q, k, v, causal, scale):
        res = aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return res[0], res[1], tuple(res[2:8])

    def backward(dout, q, k, v, out, lse, causal, scale, extras):
        cum_q, cum_k, max_q, max_k, seed, offset = extras
        dq, dk, dv = aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, lse, cum_q, cum_k, max_q, max_k, 0.0, causal, seed, offset, scale=scale)
        return dq, dk, dv

    return KernelOps("flash", forward, backward)


def efficient_cuda_ops():
    aten = torch.ops.aten

    def forward(q, k, v, causal, scale):
        res = aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
        length = q.shape[-2]
        return res[0], res[1][..., :length], (res[1].shape[-1], res[2], res[3])

    def backward(dout, q, k, v, out, lse, causal, scale, extras):
        padded_length, seed, offset = extras
        if padded_length != lse.shape[-1]:  # the kernel reads the lse in its padded layout
            full = lse.new_zeros(lse.shape[:-1] + (padded_length,))
            full[..., : lse.shape[-1]] = lse
            lse = full
        dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
            dout, q, k, v, None, out, lse.contiguous(), seed, offset, 0.0, [True, True, True, False], causal,
            scale=scale)
        return dq, dk, dv

    return KernelOps("efficient", forward, backward)


def flash_cpu_ops():
    aten = torch.ops.aten

    def forward(q, k, v, causal, scale):
        out, lse = aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
        return out, lse, None

    def backward(dout, q, k, v, out, lse, causal, scale, extras):
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(dout, q, k, v, out, lse, 0.0, causal,
                                                                         scale=scale)

    return KernelOps("flash_cpu", forward, backward)


def math_kernel_ops():
    """The kernel interface in plain PyTorch (flash backward formulas): tests the plumbing of
    DilatedLseFunction on any build; never used for timing."""

    def forward(q, k, v, causal, scale):
        with torch.no_grad():
            out, lse = math_attention(q, k, v, causal, scale)
        return out, lse, None

    def backward(dout, q, k, v, out, lse, causal, scale, extras):
        work = torch.promote_types(q.dtype, torch.float32)
        q, k, v, dout, out = (x.to(work) for x in (q, k, v, dout, out))
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        if causal:
            length = scores.shape[-1]
            scores = scores.masked_fill(torch.ones(length, length, dtype=torch.bool, device=q.device).triu(1),
                                        float("-inf"))
        probs = torch.exp(scores - lse.to(work).unsqueeze(-1))  # this part's share of the final softmax
        dv = torch.matmul(probs.transpose(-1, -2), dout)
        dp = torch.matmul(dout, v.transpose(-1, -2))
        ds = probs * (dp - (dout * out).sum(-1, keepdim=True))
        return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv

    return KernelOps("math_kernels", forward, backward)


def kernel_ops_for(device, dtype):
    if device.type == "cuda":
        return flash_cuda_ops() if dtype in (torch.bfloat16, torch.float16) else efficient_cuda_ops()
    return flash_cpu_ops()


# ---------------------------------------------------------------------------------------------
# Dilated attention. Streams are gathered into head-major blocks (B*count, Hs, L, D); results go
# back through flat (head, position) indices of a (B, H*N, ...) buffer.

def head_major(x, positions, heads, count, length):
    """x (B, N, H, D) -> the streams of `positions` for the head slice `heads`, (B*count, Hs, L, D)."""
    b, _, _, d = x.shape
    rows = x.index_select(1, positions)[:, :, heads]  # (B, count*L, Hs, D)
    hs = rows.shape[2]
    return rows.reshape(b, count, length, hs, d).permute(0, 1, 3, 2, 4).reshape(b * count, hs, length, d)


def flat_rows(y, b, count):
    """(B*count, Hs, L, ...) -> (B, Hs*count*L, ...) in the order of Part.flat_index."""
    hs, length = y.shape[1], y.shape[2]
    rest = y.shape[3:]
    y = y.reshape((b, count, hs, length) + rest).transpose(1, 2)
    return y.reshape((b, hs * count * length) + rest)


def unflat_rows(y, b, hs, count, length):
    """Inverse of flat_rows: (B, Hs*count*L, ...) -> (B*count, Hs, L, ...)."""
    rest = y.shape[2:]
    y = y.reshape((b, hs, count, length) + rest).transpose(1, 2)
    return y.reshape((b * count, hs, length) + rest)


class Part:
    """One branch at one head offset (lse) or one head group (head_groups): streams of equal length."""

    def __init__(self, branch, heads, positions, count, length, n, device):
        self.branch, self.heads, self.count, self.length = branch, heads, count, length
        self.positions = torch.tensor(positions, device=device)
        head_ids = torch.arange(heads.start, heads.stop, heads.step or 1, device=device)
        self.num_heads = int(head_ids.numel())
        # Row (h, position) of a (B, H*N) buffer, heads outer, in the order of flat_rows.
        self.flat_index = (head_ids[:, None] * n + self.positions[None, :]).reshape(-1)


class Plan:
    """Index tensors of every (branch, offset, group of equal-length streams), built once per shape."""

    def __init__(self, n, heads, cfg, device):
        self.n, self.heads, self.parts = n, heads, []
        branches = list(zip(cfg["segment_lengths"], cfg["dilation_rates"]))
        if cfg["mixing"] == "lse":
            for i, (w, r) in enumerate(branches):
                for offset in range(min(r, heads)):
                    for positions, count, length in stream_groups(n, w, r, offset):
                        self.parts.append(Part(i, slice(offset, heads, r), positions, count, length, n, device))
        else:
            sizes = head_group_sizes(heads, len(branches))
            start = 0
            for g, (w, r) in enumerate(branches):
                for positions, count, length in stream_groups(n, w, r, g % r):
                    self.parts.append(Part(g, slice(start, start + sizes[g]), positions, count, length, n, device))
                start += sizes[g]
        self.num_branches = len(branches)


def to_head_rows(x):
    """(B, N, H, ...) -> (B, H*N, ...)."""
    b, n, h = x.shape[:3]
    return x.transpose(1, 2).reshape((b, h * n) + tuple(x.shape[3:]))


def from_head_rows(y, n, h):
    """(B, H*N, ...) -> (B, N, H, ...)."""
    b = y.shape[0]
    return y.reshape((b, h, n) + tuple(y.shape[2:])).transpose(1, 2)


def merge_by_lse(outs, lses):
    """outs: list of (B, H*N, D) f32, lses: list of (B, H*N); lse merge; rows no branch covers -> 0."""
    lse = torch.logsumexp(torch.stack(lses), dim=0)
    finite = torch.isfinite(lse)
    safe = torch.where(finite, lse, torch.zeros_like(lse))
    out = 0
    for o, l in zip(outs, lses):
        weight = torch.where(finite, torch.exp(l - safe), torch.zeros_like(l))
        out = out + o * weight.unsqueeze(-1)
    return out, lse


def dilated_lse_reference(q, k, v, plan, causal, scale):
    """Plain autograd implementation of lse mixing (the reference): matmul, softmax, index_copy."""
    b, n, h, d = q.shape
    work = torch.promote_types(q.dtype, torch.float32)
    outs = [q.new_zeros((b, h * n, d), dtype=work) for _ in range(plan.num_branches)]
    lses = [q.new_full((b, h * n), float("-inf"), dtype=work) for _ in range(plan.num_branches)]
    for part in plan.parts:
        args = [head_major(x, part.positions, part.heads, part.count, part.length) for x in (q, k, v)]
        o, lse = math_attention(*args, causal, scale)
        outs[part.branch] = outs[part.branch].index_copy(1, part.flat_index, flat_rows(o.to(work), b, part.count))
        lses[part.branch] = lses[part.branch].index_copy(1, part.flat_index, flat_rows(lse.to(work), b, part.count))
    out, _ = merge_by_lse(outs, lses)
    return from_head_rows(out, n, h).to(q.dtype)


class DilatedLseFunction(torch.autograd.Function):
    """lse mixing with PyTorch's attention kernels: forward per part with lse, merge by lse; backward per
    part with the FINAL output and lse (exact gradient of the merged softmax, nothing detached)."""

    @staticmethod
    def forward(ctx, q, k, v, plan, causal, scale, ops):
        b, n, h, d = q.shape
        work = torch.promote_types(q.dtype, torch.float32)
        outs = [torch.zeros((b, h * n, d), dtype=work, device=q.device) for _ in range(plan.num_branches)]
        lses = [torch.full((b, h * n), float("-inf"), dtype=work, device=q.device) for _ in range(plan.num_branches)]
        extras = []
        for part in plan.parts:
            args = [head_major(x, part.positions, part.heads, part.count, part.length) for x in (q, k, v)]
            o, lse, extra = ops.forward(*args, causal, scale)
            extras.append(extra)
            outs[part.branch].index_copy_(1, part.flat_index, flat_rows(o.to(work), b, part.count))
            lses[part.branch].index_copy_(1, part.flat_index, flat_rows(lse.to(work), b, part.count))
        out_rows, lse_rows = merge_by_lse(outs, lses)
        del outs, lses
        out = from_head_rows(out_rows, n, h).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse_rows)
        ctx.plan, ctx.causal, ctx.scale, ctx.ops, ctx.extras = plan, causal, scale, ops, extras
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse_rows = ctx.saved_tensors
        plan, causal, scale, ops = ctx.plan, ctx.causal, ctx.scale, ctx.ops
        b, n, h, d = q.shape
        work = torch.promote_types(q.dtype, torch.float32)
        grads = [torch.zeros((b, h * n, d), dtype=work, device=q.device) for _ in range(3)]
        dout = dout.to(q.dtype)
        for part, extra in zip(plan.parts, ctx.extras):
            gather = lambda x: head_major(x, part.positions, part.heads, part.count, part.length).contiguous()
            # The kernels take the lse in float32 (float64 for the float64 reference kernels).
            lse_part = unflat_rows(lse_rows.index_select(1, part.flat_index), b, part.num_heads, part.count,
                                   part.length).to(torch.float64 if q.dtype == torch.float64 else torch.float32)
            lse_part = lse_part.contiguous()
            part_grads = ops.backward(gather(dout), gather(q), gather(k), gather(v), gather(out), lse_part, causal, scale,
                                      extra)
            for acc, g in zip(grads, part_grads):
                acc.index_add_(1, part.flat_index, flat_rows(g.to(work), b, part.count))
        dq, dk, dv = (from_head_rows(g, n, h).to(q.dtype) for g in grads)
        return dq, dk, dv, None, None, None, None


def dilated_head_groups(q, k, v, plan, causal, scale, sdpa):
    """head_groups mixing: group g's heads run branch g alone (public SDPA), output / G, uncovered rows 0."""
    b, n, h, d = q.shape
    out = q.new_zeros((b, h * n, d))
    for part in plan.parts:
        args = [head_major(x, part.positions, part.heads, part.count, part.length) for x in (q, k, v)]
        out = out.index_copy(1, part.flat_index, flat_rows(sdpa(*args, causal, scale), b, part.count))
    return from_head_rows(out, n, h) / plan.num_branches


def public_sdpa():
    if hasattr(F, "scaled_dot_product_attention"):
        def sdpa(q, k, v, causal, scale):
            try:
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
            except TypeError:  # PyTorch 2.0 has no scale argument; D is the same, so 1/sqrt(D) holds
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return sdpa, "sdpa"
    return (lambda q, k, v, causal, scale: math_attention(q, k, v, causal, scale)[0]), "math"


# ---------------------------------------------------------------------------------------------
# Variants as callables on (B, N, H, D)

class Variant:
    def __init__(self, name, cfg, n, device, dtype, lse_ops):
        self.name, self.cfg = name, cfg
        self.scale = 1.0 / math.sqrt(cfg["head_dim"])
        self.causal = cfg["causal"]
        self.sdpa, sdpa_name = public_sdpa()
        # The kernel doing the math (flash, efficient, flash_cpu or math), for compute_precision.
        self.kernel = (sdpa_kernel(torch, device, dtype, cfg["head_dim"], self.causal) if sdpa_name == "sdpa"
                       else "math")
        if name == "dense":
            self.implementation = sdpa_name
        else:
            self.plan = Plan(n, cfg["num_heads"], cfg, device)
            if cfg["mixing"] == "head_groups":
                self.implementation = "gather -> %s -> scatter" % sdpa_name
            else:
                self.ops = lse_ops
                self.kernel = lse_ops.name if lse_ops else "math"
                self.implementation = "gather -> %s (with lse) -> scatter -> lse merge" % self.kernel

    def __call__(self, q, k, v):
        if self.name == "dense":
            o = self.sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.causal, self.scale)
            return o.transpose(1, 2)
        if self.cfg["mixing"] == "head_groups":
            return dilated_head_groups(q, k, v, self.plan, self.causal, self.scale, self.sdpa)
        if self.ops is None:
            return dilated_lse_reference(q, k, v, self.plan, self.causal, self.scale)
        return DilatedLseFunction.apply(q, k, v, self.plan, self.causal, self.scale, self.ops)


def self_check_lse_ops(device, dtype):
    """Returns (ops or None, message): the kernel path if it matches the reference on a small case."""
    try:
        ops = kernel_ops_for(device, dtype)
    except Exception as e:  # noqa: BLE001 - any failure means: use the reference
        return None, "no lse kernel (%s)" % e
    torch.manual_seed(1234)
    b, n, h, d = 2, 96, 4, 64
    cfg = {"num_heads": h, "head_dim": d, "segment_lengths": [32, 64, 96], "dilation_rates": [1, 2, 4],
           "mixing": "lse", "causal": False}
    tol = {torch.float32: 2e-3, torch.float64: 1e-6}.get(dtype, 5e-2)
    try:
        for causal in (False, True):
            cfg["causal"] = causal
            plan = Plan(n, h, cfg, device)
            q, k, v, g = (torch.randn(b, n, h, d, device=device, dtype=dtype) for _ in range(4))
            results = []
            for use_ops in (ops, None):
                qq, kk, vv = (x.detach().clone().requires_grad_() for x in (q, k, v))
                if use_ops is None:
                    out = dilated_lse_reference(qq, kk, vv, plan, causal, 1.0 / math.sqrt(d))
                else:
                    out = DilatedLseFunction.apply(qq, kk, vv, plan, causal, 1.0 / math.sqrt(d), use_ops)
                out.backward(g)
                results.append([out.float(), qq.grad.float(), kk.grad.float(), vv.grad.float()])
            for name, fast, ref in zip(("out", "dq", "dk", "dv"), results[0], results[1]):
                err = (fast - ref).abs().max().item() / max(1.0, ref.abs().max().item())
                if not err <= tol:
                    return None, "%s kernel path disagrees with the reference (%s error %.3g, causal=%s)" % (
                        ops.name, name, err, causal)
        return ops, "%s kernel path matches the reference" % ops.name
    except Exception as e:  # noqa: BLE001
        return None, "%s kernel path failed (%s: %s)" % (ops.name, type(e).__name__, str(e).splitlines()[0][:200])


def self_test():
    """DilatedLseFunction (final-output-and-lse backward per part) equals autograd through the
    reference, forward and gradients, in float64 with plain-PyTorch kernels."""
    torch.manual_seed(0)
    device, worst = torch.device("cpu"), 0.0
    for n, segments, dilations in ((50, [8, 16, 40], [1, 2, 3]), (64, [16, 64], [1, 4]), (30, [64], [1])):
        for causal in (False, True):
            cfg = {"segment_lengths": segments, "dilation_rates": dilations, "mixing": "lse", "causal": causal}
            plan = Plan(n, 5, cfg, device)
            q, k, v, g = (torch.randn(2, n, 5, 8, dtype=torch.float64) for _ in range(4))
            results = []
            for fast in (True, False):
                qq, kk, vv = (x.clone().requires_grad_() for x in (q, k, v))
                out = (DilatedLseFunction.apply(qq, kk, vv, plan, causal, 0.3, math_kernel_ops()) if fast
                       else dilated_lse_reference(qq, kk, vv, plan, causal, 0.3))
                out.backward(g)
                results.append([out.detach(), qq.grad, kk.grad, vv.grad])
            for a, b in zip(*results):
                worst = max(worst, (a - b).abs().max().item())
    ok = worst < 1e-10
    print("torch_bench self-test: largest difference %.3g -> %s" % (worst, "ok" if ok else "FAILED"))
    return 0 if ok else 1


# ---------------------------------------------------------------------------------------------
# Measurement

def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn, device):
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        return start.elapsed_time(stop)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000.0


def peak_of(fn, device):
    if device.type != "cuda":
        fn()
        return 0, 0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device), torch.cuda.max_memory_reserved(device)


def is_oom(e):
    oom_type = getattr(torch.cuda, "OutOfMemoryError", None)
    return (oom_type is not None and isinstance(e, oom_type)) or "out of memory" in str(e).lower()


def timing_json(ms, flops, tokens, peak):
    median = statistics.median(ms)
    return {
        "median_ms": median, "min_ms": min(ms), "max_ms": max(ms), "mean_ms": statistics.fmean(ms),
        "stdev_ms": statistics.stdev(ms) if len(ms) > 1 else 0.0, "runs": len(ms),
        "tokens_per_s": tokens / (median / 1000.0), "tflops": flops / (median / 1000.0) / 1e12,
        "peak_allocated_bytes": int(peak[0]), "peak_reserved_bytes": int(peak[1]),
    }


def make_inputs(b, n, h, d, device, dtype, seed):
    torch.manual_seed(seed)
    q, k, v, g = (torch.randn(b, n, h, d, device=device, dtype=torch.float32).to(dtype) for _ in range(4))
    return [x.requires_grad_() for x in (q, k, v)] + [g]


def run_case(variant, cfg, b, n, device, dtype, args, lse_ops, series):
    row = {"variant": variant, "status": "measured", "reason": "", "config_label": config_label(variant, cfg),
           "config": dict(cfg), "device": str(device), "dtype": args.dtype_names[dtype], "batch": b, "seq_len": n,
           "heads": cfg["num_heads"], "head_dim": cfg["head_dim"], "causal": cfg["causal"],
           "implementation": "none", "compute_precision": "none"}  # until a variant is built
    if series.get("stop"):
        row.update(status="skipped", reason=series["stop"])
        return row
    stage = "construct"
    try:
        fn = Variant(variant, cfg, n, device, dtype, lse_ops)
        row["implementation"] = fn.implementation
        row["compute_precision"] = compute_precision(torch, device, args.dtype_names[dtype], fn.kernel)
        row["config"]["implementation"] = fn.implementation
        q, k, v, g = make_inputs(b, n, cfg["num_heads"], cfg["head_dim"], device, dtype, args.seed)
        row["inputs_bytes"] = 4 * q.numel() * q.element_size()
        pairs = b * attended_pairs(variant, cfg, n)
        fwd_flops = 4.0 * pairs * cfg["head_dim"]
        row["attended_pairs"] = pairs
        row["pairs_method"] = "analytic"
        row["flops"] = {"forward": fwd_flops, "forward_backward": 3.5 * fwd_flops}

        def forward():
            with torch.no_grad():
                fn(q, k, v)

        def fwdbwd():
            for x in (q, k, v):
                x.grad = None
            fn(q, k, v).backward(g)

        stage = "forward+backward"
        first = time_ms(fwdbwd, device)
        if args.case_time_limit > 0 and first > args.case_time_limit * 1000.0:
            series["stop"] = "too slow: one forward+backward took %.1f s at N = %d" % (first / 1000.0, n)
            row.update(status="skipped", reason=series["stop"])
            return row
        for _ in range(max(0, args.warmup - 1)):
            time_ms(fwdbwd, device)
        fb = [time_ms(fwdbwd, device) for _ in range(args.repeats)]
        stage = "forward"
        for _ in range(args.warmup):
            time_ms(forward, device)
        fw = [time_ms(forward, device) for _ in range(args.repeats)]
        stage = "memory"
        fw_peak = peak_of(forward, device)
        fb_peak = peak_of(fwdbwd, device)
        tokens = float(b * n)
        row["forward"] = timing_json(fw, fwd_flops, tokens, fw_peak)
        row["forward_backward"] = timing_json(fb, 3.5 * fwd_flops, tokens, fb_peak)
    except Exception as e:  # noqa: BLE001 - one failing case never stops the run
        for key in ("forward", "forward_backward"):
            row.pop(key, None)
        if is_oom(e):
            series["stop"] = "a shorter sequence (N = %d) already ran out of memory" % n
            row.update(status="skipped", reason="out of memory (%s): %s" % (stage, str(e).splitlines()[0][:300]))
        else:
            row.update(status="failed", reason="error (%s): %s: %s" % (stage, type(e).__name__,
                                                                      str(e).splitlines()[0][:300]))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def search_max_len(variant, cfg, b, device, dtype, args, lse_ops, skip_reason=None):
    budget = int(args.max_len_budget_gib * GIB)
    granule, cap = args.max_len_granule, args.max_len_cap
    row = {"variant": variant, "status": "measured", "reason": "", "config_label": config_label(variant, cfg),
           "config": dict(cfg), "device": str(device), "dtype": args.dtype_names[dtype], "batch": b,
           "heads": cfg["num_heads"], "head_dim": cfg["head_dim"], "causal": cfg["causal"], "budget_bytes": budget,
           "granule": granule, "cap": cap, "note": ""}
    probes = []
    t0 = time.perf_counter()
    state = {"lo": 0, "hi": 0, "lo_peak": 0, "lo_reserved": 0, "lo_ms": 0.0}

    def probe(n):
        if args.deadline is not None and time.perf_counter() > args.deadline:
            raise TimeoutError("stopped early: the time budget (--time-budget) ran out during the search")
        rec = {"seq_len": n, "fits": False, "out_of_memory": False, "peak_allocated_bytes": 0,
               "peak_reserved_bytes": 0, "ms": 0.0}
        start = time.perf_counter()
        try:
            def run():
                fn = Variant(variant, cfg, n, device, dtype, lse_ops)
                q, k, v, g = make_inputs(b, n, cfg["num_heads"], cfg["head_dim"], device, dtype, args.seed)
                fn(q, k, v).backward(g)
            peak = peak_of(run, device)
            rec.update(peak_allocated_bytes=int(peak[0]), peak_reserved_bytes=int(peak[1]),
                       fits=device.type != "cuda" or peak[0] <= budget)
        except Exception as e:  # noqa: BLE001
            if not is_oom(e):
                raise
            rec["out_of_memory"] = True
        if device.type == "cuda":
            torch.cuda.empty_cache()
        rec["ms"] = (time.perf_counter() - start) * 1000.0
        probes.append(rec)
        if rec["fits"]:
            state.update(lo=n, lo_peak=rec["peak_allocated_bytes"], lo_reserved=rec["peak_reserved_bytes"],
                         lo_ms=rec["ms"])
        else:
            state["hi"] = n
        if args.case_time_limit > 0 and rec["ms"] > 1000.0 * args.case_time_limit:
            raise TimeoutError("stopped early: one forward+backward took %.1f s at N = %d (--case-time-limit)" % (
                rec["ms"] / 1000.0, n))
        return rec

    try:
        if skip_reason:
            raise RuntimeError(skip_reason)
        if device.type != "cuda":
            raise RuntimeError("the max-length search needs CUDA memory statistics")
        probe(min(cap, max(granule, args.seq_lens[0] // granule * granule)))
        while state["lo"] and not state["hi"] and state["lo"] < cap:
            room = math.sqrt(budget / max(1, state["lo_peak"]))
            nxt = min(2 * state["lo"], int(state["lo"] * room)) // granule * granule
            if nxt <= state["lo"]:
                nxt = state["lo"] + granule
            nxt = min(nxt, cap)
            ratio = nxt / state["lo"]
            if args.case_time_limit > 0 and state["lo_ms"] * ratio * ratio > 4000.0 * args.case_time_limit:
                row["note"] = "stopped early: N = %d predicted to take too long" % nxt
                break
            probe(nxt)
        while state["lo"] and state["hi"] and state["hi"] - state["lo"] > granule:
            mid = (state["lo"] + state["hi"]) // 2 // granule * granule
            if mid <= state["lo"] or mid >= state["hi"]:
                break
            probe(mid)
        if not state["lo"]:
            row.update(status="skipped", reason="even N = %d does not fit the budget" % state["hi"])
    except TimeoutError as e:
        row["note"] = str(e)
        if not state["lo"]:
            row.update(status="skipped", reason=str(e))
    except Exception as e:  # noqa: BLE001
        row.update(status="skipped" if device.type != "cuda" or skip_reason else "failed",
                   reason="%s: %s" % (type(e).__name__, str(e).splitlines()[0][:300]))
    row.update(max_seq_len=state["lo"], peak_allocated_bytes=state["lo_peak"], peak_reserved_bytes=state["lo_reserved"],
               reached_cap=state["lo"] >= cap, probes=probes, seconds=time.perf_counter() - t0)
    return row


# ---------------------------------------------------------------------------------------------

def first_line(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip().splitlines()[0]
    except Exception:  # noqa: BLE001
        return ""


def machine_info(device):
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    m = {"os": platform.system() + " " + platform.release(), "arch": platform.machine(), "hostname": socket.gethostname(),
         "cpu": cpu or "unknown", "cpu_threads": os.cpu_count() or 0, "python": platform.python_version(),
         "torch_version": torch.__version__, "gpu": None}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        driver = ""
        try:
            with open("/proc/driver/nvidia/version") as f:
                driver = next((w for w in f.readline().split() if w[:1].isdigit() and "." in w), "")
        except OSError:
            pass
        driver = driver or first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
        m["gpu"] = {"index": device.index or 0, "name": p.name, "compute_capability": "%d.%d" % (p.major, p.minor),
                    "memory_bytes": int(p.total_memory), "multiprocessors": p.multi_processor_count,
                    "driver_version": driver or "unknown", "cuda_runtime_version": str(torch.version.cuda)}
    return m


def int_list(text):
    return [int(x) for x in text.split(",") if x.strip()]


def markdown(doc):
    lines = ["# PyTorch attention benchmark", "", "- created: " + doc["created_utc"],
             "- torch " + doc["machine"]["torch_version"] + ("; GPU " + doc["machine"]["gpu"]["name"]
                                                              if doc["machine"]["gpu"] else "; CPU"),
             "- command: `" + doc["config"]["command_line"] + "`", "",
             "| variant | config | dtype | implementation | precision | B | N | H | D | fwd ms | fwd+bwd ms | "
             "fwd+bwd TFLOP/s | peak MiB (fwd+bwd) | status |",
             "|---|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in doc["results"]:
        head = "| %s | %s | %s | %s | %s | %d | %d | %d | %d | " % (
            r["variant"], r["config_label"], r["dtype"], r["implementation"], r["compute_precision"], r["batch"],
            r["seq_len"], r["heads"], r["head_dim"])
        if r["status"] == "measured":
            lines.append(head + "%.3g | %.3g | %.3g | %.1f | ok |" % (
                r["forward"]["median_ms"], r["forward_backward"]["median_ms"], r["forward_backward"]["tflops"],
                r["forward_backward"]["peak_allocated_bytes"] / 2 ** 20))
        else:
            lines.append(head + "- | - | - | - | %s: %s |" % (r["status"], r["reason"].replace("|", "\\|")))
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + ["- " + n for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch attention benchmark, same grid and JSON schema as longtape bench")
    p.add_argument("--variants", default="dense,dilated")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", "--dtypes", dest="dtypes", default="f32")
    p.add_argument("--seq-lens", default=None)
    p.add_argument("--batch", default="1")
    p.add_argument("--heads", default="8")
    p.add_argument("--head-dim", default="64")
    p.add_argument("--segments", default="512,1024,2048", help="';' separates configurations")
    p.add_argument("--dilations", default="1,2,4")
    p.add_argument("--mixing", default="lse")
    p.add_argument("--causal", default="off", choices=["off", "on", "both"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--case-time-limit", type=float, default=60.0)
    p.add_argument("--max-len-budget-gib", type=float, default=0.0)
    p.add_argument("--max-len-cap", type=int, default=1 << 20)
    p.add_argument("--max-len-granule", type=int, default=256)
    p.add_argument("--max-len-dtype", default="", help="dtypes for the max-length search (default: all)")
    p.add_argument("--time-budget", type=float, default=0.0,
                   help="seconds for the whole run; cases left when it is spent are skipped (0 = no budget)")
    p.add_argument("--no-fast-path", action="store_true", help="use the math reference for lse-mode dilated attention")
    p.add_argument("--out-dir", default="bench-out")
    p.add_argument("--self-test", action="store_true",
                   help="check the lse-merge autograd function (with plain-PyTorch kernels, float64) against the "
                        "reference and exit")
    args = p.parse_args(argv)
    if args.self_test:
        return self_test()

    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", 0)
    dtypes = [DTYPES[name] for name in args.dtypes.split(",") if name]
    args.dtype_names = {DTYPES[name]: name for name in args.dtypes.split(",") if name}
    seq_lens = sorted(set(int_list(args.seq_lens or ("4096,8192,16384,32768,65536" if device.type == "cuda"
                                                        else "1024,2048,4096"))))
    args.seq_lens = seq_lens
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in ("dense", "dilated"):
            p.error("unknown variant %r (this script has dense and dilated)" % v)
    segment_sets = [int_list(s) for s in args.segments.split(";") if s.strip()]
    dilation_sets = [int_list(s) for s in args.dilations.split(";") if s.strip()] or [[1] * len(s) for s in segment_sets]
    if len(dilation_sets) != len(segment_sets) or any(len(a) != len(b) for a, b in zip(segment_sets, dilation_sets)):
        p.error("--dilations must give one rate per segment length, in as many ';'-separated sets as --segments")
    causal_modes = {"off": [False], "on": [True], "both": [False, True]}[args.causal]
    mixings = [m for m in args.mixing.split(",") if m]

    notes = []
    lse_ops = {}
    if "dilated" in variants and "lse" in mixings:
        for dt in dtypes:
            if args.no_fast_path:
                lse_ops[dt], msg = None, "math reference (--no-fast-path)"
            else:
                lse_ops[dt], msg = self_check_lse_ops(device, dt)
            notes.append("dilated lse %s: %s" % (args.dtype_names[dt], msg if lse_ops[dt] else msg + "; using the math reference"))
            print("torch_bench: dilated lse %s: %s" % (args.dtype_names[dt], msg), file=sys.stderr)
    if device.type != "cuda":
        notes.append("CPU: PyTorch has no allocator statistics for host memory; peak memory is reported as 0")

    doc = {"schema_version": 1, "tool": "pytorch", "tool_version": torch.__version__,
           "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": machine_info(device),
           "config": {"command_line": "python3 " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                      "variants": variants, "device": str(device), "dtypes": [args.dtype_names[d] for d in dtypes],
                      "seq_lens": seq_lens, "batches": int_list(args.batch), "heads": int_list(args.heads),
                      "head_dims": int_list(args.head_dim), "segments": args.segments, "dilations": args.dilations,
                      "mixing": args.mixing, "causal": args.causal, "warmup": args.warmup, "repeats": args.repeats,
                      "seed": args.seed, "case_time_limit_s": args.case_time_limit, "time_budget_s": args.time_budget,
                      "max_len_budget_gib": args.max_len_budget_gib, "max_len_cap": args.max_len_cap,
                      "max_len_granule": args.max_len_granule,
                      "timing": ("CUDA events" if device.type == "cuda" else "perf_counter") + ", median of the timed runs",
                      "flops": "forward 4 * attended_pairs * head_dim; forward_backward 3.5x forward (backward 2.5x)",
                      "forward_mode": "forward timed under no_grad; forward_backward back-propagates"},
           "results": [], "max_seq_len": [], "notes": notes}
    t0 = time.perf_counter()
    args.deadline = t0 + args.time_budget if args.time_budget > 0 else None
    out_of_time = "time budget exhausted (--time-budget %g s) before this case" % args.time_budget
    over_budget = lambda: args.time_budget > 0 and time.perf_counter() - t0 > args.time_budget
    # Every series over the sequence lengths; lengths outermost so a time budget cuts the longest
    # sequences of every variant rather than whole variants (as longtape bench does).
    all_series = []
    for variant in variants:
        configs, seen = [], set()
        for segs, dils in zip(segment_sets, dilation_sets):
            for mixing in mixings:
                for causal in causal_modes:
                    cfg = {"segment_lengths": segs, "dilation_rates": dils, "mixing": mixing, "causal": causal}
                    key = config_label(variant, dict(cfg, num_heads=1))
                    if key not in seen:
                        seen.add(key)
                        configs.append(cfg)
        for base in configs:
            for dt in dtypes:
                for b in int_list(args.batch):
                    for h in int_list(args.heads):
                        for d in int_list(args.head_dim):
                            cfg = dict(base, num_heads=h, head_dim=d, softmax_scale=1.0 / math.sqrt(d), dropout=0.0)
                            all_series.append({"variant": variant, "cfg": cfg, "dtype": dt, "batch": b, "state": {},
                                               "rows": []})
    for n in seq_lens:
        for se in all_series:
            if over_budget():
                se["state"]["stop"] = out_of_time
            row = run_case(se["variant"], se["cfg"], se["batch"], n, device, se["dtype"], args,
                           lse_ops.get(se["dtype"]), se["state"])
            print("torch_bench: %s [%s] %s B=%d N=%d H=%d D=%d -> %s %s" % (
                se["variant"], row["config_label"], args.dtype_names[se["dtype"]], se["batch"], n, row["heads"],
                row["head_dim"], row["status"],
                ("fwd+bwd %.3f ms" % row["forward_backward"]["median_ms"]) if row["status"] == "measured"
                else row["reason"]), file=sys.stderr)
            se["rows"].append(row)
    for se in all_series:
        doc["results"].extend(se["rows"])
    if args.max_len_budget_gib > 0:
        search_dtypes = [x for x in args.max_len_dtype.split(",") if x] if args.max_len_dtype else None
        done = set()
        for se in all_series:
            key = (se["variant"], config_label(se["variant"], se["cfg"]), se["dtype"])
            if key in done or (search_dtypes and args.dtype_names[se["dtype"]] not in search_dtypes):
                continue
            done.add(key)
            h, d = int_list(args.heads)[0], int_list(args.head_dim)[0]
            cfg = dict(se["cfg"], num_heads=h, head_dim=d, softmax_scale=1.0 / math.sqrt(d))
            row = search_max_len(se["variant"], cfg, int_list(args.batch)[0], device, se["dtype"], args,
                                 lse_ops.get(se["dtype"]), out_of_time if over_budget() else None)
            print("torch_bench: max length of %s [%s] %s -> %d (%s)" % (
                se["variant"], row["config_label"], args.dtype_names[se["dtype"]], row["max_seq_len"], row["status"]),
                file=sys.stderr)
            doc["max_seq_len"].append(row)
    doc["total_seconds"] = time.perf_counter() - t0
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "torch_bench.json"), "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    with open(os.path.join(args.out_dir, "torch_bench.md"), "w") as f:
        f.write(markdown(doc))
    print(markdown(doc))
    print("wrote %s" % os.path.join(args.out_dir, "torch_bench.json"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
