#!/usr/bin/env python3
"""PyTorch side of the training benchmark: the model `longtape train` builds, trained step by step.

    python3 benchmarks/torch_train_bench.py --device cuda --seq-lens 8192,32768 \
        --modes f32,tf32,bf16,bf16-compile --steps 20 --warmup 5 --out-dir DIR

The model (models/language_model.cpp, nn/layers.cpp, attention/multihead.cpp), defaults in brackets:
  token embedding (vocab [256], width E [384]) + learned positional table (seq_len, E) initialised with
  the sinusoidal encoding scaled to RMS 0.02 (or N(0, 0.02^2) with --position-init normal); dropout;
  L [6] pre-LN blocks  x = x + drop(attn(ln1(x))); x = x + drop(mlp(ln2(x)))  with
    attn: q, k, v = x W + b (W stored (in, out), xavier-normal, gain 1 for q and k, gamma = 1 for v
          and out; biases 0) -> (B, N, H [6], D = E / H) -> causal attention -> (B, N, E) ->
          sub-LayerNorm (MAGNETO) -> x W_out + b_out;
    mlp:  Linear(E, 4E) - GELU (erf) - Linear(4E, E), PyTorch's Linear layout and uniform init;
  final LayerNorm (eps 1e-5 everywhere) and logits = x tok_emb^T (tied; --untied: a head (V, E)).
  Attention is benchmarks/torch_bench.py's (imported, not copied): dilated [segments 2048,4096,8192,
  dilations 1,2,4, mixing head_groups]: head group g attends within segments of length w_g over the
  rows of dilation r_g at offset g mod r_g, causal inside each stream, output / G (docs/attention.md);
  gather -> scaled_dot_product_attention -> scatter. lse mixing and --variant dense work too.

Parameter count of longtape's model (LanguageModel::num_parameters, each tensor once; tied head):
  V E + N E                        token and positional tables (N = seq_len = max_seq_len)
  + L (12 E^2 + 15 E)              per block: 4 E^2 + 4 E projections, 2 E sub-LayerNorm,
                                   8 E^2 + 5 E MLP, 4 E for ln1 and ln2
  + 2 E                            ln_f            (+ V E with --untied)
  Defaults: 10,750,464 + 384 N = 13,896,192 at N = 8192 and 23,333,376 at N = 32768.
  `longtape train --metrics run.json` reports the same number (model.parameters), and the tensors
  here have the names and shapes of a `longtape train --checkpoint` file (4 + 18 L of them, tied).
  Every row checks the PyTorch model's count against this formula and fails the row if they differ.

One training step, as nn/trainer.cpp: logits -> cross-entropy over the next-token targets (ignore
index -100) -> zero_grad -> backward -> clip the global gradient norm [1.0] -> learning rate of the
cosine schedule (linear warm-up over --lr-warmup [100, longtape's --warmup] steps, then cosine to
--min-lr [lr / 10] at the last step) -> AdamW [lr 1e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.01
on tensors of 2 or more dims only; fused on CUDA]. Data: the recall task of nn/data.cpp (or --text:
byte windows of a file), batch i of the run = batch i of longtape with the same --seed (the same
SplitMix64 stream; the weight initialisation uses PyTorch's generator, so losses match only in
distribution). Without --filler the recall task takes filler = vocab - keys - values - 1, so the
vocabulary is --vocab: `longtape train --keys 16 --values 8 --filler 231` builds the same model.

Modes: f32 (TF32 off), tf32 (matmuls on TF32 tensor cores), bf16 (torch.autocast bf16: matmuls and
attention in bf16 with f32 accumulation; LayerNorm, loss, the f32 master weights and AdamW in f32),
and any of them with -compile (torch.compile of the model, the loss and optimizer outside).
Timing per (N, mode): --warmup untimed steps (the first one compiles), then --steps steps, each
between two CUDA events (whole step: forward, loss, backward, clip, optimizer); median reported
(min, max, mean too). Batches are on the device before timing. Peak memory: max_memory_allocated
over the timed steps after resetting the peak (parameters, gradients, AdamW state included; not
measured on the CPU). A row that runs out of memory or fails to compile is reported with its status.
Writes DIR/torch_train_bench.json and DIR/torch_train_bench.md.
"""
import argparse
import datetime
import gc
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import torch_bench  # noqa: E402
from torch_precision import compute_precision  # noqa: E402

IGNORE_INDEX = -100
U64 = (1 << 64) - 1


# ---------------------------------------------------------------------------------------------
# Data, batch for batch as nn/data.cpp

class DataRng:
    """SplitMix64, as nn::DataRng."""

    def __init__(self, seed):
        self.state = seed & U64

    def next(self):
        self.state = (self.state + 0x9E3779B97F4A7C15) & U64
        z = self.state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
        return z ^ (z >> 31)

    def below(self, n):
        limit = U64 - U64 % n
        while True:
            x = self.next()
            if x < limit:
                return x % n

    @staticmethod
    def mix(a, b, c=0):
        h = DataRng(a).next()
        h = DataRng(h ^ ((b * 0xD6E8FEB86659FD93) & U64)).next()
        return DataRng(h ^ ((c * 0xA0761D6478BD642F) & U64)).next()


TRAIN_STREAM = 0x7472616


def recall_batch(seq_len, keys, values, filler, pairs, queries, seed, batch, index):
    """RecallTask::batch(batch, index, Split::train): (inputs, targets) as lists of rows."""
    t_len, k_len, q_len = seq_len, pairs, queries
    context = t_len - 1 - 2 * q_len
    value_base, filler_base, query_token = keys, keys + values, keys + values + filler
    rng = DataRng(DataRng.mix(seed, TRAIN_STREAM, index))
    inputs, targets = [], []
    for _ in range(batch):
        inp = [filler_base + rng.below(filler or 1) for _ in range(context)] + [0] * (t_len - context)
        tgt = [IGNORE_INDEX] * t_len
        key_ids = list(range(keys))
        for k in range(k_len):
            j = k + rng.below(keys - k)
            key_ids[k], key_ids[j] = key_ids[j], key_ids[k]
        slots = list(range(context - k_len))
        for k in range(k_len):
            j = k + rng.below(context - k_len - k)
            slots[k], slots[j] = slots[j], slots[k]
        starts = sorted(slots[:k_len])
        planted = []
        for k in range(k_len):
            start = starts[k] + k
            planted.append(rng.below(values))
            inp[start], inp[start + 1] = key_ids[k], value_base + planted[k]
        order = list(range(k_len))
        for q in range(q_len):
            j = q + rng.below(k_len - q)
            order[q], order[j] = order[j], order[q]
        t = context
        inp[t] = query_token
        t += 1
        for q in range(q_len):
            k = order[q]
            inp[t], tgt[t], inp[t + 1] = key_ids[k], value_base + planted[k], value_base + planted[k]
            t += 2
        inputs.append(inp)
        targets.append(tgt)
    return inputs, targets


def text_batch(data, seq_len, seed, batch, index):
    """CharTextDataset::batch(batch, index, Split::train) with the default 10% held out."""
    holdout = int(len(data) * 0.1)
    train_end = len(data) - holdout
    if holdout and holdout < seq_len + 1:
        train_end = len(data)
    rng = DataRng(DataRng.mix(seed, TRAIN_STREAM, index))
    inputs, targets = [], []
    for _ in range(batch):
        start = rng.below(train_end - seq_len)
        inputs.append(list(data[start:start + seq_len]))
        targets.append(list(data[start + 1:start + seq_len + 1]))
    return inputs, targets


# ---------------------------------------------------------------------------------------------
# The model, parameter for parameter as longtape's (names too)

def longtape_parameter_count(vocab, seq_len, width, layers, tied=True):
    e = width
    return vocab * e + seq_len * e + layers * (12 * e * e + 15 * e) + 2 * e + (0 if tied else vocab * e)


def sinusoidal_table(n, e, init_std):
    position = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(e)
    freq = torch.pow(10000.0, -(i - i % 2).to(torch.float64) / e)
    angle = position * freq
    table = torch.where(i % 2 == 0, torch.sin(angle), torch.cos(angle))
    return (math.sqrt(2.0) * init_std * table).float()


class MultiheadAttention(nn.Module):
    """attention/multihead.cpp with separate (or --fused-qkv) projections and the sub-LayerNorm."""

    def __init__(self, e, heads, core, fused_qkv=False, gamma=1.0):
        super().__init__()
        self.e, self.heads, self.core, self.fused_qkv = e, heads, core, fused_qkv

        def xavier(gain):
            return nn.Parameter(torch.randn(e, e, dtype=torch.float64).mul(gain * math.sqrt(2.0 / (2 * e))).float())

        if fused_qkv:
            self.qkv_weight = nn.Parameter(torch.cat([xavier(1.0), xavier(1.0), xavier(gamma)], 1).detach())
            self.qkv_bias = nn.Parameter(torch.zeros(3 * e))
        else:
            self.q_weight, self.k_weight, self.v_weight = xavier(1.0), xavier(1.0), xavier(gamma)
            self.q_bias, self.k_bias, self.v_bias = (nn.Parameter(torch.zeros(e)) for _ in range(3))
        self.norm_weight, self.norm_bias = nn.Parameter(torch.ones(e)), nn.Parameter(torch.zeros(e))
        self.out_weight, self.out_bias = xavier(gamma), nn.Parameter(torch.zeros(e))

    def forward(self, x):
        b, n, _ = x.shape
        if self.fused_qkv:  # x W with W stored (in, out): linear with the transposed view, no copy
            q, k, v = F.linear(x, self.qkv_weight.t(), self.qkv_bias).split(self.e, dim=2)
        else:
            q, k, v = (F.linear(x, w.t(), bias) for w, bias in ((self.q_weight, self.q_bias),
                                                               (self.k_weight, self.k_bias),
                                                               (self.v_weight, self.v_bias)))
        q, k, v = (t.reshape(b, n, self.heads, self.e // self.heads) for t in (q, k, v))
        o = self.core(q, k, v).reshape(b, n, self.e)
        o = F.layer_norm(o, (self.e,), self.norm_weight, self.norm_bias, 1e-5)
        return F.linear(o, self.out_weight.t(), self.out_bias)


class Linear(nn.Linear):
    """nn::Linear: weight and bias uniform in +-1/sqrt(in)."""

    def reset_parameters(self):
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)


class MLP(nn.Module):
    def __init__(self, e, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = Linear(e, hidden), nn.GELU(), Linear(hidden, e)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TransformerBlock(nn.Module):
    def __init__(self, e, attn, dropout):
        super().__init__()
        self.ln1, self.attn, self.ln2 = nn.LayerNorm(e), attn, nn.LayerNorm(e)
        self.mlp, self.drop = MLP(e, 4 * e), nn.Dropout(dropout)

    def forward(self, x):
        h = x + self.drop(self.attn(self.ln1(x)))
        return h + self.drop(self.mlp(self.ln2(h)))


class LanguageModel(nn.Module):
    def __init__(self, vocab, seq_len, e, layers, heads, core, tied=True, dropout=0.0, position_init="sinusoidal",
                 fused_qkv=False, init_std=0.02):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, e)
        self.pos_emb = nn.Embedding(seq_len, e)
        with torch.no_grad():
            self.tok_emb.weight.normal_(0.0, init_std)
            if position_init == "sinusoidal":
                self.pos_emb.weight.copy_(sinusoidal_table(seq_len, e, init_std))
            else:
                self.pos_emb.weight.normal_(0.0, init_std)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(
            TransformerBlock(e, MultiheadAttention(e, heads, core, fused_qkv), dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(e)
        self.head = None
        if not tied:
            self.head = nn.Linear(e, vocab, bias=False)
            with torch.no_grad():
                self.head.weight.normal_(0.0, init_std)

    def forward(self, tokens):
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.drop(self.tok_emb(tokens) + self.pos_emb(positions))
        for block in self.blocks:
            x = block(x)
        x = self.ln_f(x)
        return F.linear(x, self.tok_emb.weight if self.head is None else self.head.weight)


def lr_at(step, lr, min_lr, warmup, total):
    """nn::CosineSchedule::lr_at."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def make_adamw(model, args, device):
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kind = "fused" if device.type == "cuda" else "foreach"
    try:
        opt = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, **{kind: True})
    except (TypeError, RuntimeError):
        kind, opt = "default", torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), eps=1e-8)
    return opt, kind


# ---------------------------------------------------------------------------------------------
# Modes and rows

def parse_mode(name):
    base, _, suffix = name.partition("-")
    if base not in ("f32", "tf32", "bf16") or suffix not in ("", "compile"):
        raise ValueError("unknown mode %r (expected f32, tf32 or bf16, optionally with -compile)" % name)
    return {"tf32": base == "tf32", "autocast": base == "bf16", "compile": suffix == "compile",
            "attention_dtype": "bf16" if base == "bf16" else "f32"}


def precision_text(mode, device, kernel):
    cuda = device.type == "cuda"
    attention = compute_precision(torch, device, mode["attention_dtype"], kernel)
    if mode["autocast"]:
        return ("autocast bf16: matmuls %s; attention %s; LayerNorm, loss, master weights, AdamW f32"
                % ("bf16 tensor cores, f32 accumulation" if cuda else "bf16 inputs, f32 accumulation", attention))
    if mode["tf32"]:
        matmuls = "tf32 tensor cores, f32 accumulation" if cuda else "f32 (no TF32 on the CPU)"
        return "matmuls %s; attention %s; the rest f32" % (matmuls, attention)
    return "f32 (TF32 off); attention %s" % attention


def set_tf32(on):
    torch.set_float32_matmul_precision("high" if on else "highest")  # high: TF32 matmuls
    torch.backends.cudnn.allow_tf32 = on


def make_batches(args, n, count):
    out = []
    for i in range(count):
        if args.text_bytes is not None:
            inputs, targets = text_batch(args.text_bytes, n, args.seed, args.batch, i)
        else:
            inputs, targets = recall_batch(n, args.keys, args.values, args.filler, args.pairs, args.queries, args.seed,
                                           args.batch, i)
        out.append((torch.tensor(inputs, dtype=torch.int64), torch.tensor(targets, dtype=torch.int64)))
    return out


def run_row(n, mode_name, args, device, host_batches, lse_ops):
    mode = parse_mode(mode_name)
    row = {"seq_len": n, "mode": mode_name, "batch": args.batch, "status": "measured", "reason": "",
           "precision": "none", "attention": "none", "optimizer": "none"}
    stage = "build"
    start_wall = time.perf_counter()
    try:
        set_tf32(mode["tf32"])
        torch.manual_seed(args.seed)
        cfg = {"num_heads": args.heads, "head_dim": args.width // args.heads, "segment_lengths": args.segment_list,
               "dilation_rates": args.dilation_list, "mixing": args.mixing, "causal": True}
        att_dtype = torch_bench.DTYPES[mode["attention_dtype"]]
        # One attention core (its index tensors) serves every layer: it holds no parameters.
        core = torch_bench.Variant(args.variant, cfg, n, device, att_dtype, lse_ops.get(att_dtype))
        model = LanguageModel(args.vocab, n, args.width, args.layers, args.heads, core, not args.untied,
                              args.dropout, args.position_init, args.fused_qkv).to(device)
        row["attention"] = core.implementation
        row["precision"] = precision_text(mode, device, core.kernel)
        row["parameters"] = sum(p.numel() for p in model.parameters())
        row["longtape_parameters"] = longtape_parameter_count(args.vocab, n, args.width, args.layers, not args.untied)
        if row["parameters"] != row["longtape_parameters"]:
            raise RuntimeError("parameter count %d differs from longtape's %d" % (row["parameters"],
                                                                                   row["longtape_parameters"]))
        opt, row["optimizer"] = make_adamw(model, args, device)
        params = list(model.parameters())
        forward = torch.compile(model, mode=args.compile_mode) if mode["compile"] else model
        batches = [(x.to(device), y.to(device)) for x, y in host_batches]
        total = len(batches)
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if mode["autocast"] else None

        def step(i):
            tokens, targets = batches[i]
            for group in opt.param_groups:
                group["lr"] = lr_at(i, args.lr, args.min_lr, args.lr_warmup, total)
            if autocast:
                with autocast():
                    logits = forward(tokens)
            else:
                logits = forward(tokens)
            loss = F.cross_entropy(logits.float().reshape(-1, args.vocab), targets.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            norm = (torch.nn.utils.clip_grad_norm_(params, args.clip) if args.clip > 0
                    else torch.nn.utils.clip_grad_norm_(params, float("inf")))
            opt.step()
            return loss.detach(), norm.detach()

        stage = "compile + first step" if mode["compile"] else "first step"
        t0 = time.perf_counter()
        step(0)
        torch_bench.synchronize(device)
        row["first_step_s"] = time.perf_counter() - t0
        stage = "warm-up"
        for i in range(1, args.warmup):
            step(i)
        torch_bench.synchronize(device)
        stage = "timed steps"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        losses, norms, ms = [], [], []
        for i in range(args.warmup, total):
            if device.type == "cuda":
                events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                events[0].record()
                loss, norm = step(i)
                events[1].record()
                ms.append(events)
            else:
                t = time.perf_counter()
                loss, norm = step(i)
                ms.append((time.perf_counter() - t) * 1000.0)
            losses.append(loss)
            norms.append(norm)
        torch_bench.synchronize(device)
        if device.type == "cuda":
            ms = [a.elapsed_time(b) for a, b in ms]
            row["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
            row["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        else:
            row["peak_allocated_bytes"] = row["peak_reserved_bytes"] = 0
        losses = [float(x) for x in losses]
        median = statistics.median(ms)
        row["step_ms"] = {"median": median, "min": min(ms), "max": max(ms), "mean": statistics.fmean(ms),
                          "stdev": statistics.stdev(ms) if len(ms) > 1 else 0.0, "runs": len(ms)}
        row["tokens_per_s"] = args.batch * n / (median / 1000.0)
        row["loss_first_timed"], row["loss_last"] = losses[0], losses[-1]
        row["losses"] = losses
        row["grad_norm_last"] = float(norms[-1])
        if not all(math.isfinite(x) for x in losses):
            row.update(status="failed", reason="the loss became non-finite (try a lower --lr)")
    except Exception as e:  # noqa: BLE001 - one failing row never stops the run
        message = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
        if torch_bench.is_oom(e):
            row.update(status="skipped", reason="out of memory (%s): %s" % (stage, message))
        else:
            row.update(status="failed", reason="error (%s): %s: %s" % (stage, type(e).__name__, message))
    row["wall_s"] = time.perf_counter() - start_wall
    return row


def cleanup(device):
    gc.collect()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------

def markdown(doc):
    m, c = doc["machine"], doc["config"]
    lines = ["# PyTorch training benchmark", "", "- created: " + doc["created_utc"],
             "- torch " + m["torch_version"] + ("; GPU " + m["gpu"]["name"] if m["gpu"] else "; CPU " + m["cpu"]),
             "- command: `" + c["command_line"] + "`",
             "- model: vocab %d, width %d, %d heads, %d layers, %s attention [%s], batch %d; AdamW lr %g, weight "
             "decay %g, clip %g; %d warm-up + %d timed steps" % (
                 c["vocab"], c["width"], c["heads"], c["layers"], c["variant"], c["attention_label"], c["batch"],
                 c["lr"], c["weight_decay"], c["clip"], c["warmup"], c["steps"]), "",
             "| N | mode | precision | attention | parameters | step ms (median) | tokens/s | peak MiB | "
             "loss (first timed -> last) | status |",
             "|--:|---|---|---|--:|--:|--:|--:|---|---|"]
    for r in doc["results"]:
        head = "| %d | %s | %s | %s | %s | " % (r["seq_len"], r["mode"], r["precision"], r["attention"],
                                              "{:,}".format(r["parameters"]) if "parameters" in r else "-")
        if "step_ms" in r:
            lines.append(head + "%.2f | %.0f | %.0f | %.4f -> %.4f | %s |" % (
                r["step_ms"]["median"], r["tokens_per_s"], r["peak_allocated_bytes"] / 2 ** 20, r["loss_first_timed"],
                r["loss_last"], "ok" if r["status"] == "measured" else r["status"] + ": " + r["reason"]))
        else:
            lines.append(head + "- | - | - | - | %s: %s |" % (r["status"], r["reason"].replace("|", "\\|")))
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + ["- " + n for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description="PyTorch training benchmark of longtape train's model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seq-lens", default="8192,32768", help="comma-separated sequence lengths")
    p.add_argument("--modes", default="f32,tf32,bf16,bf16-compile")
    p.add_argument("--steps", type=int, default=20, help="timed steps per row")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before them (the learning-rate warm-up is "
                                                         "--lr-warmup)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--vocab", type=int, default=256)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--variant", default="dilated", choices=["dilated", "dense"])
    p.add_argument("--segments", default="2048,4096,8192")
    p.add_argument("--dilations", default="1,2,4")
    p.add_argument("--mixing", default="head_groups", choices=["head_groups", "lse"])
    p.add_argument("--fused-qkv", action="store_true", help="one (E, 3E) projection (longtape train uses three)")
    p.add_argument("--untied", action="store_true")
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--position-init", default="sinusoidal", choices=["sinusoidal", "normal"])
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--min-lr", type=float, default=-1.0, help="default lr / 10")
    p.add_argument("--lr-warmup", type=int, default=100, help="linear learning-rate warm-up steps (longtape --warmup)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--keys", type=int, default=16)
    p.add_argument("--values", type=int, default=8)
    p.add_argument("--filler", type=int, default=None, help="default: vocab - keys - values - 1")
    p.add_argument("--pairs", type=int, default=4)
    p.add_argument("--queries", type=int, default=4)
    p.add_argument("--text", default="", help="byte windows of this file instead of the recall task (vocab 256)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-mode", default="default")
    p.add_argument("--out-dir", default="bench-out")
    args = p.parse_args(argv)

    try:
        seq_lens = torch_bench.int_list(args.seq_lens)
        args.segment_list, args.dilation_list = torch_bench.int_list(args.segments), torch_bench.int_list(args.dilations)
    except ValueError as e:
        p.error("--seq-lens, --segments and --dilations take comma-separated integers (%s)" % e)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        try:
            parse_mode(m)
        except ValueError as e:
            p.error(str(e))
    if not seq_lens or min(seq_lens) < 1:
        p.error("--seq-lens needs positive lengths, got %r" % args.seq_lens)
    if args.steps < 1 or args.warmup < 1 or args.batch < 1 or args.layers < 1:
        p.error("--steps, --warmup, --batch and --layers must be >= 1")
    if args.width < 1 or args.heads < 1 or args.width % args.heads:
        p.error("--width must be a positive multiple of --heads, got %d and %d" % (args.width, args.heads))
    if args.variant == "dilated":
        if not args.segment_list or len(args.segment_list) != len(args.dilation_list) or \
                min(args.segment_list + args.dilation_list) < 1:
            p.error("--dilations must give one positive rate per positive segment length, got %r and %r"
                    % (args.segments, args.dilations))
        if args.mixing == "head_groups" and args.heads < len(args.segment_list):
            p.error("head_groups mixing needs --heads >= the number of branches (%d), got %d"
                    % (len(args.segment_list), args.heads))
    if args.min_lr < 0:
        args.min_lr = args.lr / 10
    if not 0 <= args.dropout < 1:
        p.error("--dropout must be in [0, 1), got %g" % args.dropout)
    args.text_bytes = None
    if args.text:
        if args.vocab != 256:
            p.error("--text trains on bytes: the vocabulary is 256, got --vocab %d" % args.vocab)
        with open(args.text, "rb") as f:
            args.text_bytes = f.read()
        train_end = len(args.text_bytes) - int(len(args.text_bytes) * 0.1)
        if train_end < max(seq_lens) + 1:
            p.error("%s: %d bytes is too short for windows of %d bytes in its training part"
                    % (args.text, len(args.text_bytes), max(seq_lens) + 1))
    else:
        if args.filler is None:
            args.filler = args.vocab - args.keys - args.values - 1
        if args.keys + args.values + args.filler + 1 != args.vocab:
            p.error("the recall task's vocabulary keys + values + filler + 1 = %d differs from --vocab %d"
                    % (args.keys + args.values + args.filler + 1, args.vocab))
        if args.keys < 1 or args.values < 1 or args.filler < 1 or not 1 <= args.queries <= args.pairs <= args.keys:
            p.error("the recall task needs keys, values, filler >= 1 and 1 <= queries <= pairs <= keys")
        if min(seq_lens) < 2 * args.pairs + 1 + 2 * args.queries:
            p.error("--seq-lens: %d is too short for %d pairs and %d queries" % (min(seq_lens), args.pairs,
                                                                                 args.queries))
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            p.error("--device %s was asked for, but this PyTorch sees no CUDA device" % args.device)
        if device.index is None:
            device = torch.device("cuda", 0)

    notes = []
    lse_ops = {}
    if args.variant == "dilated" and args.mixing == "lse":
        for name in sorted({parse_mode(m)["attention_dtype"] for m in modes}):
            dt = torch_bench.DTYPES[name]
            lse_ops[dt], msg = torch_bench.self_check_lse_ops(device, dt)
            notes.append("dilated lse %s: %s" % (name, msg if lse_ops[dt] else msg + "; using the math reference"))
    if device.type != "cuda":
        notes.append("CPU: no allocator statistics for host memory; peak memory is reported as 0")
    data = ("text %s (byte windows, vocab 256)" % args.text if args.text else
            "recall: keys %d, values %d, filler %d, pairs %d, queries %d (vocab %d)" % (
                args.keys, args.values, args.filler, args.pairs, args.queries, args.vocab))
    cfg_label = torch_bench.config_label(args.variant, {"segment_lengths": args.segment_list, "causal": True,
                                                        "dilation_rates": args.dilation_list, "mixing": args.mixing})
    doc = {"schema_version": 1, "tool": "pytorch", "benchmark": "train", "tool_version": torch.__version__,
           "created_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
           "machine": torch_bench.machine_info(device),
           "config": {"command_line": "python3 " + " ".join([os.path.relpath(__file__)] + (argv or sys.argv[1:])),
                      "device": str(device), "seq_lens": seq_lens, "modes": modes, "steps": args.steps,
                      "warmup": args.warmup, "batch": args.batch, "vocab": args.vocab, "width": args.width,
                      "heads": args.heads, "layers": args.layers, "variant": args.variant,
                      "segments": args.segments, "dilations": args.dilations, "mixing": args.mixing,
                      "attention_label": cfg_label, "fused_qkv": args.fused_qkv, "tied": not args.untied,
                      "dropout": args.dropout, "position_init": args.position_init, "lr": args.lr,
                      "min_lr": args.min_lr, "lr_warmup": args.lr_warmup, "weight_decay": args.weight_decay,
                      "clip": args.clip, "seed": args.seed, "data": data, "compile_mode": args.compile_mode,
                      "timing": ("CUDA events" if device.type == "cuda" else "perf_counter") +
                                " around each whole step (forward, loss, backward, clip, AdamW), median"},
           "results": [], "notes": notes}
    t0 = time.perf_counter()
    for n in seq_lens:
        host_batches = make_batches(args, n, args.warmup + args.steps)
        for mode in modes:
            row = run_row(n, mode, args, device, host_batches, lse_ops)
            cleanup(device)
            print("torch_train_bench: N=%d %s -> %s %s" % (
                n, mode, row["status"], ("%.2f ms/step, %.0f tokens/s, %d parameters (longtape %d), loss %.4f"
                                         % (row["step_ms"]["median"], row["tokens_per_s"], row["parameters"],
                                            row["longtape_parameters"], row["loss_last"]))
                if "step_ms" in row else row["reason"]), file=sys.stderr)
            doc["results"].append(row)
    doc["total_seconds"] = time.perf_counter() - t0
    os.makedirs(args.out_dir, exist_ok=True)
    write_atomic(os.path.join(args.out_dir, "torch_train_bench.json"), json.dumps(doc, indent=2) + "\n")
    write_atomic(os.path.join(args.out_dir, "torch_train_bench.md"), markdown(doc))
    print(markdown(doc))
    print("wrote %s" % os.path.join(args.out_dir, "torch_train_bench.json"))
    # Rows that ran out of memory or failed are results; a model unlike longtape's is a defect.
    return 1 if any(r["reason"].startswith("error (build): RuntimeError: parameter count") for r in doc["results"]) else 0


if __name__ == "__main__":
    sys.exit(main())
