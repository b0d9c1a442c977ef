#!/usr/bin/env python3
"""Hostile-input campaign against the `longtape` command line (standard library only).

Generates malformed .npy inputs (fed to `longtape attention`), malformed safetensors files and
damaged checkpoints (fed to `longtape train --resume`), and runs every numeric flag of every
subcommand at 0, -1, 2^31, 2^62, INT64_MAX, NaN, '' and garbage. Every run is classified as:

  accepted        exit 0
  clean error     exit 1 or 2 with a message on stderr
  crash           killed by a signal or any other exit status
  sanitizer       an AddressSanitizer / LeakSanitizer / UndefinedBehaviorSanitizer report
  hang            still running at the per-run time limit (killed)
  memory blow-up  killed or aborted for memory: over ASan's RSS limit (hard_rss_limit_mb) in a
                  sanitizer build (ulimit -v does not mix with ASan's shadow memory), else
                  over ulimit -v. A run that asked for more than the limit and reported it as a
                  clean "out of host memory" error (allocation returned null) is a clean error,
                  counted apart as "oom refused".
and, orthogonally, failed runs that left output files behind ("partial outputs").

Meant for the sanitizer build (scripts/sanitize.sh builds build-asan/bin/longtape):
    python3 scripts/hostile_inputs.py --bin build-asan/bin/longtape
Exits 1 when any run crashed, hung, blew up memory, produced a sanitizer report or left partial
output; reproducers (input files and command lines) are kept under --work/findings/.
"""
import argparse
import concurrent.futures
import json
import os
import random
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time

HOSTILE_VALUES = ["0", "-1", str(2**31), str(2**62), str(2**63 - 1), "nan", "", "12abc"]
# TEXT flags that carry integers (comma-separated lists, grids): hostile values go there too.
NUMERIC_TEXT_FLAGS = {"--segments", "--dilations", "--seq-lens", "--batch", "--heads", "--head-dim",
                      "--quality-segments", "--quality-dilations", "--grid"}

B, N, H, D = 1, 16, 2, 4  # attention inputs (B, N, H, D)
TRAIN_ARGS = ["train", "--device", "cpu", "--steps", "2", "--batch", "2", "--seq-len", "16", "--layers", "1",
              "--width", "8", "--heads", "2", "--segments", "8,16", "--dilations", "1,2", "--keys", "4",
              "--values", "4", "--filler", "4", "--pairs", "2", "--queries", "2", "--eval-every", "0",
              "--eval-batches", "1", "--warmup", "1", "--threads", "1"]
BASE_ARGS = {
    "attention": ["attention", "--variant", "dilated", "--segments", "8,16", "--dilations", "1,2",
                  "--q", "in/q.npy", "--k", "in/k.npy", "--v", "in/v.npy", "--dout", "in/dout.npy",
                  "--out-dir", "out"],
    "bench": ["bench", "--seq-lens", "16", "--batch", "1", "--heads", "2", "--head-dim", "4",
              "--warmup", "0", "--repeats", "1", "--no-plots", "--out-dir", "out", "--variants", "dense,dilated",
              "--segments", "8,16", "--dilations", "1,2"],
    "patterns": ["patterns", "--variants", "dense,dilated", "--n", "16", "--heads", "1", "--segments", "8,16",
                 "--dilations", "1,2", "--out-dir", "out"],
    "train": TRAIN_ARGS + ["--checkpoint", "out/ck.safetensors", "--metrics", "out/metrics.csv"],
}
# Flags that only do something with another variant or option: the run sets those too.
FLAG_CONTEXT = {
    ("attention", "--block-size"): ["--variant", "block_sparse"],
    ("attention", "--window"): ["--variant", "block_sparse"],
    ("attention", "--global-blocks"): ["--variant", "block_sparse", "--pattern", "global_local"],
    ("attention", "--density"): ["--variant", "block_sparse", "--pattern", "random"],
    ("attention", "--pattern-seed"): ["--variant", "block_sparse", "--pattern", "random"],
    ("attention", "--ranks"): ["--parallel", "head"],
    ("attention", "--grid"): ["--order", "hilbert"],
    ("bench", "--quality-steps"): ["--quality", "--quality-seq-len", "16", "--quality-batch", "1"],
    ("bench", "--quality-seq-len"): ["--quality", "--quality-steps", "1", "--quality-batch", "1"],
    ("bench", "--quality-batch"): ["--quality", "--quality-steps", "1", "--quality-seq-len", "16"],
    ("bench", "--quality-segments"): ["--quality", "--quality-steps", "1", "--quality-seq-len", "16"],
    ("bench", "--quality-dilations"): ["--quality", "--quality-steps", "1", "--quality-seq-len", "16"],
    ("bench", "--max-len-cap"): ["--max-len-budget-gib", "0.001"],
    ("bench", "--max-len-granule"): ["--max-len-budget-gib", "0.001", "--max-len-cap", "64"],
}

SANITIZER_MARKERS = ("ERROR: AddressSanitizer", "ERROR: LeakSanitizer", "runtime error:",
                     "SUMMARY: UndefinedBehaviorSanitizer", "ERROR: ThreadSanitizer")
MEMORY_MARKERS = ("allocation-size-too-big", "requested allocation size", "rss-limit-exceeded",
                  "RSS limit", "out-of-memory", "allocator is out of memory", "out of host memory",
                  "std::bad_alloc", "bad_alloc", "cannot allocate memory")


# ------------------------------------------------------------------------------------------------
# file formats

def npy_bytes(shape, values=None, descr="<f4", fortran=False, version=1, header_text=None, data=None):
    if header_text is None:
        dims = "".join(f"{d}, " for d in shape).rstrip(" ")
        shape_text = f"({dims})" if len(shape) != 1 else f"({shape[0]},)"
        header_text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    header = header_text.encode("latin-1") if isinstance(header_text, str) else header_text
    prefix = 10 if version == 1 else 12
    header += b" " * (64 - (prefix + len(header) + 1) % 64) + b"\n"
    length = struct.pack("<H", len(header) & 0xFFFF) if version == 1 else struct.pack("<I", len(header))
    if data is None:
        data = struct.pack(f"<{len(values)}f", *values) if values is not None else b""
    return b"\x93NUMPY" + bytes([version, 0]) + length + header + data


def st_load(blob):
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    data = blob[8 + n:]
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        b, e = info["data_offsets"]
        tensors[name] = (info["dtype"], list(info["shape"]), data[b:e])
    return header.get("__metadata__"), tensors


def st_dump(metadata, tensors, header_override=None):
    header, data, offset = {}, b"", 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(raw)]}
        data += raw
        offset += len(raw)
    if header_override:
        header_override(header)
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + data


def mutate_bytes(blob, rng):
    blob = bytearray(blob)
    edges = [0x00, 0x01, 0x7F, 0x80, 0xFF, ord("-"), ord("9"), ord(","), ord(")"), ord("}"), ord('"')]
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(5)
        if kind == 0 and blob:
            blob[rng.randrange(len(blob))] ^= 1 << rng.randrange(8)
        elif kind == 1 and blob:
            blob[rng.randrange(len(blob))] = rng.choice(edges)
        elif kind == 2:
            del blob[rng.randrange(len(blob) + 1):]
        elif kind == 3 and blob:
            at = rng.randrange(len(blob))
            piece = blob[at:at + rng.randint(1, 64)]
            pos = rng.randrange(len(blob) + 1)
            blob[pos:pos] = piece
        else:
            pos = rng.randrange(len(blob) + 1)
            blob[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    # Header bytes matter most: half of the mutants edit only the first 160 bytes.
    return bytes(blob)


def npy_cases(rng, count):
    """(name, role, bytes): role is which of q, k, v, dout the file replaces."""
    numel = B * N * H * D
    good = [rng.gauss(0, 1) for _ in range(numel)]
    shape = (B, N, H, D)
    structured = [
        ("shape_mismatch", npy_bytes((B, N, H, D + 1), [0.5] * (numel + B * N * H))),
        ("seq_mismatch", npy_bytes((B, N // 2, H, D), good[:numel // 2])),
        ("three_dims", npy_bytes((N, H, D), good)),
        ("five_dims", npy_bytes((1, B, N, H, D), good)),
        ("zero_batch", npy_bytes((0, N, H, D), [])),
        ("zero_seq", npy_bytes((B, 0, H, D), [])),
        ("zero_dim", npy_bytes((B, N, H, 0), [])),
        ("huge_seq_no_data", npy_bytes((B, 2**31, H, D), good)),
        ("dims_2p62", npy_bytes((2**62, 2**62, 1, 1), [])),
        ("dims_int64_max", npy_bytes((2**63 - 1, 1, 1, 1), [])),
        ("dim_negative", npy_bytes((B, -16, H, D), good)),
        ("dim_past_int64", npy_bytes(None, header_text="{'descr': '<f4', 'fortran_order': False, "
                                                       "'shape': (1, 99999999999999999999, 2, 4), }")),
        ("f64", npy_bytes(shape, data=struct.pack(f"<{numel}d", *good), descr="<f8")),
        ("i64", npy_bytes(shape, data=struct.pack(f"<{numel}q", *range(numel)), descr="<i8")),
        ("i32", npy_bytes(shape, data=struct.pack(f"<{numel}i", *range(numel)), descr="<i4")),
        ("big_endian", npy_bytes(shape, good, descr=">f4")),
        ("half", npy_bytes(shape, data=b"\x00" * numel * 2, descr="<f2")),
        ("bool", npy_bytes(shape, data=b"\x01" * numel, descr="|b1")),
        ("fortran", npy_bytes(shape, good, fortran=True)),
        ("version2", npy_bytes(shape, good, version=2)),
        ("version3", npy_bytes(shape, good, version=3)),
        ("nan_values", npy_bytes(shape, [float("nan")] * numel)),
        ("inf_values", npy_bytes(shape, [float("inf") if i % 2 else -float("inf") for i in range(numel)])),
        ("huge_values", npy_bytes(shape, [3.0e38] * numel)),
        ("denormal_values", npy_bytes(shape, [1e-45] * numel)),
        ("structured_dtype", npy_bytes(None, header_text="{'descr': [('a', '<f4')], 'fortran_order': False, "
                                                         "'shape': (1, 16, 2, 4), }", data=b"\x00" * numel * 4)),
        ("header_not_dict", npy_bytes(None, header_text="[1, 2, 3]")),
        ("header_deep", npy_bytes(None, header_text="(" * 5000 + ")" * 5000)),
        ("header_huge_int", npy_bytes(None, header_text="{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                                      "9" * 5000 + ",), }")),
        ("header_unicode", npy_bytes(None, header_text="{'descr': '<f4\u00e9', 'fortran_order': False, "
                                                       "'shape': (1,), }".encode("utf-8"))),
        ("header_nul", npy_bytes(None, header_text=b"{'descr': '<f4\x00', 'fortran_order': False, 'shape': (1,), }")),
        ("header_dup_key", npy_bytes(None, header_text="{'descr': '<f4', 'descr': '<f8', 'fortran_order': False, "
                                                       "'shape': (), }", data=b"\x00" * 4)),
        ("header_len_past_end", b"\x93NUMPY\x01\x00\xff\xff{'descr': '<f4'"),
        ("header_len_4g", b"\x93NUMPY\x02\x00\xff\xff\xff\xff{'descr'"),
        ("empty", b""),
        ("magic_only", b"\x93NUMPY"),
        ("text_file", b"hello, world\n" * 20),
        ("truncated_data", npy_bytes(shape, good)[:-7]),
        ("trailing_data", npy_bytes(shape, good) + b"\x00" * 9),
        ("one_million_dims", npy_bytes(None, header_text="{'descr': '<f4', 'fortran_order': False, 'shape': (" +
                                       "1, " * 20000 + "), }")),
    ]
    cases = []
    roles = ["q", "k", "v", "dout"]
    for i, (name, blob) in enumerate(structured):
        cases.append((f"npy_{name}", roles[i % 4], blob))
    base = npy_bytes(shape, good)
    while len(cases) < count:
        i = len(cases)
        blob = mutate_bytes(base[:160], rng) + base[160:] if rng.random() < 0.5 else mutate_bytes(base, rng)
        cases.append((f"npy_mutant_{i}", roles[i % 4], blob))
    return cases[:count]


def safetensors_cases(rng, count):
    f4 = struct.pack("<4f", 1, 2, 3, 4)
    structured = [
        ("empty_object", st_dump(None, {})),
        ("metadata_only", st_dump({"format": "x"}, {})),
        ("not_json", struct.pack("<Q", 8) + b"{not js}"),
        ("json_array", struct.pack("<Q", 8) + b"[1,2,3] "),
        ("header_len_huge", struct.pack("<Q", 2**63) + b"{}"),
        ("header_len_2p62", struct.pack("<Q", 2**62) + b"{}" + b" " * 6),
        ("header_len_past_end", struct.pack("<Q", 100) + b"{}"),
        ("short", b"\x01\x00"),
        ("empty", b""),
        ("deep_json", struct.pack("<Q", 40000) + b"[" * 20000 + b"]" * 20000),
        ("offsets_reversed", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                     lambda h: h["a"].__setitem__("data_offsets", [4, 0]))),
        ("offsets_huge", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                 lambda h: h["a"].__setitem__("data_offsets", [0, 2**64 - 1]))),
        ("offsets_negative", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                     lambda h: h["a"].__setitem__("data_offsets", [-4, 0]))),
        ("offsets_float", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                  lambda h: h["a"].__setitem__("data_offsets", [0.0, 4.5]))),
        ("offsets_three", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                  lambda h: h["a"].__setitem__("data_offsets", [0, 4, 8]))),
        ("shape_overflow", st_dump(None, {"a": ("F32", [2**62, 2**62], b"")})),
        ("shape_int64_max", st_dump(None, {"a": ("F32", [2**63 - 1], b"")})),
        ("shape_past_uint64", st_dump(None, {"a": ("F32", [2**64 + 3], b"")})),
        ("shape_negative", st_dump(None, {"a": ("F32", [-1], b"")})),
        ("shape_not_list", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                   lambda h: h["a"].__setitem__("shape", "1"))),
        ("shape_nested", st_dump(None, {"a": ("F32", [1], f4[:4])},
                                 lambda h: h["a"].__setitem__("shape", [[1]]))),
        ("dtype_unknown", st_dump(None, {"a": ("F8_E4M3", [4], f4[:4])})),
        ("dtype_number", st_dump(None, {"a": ("F32", [1], f4[:4])}, lambda h: h["a"].__setitem__("dtype", 4))),
        ("missing_offsets", st_dump(None, {"a": ("F32", [1], f4[:4])}, lambda h: h["a"].pop("data_offsets"))),
        ("extra_field", st_dump(None, {"a": ("F32", [1], f4[:4])}, lambda h: h["a"].__setitem__("x", 1))),
        ("metadata_number", st_dump({"step": 3}, {})),
        ("metadata_nested", st_dump({"step": {"a": "b"}}, {})),
        ("name_empty", st_dump(None, {"": ("F32", [1], f4[:4])})),
        ("name_control_chars", st_dump(None, {"a\x01\n\x1b[31m": ("F32", [1], f4[:4])})),
        ("many_tensors", st_dump(None, {f"t{i}": ("F32", [0], b"") for i in range(20000)})),
        ("huge_string", st_dump({"format": "x" * 200000}, {})),
        ("invalid_utf8", struct.pack("<Q", 8) + b'{"\xff":1}'),
    ]
    cases = [(f"st_{name}", blob) for name, blob in structured]
    base = st_dump({"format": "x"}, {"a": ("F32", [2, 2], f4), "b": ("I64", [1], struct.pack("<q", 5))})
    while len(cases) < count:
        cases.append((f"st_mutant_{len(cases)}", mutate_bytes(base, rng)))
    return cases[:count]


def checkpoint_cases(rng, count, checkpoint):
    metadata, tensors = st_load(checkpoint)
    names = list(tensors)
    weight_names = [n for n in names if not n.startswith("optim.")]
    optim_names = [n for n in names if n.startswith("optim.")]
    cases = []

    def with_metadata(key, value):
        m = dict(metadata)
        if value is None:
            m.pop(key, None)
        else:
            m[key] = value
        return st_dump(m, tensors)

    for key in sorted(metadata):
        for value in [None, "", "-1", "abc", str(2**63), str(2**64), "1e3", " 1", "nan", "0x10", "\u00e9"]:
            cases.append((f"ckpt_meta_{key}_{value!r}", with_metadata(key, value)))
    for name in weight_names + optim_names[:6]:
        dtype, shape, raw = tensors[name]
        t = dict(tensors)
        t.pop(name)
        cases.append((f"ckpt_drop_{name}", st_dump(metadata, t)))
        t = dict(tensors)
        t[name] = (dtype, list(reversed(shape)) if len(shape) > 1 else shape + [1], raw)
        cases.append((f"ckpt_reshape_{name}", st_dump(metadata, t)))
        t = dict(tensors)
        t[name] = (dtype, [s + 1 for s in shape], raw + b"\x00" * (4 * (max(1, sum(shape)) * 8)))
        cases.append((f"ckpt_grow_{name}", st_dump(metadata, t)))
        t = dict(tensors)
        t[name] = ("F64", shape, raw + raw)
        cases.append((f"ckpt_f64_{name}", st_dump(metadata, t)))
        t = dict(tensors)
        t[name] = ("I32", shape, raw)
        cases.append((f"ckpt_i32_{name}", st_dump(metadata, t)))
        t = dict(tensors)
        t[name] = (dtype, shape, struct.pack("<f", float("nan")) * (len(raw) // 4))
        cases.append((f"ckpt_nan_{name}", st_dump(metadata, t)))
    t = dict(tensors)
    t["unexpected.weight"] = ("F32", [2], b"\x00" * 8)
    cases.append(("ckpt_extra_tensor", st_dump(metadata, t)))
    cases.append(("ckpt_no_optimizer", st_dump(metadata, {n: tensors[n] for n in weight_names})))
    cases.append(("ckpt_truncated_half", checkpoint[:len(checkpoint) // 2]))
    cases.append(("ckpt_header_only", checkpoint[:8 + struct.unpack("<Q", checkpoint[:8])[0]]))
    rng.shuffle(cases)
    cases = cases[:count * 2 // 5]
    while len(cases) < count:
        cases.append((f"ckpt_mutant_{len(cases)}", mutate_bytes(checkpoint, rng)))
    return cases[:count]


# ------------------------------------------------------------------------------------------------
# running

def is_sanitized(binary):
    with open(binary, "rb") as f:
        content = f.read()
    return b"__asan_init" in content or b"AddressSanitizer" in content


class Runner:
    def __init__(self, args, work):
        self.binary = os.path.abspath(args.bin)
        self.timeout = args.timeout
        self.mem_mb = args.mem_mb
        self.work = work
        self.sanitized = is_sanitized(self.binary)
        self.env = dict(os.environ, OMP_NUM_THREADS="1")
        if self.sanitized:
            self.env["ASAN_OPTIONS"] = (f"detect_leaks=1:abort_on_error=0:max_allocation_size_mb={self.mem_mb}:"
                                        f"hard_rss_limit_mb={self.mem_mb}:allocator_may_return_null=1")
            self.env["UBSAN_OPTIONS"] = "print_stacktrace=1:halt_on_error=1"

    def limit_memory(self):
        os.setsid()
        if not self.sanitized:
            limit = self.mem_mb * 1024 * 1024
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def run(self, family, name, argv, inputs):
        """Runs `longtape argv` in a fresh folder holding `inputs` ({relative path: bytes})."""
        folder = tempfile.mkdtemp(prefix="run-", dir=self.work)
        for rel, blob in inputs.items():
            path = os.path.join(folder, rel)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(blob)
        os.makedirs(os.path.join(folder, "out"), exist_ok=True)
        start = time.monotonic()
        proc = subprocess.Popen([self.binary] + argv, cwd=folder, env=self.env, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, preexec_fn=self.limit_memory)
        try:
            _, err = proc.communicate(timeout=self.timeout)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            timed_out = True
        seconds = time.monotonic() - start
        stderr = err.decode("utf-8", "replace")
        code = proc.returncode
        left = sorted(os.path.relpath(os.path.join(r, f), folder) for r, _, fs in os.walk(os.path.join(folder, "out"))
                      for f in fs)
        oom = any(m in stderr for m in MEMORY_MARKERS)
        if timed_out:
            outcome = "hang"
        elif any(m in stderr for m in SANITIZER_MARKERS):
            outcome = "memory" if oom else "sanitizer"
        elif code not in (0, 1, 2) and oom:
            outcome = "memory"
        elif code == 0:
            outcome = "accepted"
        elif code in (1, 2) and stderr.strip():
            outcome = "clean"
        else:
            outcome = "crash"
        # `bench` writes its report (bench.json/.csv/.md, naming why each case was skipped) also
        # when no case could run, by design; any other file left by a failed run is partial output.
        left = [f for f in left if not (argv[0] == "bench" and re.fullmatch(r"out/bench\.(json|csv|md)", f))]
        partial = outcome != "accepted" and outcome != "hang" and bool(left)
        result = {"family": family, "name": name, "argv": argv, "outcome": outcome, "code": code, "oom_refused": oom,
                  "seconds": round(seconds, 2), "partial": left if partial else [],
                  "stderr_tail": stderr[-1500:] if outcome not in ("accepted", "clean") or partial else
                  stderr.strip().splitlines()[-1][:300] if stderr.strip() else ""}
        if outcome in ("accepted", "clean") and not partial:
            shutil.rmtree(folder, ignore_errors=True)
        else:
            keep = os.path.join(self.work, "findings", re.sub(r"[^A-Za-z0-9_.-]", "_", f"{family}-{name}")[:120])
            shutil.rmtree(keep, ignore_errors=True)
            shutil.move(folder, keep)
            with open(os.path.join(keep, "command.txt"), "w") as f:
                f.write("cd " + keep + " && " + " ".join([self.binary] + [repr(a) for a in argv]) + "\n" + stderr)
            result["kept"] = keep
        return result


def numeric_flags(binary, sub):
    help_text = subprocess.run([binary, sub, "--help"], capture_output=True, text=True, timeout=60).stdout
    flags = []
    for line in help_text.splitlines():
        m = re.match(r"\s+((?:-\w,)?--[\w-]+(?:,--[\w-]+)?)\s+(\w+)", line)
        if not m:
            continue
        flag = next(part for part in m.group(1).split(",") if part.startswith("--"))
        if m.group(2).split(":")[0] in ("INT", "UINT", "FLOAT", "NUMBER") or flag in NUMERIC_TEXT_FLAGS:
            flags.append(flag)
    return flags


def set_flag(argv, flag, value):
    argv = list(argv)
    if flag in argv:
        argv[argv.index(flag) + 1] = value
    else:
        argv += [flag, value]
    return argv


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="build-asan/bin/longtape", help="the longtape executable to attack")
    ap.add_argument("--files", type=int, default=1000, help="malformed input files (npy 40%%, safetensors 25%%, "
                    "checkpoints 35%%)")
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per run before it counts as a hang")
    ap.add_argument("--mem-mb", type=int, default=4096, help="memory limit per run in MiB")
    ap.add_argument("--jobs", type=int, default=2, help="runs in parallel")
    ap.add_argument("--seed", type=int, default=None, help="seed of the generated inputs (default: fresh)")
    ap.add_argument("--work", default=None, help="working folder (default: a new temporary one); findings are kept "
                    "in WORK/findings")
    ap.add_argument("--report", default=None, help="also write every run's result as JSON here")
    ap.add_argument("--skip-flags", action="store_true", help="only the file inputs")
    args = ap.parse_args()
    if not os.path.isfile(args.bin):
        sys.exit(f"hostile_inputs.py: no executable at {args.bin} (bash scripts/sanitize.sh builds build-asan)")
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    work = os.path.abspath(args.work or tempfile.mkdtemp(prefix="longtape-hostile-"))
    os.makedirs(work, exist_ok=True)
    runner = Runner(args, work)
    print(f"hostile inputs: {os.path.abspath(args.bin)} ({'sanitizer build' if runner.sanitized else 'no sanitizers'})"
          f", seed {seed}, work folder {work}", flush=True)

    numel = B * N * H * D
    good_npy = {f"in/{r}.npy": npy_bytes((B, N, H, D), [rng.gauss(0, 1) for _ in range(numel)])
                for r in ("q", "k", "v", "dout")}
    # A valid checkpoint of the tiny train configuration, written by the binary under test.
    setup = runner.run("setup", "checkpoint", TRAIN_ARGS + ["--checkpoint", "out/ck.safetensors"], {})
    if setup["outcome"] != "accepted":
        sys.exit(f"hostile_inputs.py: the setup run that writes a checkpoint failed: {setup}")
    # The setup folder is gone after an accepted run: write the checkpoint again to a known place.
    ck_dir = os.path.join(work, "setup")
    os.makedirs(ck_dir, exist_ok=True)
    subprocess.run([runner.binary] + TRAIN_ARGS + ["--checkpoint", "ck.safetensors"], cwd=ck_dir, env=runner.env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True, timeout=120)
    with open(os.path.join(ck_dir, "ck.safetensors"), "rb") as f:
        checkpoint = f.read()

    n_npy = args.files * 40 // 100
    n_st = args.files * 25 // 100
    n_ck = args.files - n_npy - n_st
    jobs = []
    for name, role, blob in npy_cases(rng, n_npy):
        inputs = dict(good_npy)
        inputs[f"in/{role}.npy"] = blob
        jobs.append(("npy", name, BASE_ARGS["attention"], inputs))
    for name, blob in safetensors_cases(rng, n_st):
        jobs.append(("safetensors", name, TRAIN_ARGS + ["--resume", "in/x.safetensors", "--checkpoint",
                                                        "out/ck.safetensors"], {"in/x.safetensors": blob}))
    for name, blob in checkpoint_cases(rng, n_ck, checkpoint):
        jobs.append(("checkpoint", name, TRAIN_ARGS + ["--steps", "3", "--resume", "in/ck.safetensors",
                                                       "--checkpoint", "out/ck.safetensors"],
                     {"in/ck.safetensors": blob}))
    if not args.skip_flags:
        for sub, base in BASE_ARGS.items():
            inputs = good_npy if sub == "attention" else {}
            for flag in numeric_flags(runner.binary, sub):
                for value in HOSTILE_VALUES:
                    argv = list(base) + FLAG_CONTEXT.get((sub, flag), [])
                    jobs.append(("flags", f"{sub} {flag}={value!r}", set_flag(argv, flag, value), inputs))

    print(f"{len(jobs)} runs: {n_npy} npy, {n_st} safetensors, {n_ck} checkpoint files, "
          f"{len(jobs) - args.files} flag values; {args.jobs} at a time, {args.timeout:g} s each at most", flush=True)
    results = []
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(runner.run, *job) for job in jobs]
        for i, fut in enumerate(concurrent.futures.as_completed(futures), 1):
            results.append(fut.result())
            if i % 100 == 0:
                print(f"  {i}/{len(jobs)} runs, {time.monotonic() - start:.0f} s", flush=True)
    elapsed = time.monotonic() - start

    outcomes = ["accepted", "clean", "crash", "sanitizer", "hang", "memory"]
    families = ["npy", "safetensors", "checkpoint", "flags"]
    columns = outcomes + ["partial", "oom_refused"]
    table = {f: {o: 0 for o in columns} for f in families}
    for r in results:
        table[r["family"]][r["outcome"]] += 1
        table[r["family"]]["partial"] += bool(r["partial"])
        table[r["family"]]["oom_refused"] += r["outcome"] == "clean" and r["oom_refused"]
    labels = {"accepted": "accepted", "clean": "clean error", "crash": "crash", "sanitizer": "sanitizer",
              "hang": "hang", "memory": "memory", "partial": "partial out", "oom_refused": "oom refused"}
    print(f"\n{len(results)} runs in {elapsed:.0f} s (seed {seed})")
    print(f"{'inputs':<12}" + "".join(f"{labels[o]:>12}" for o in columns))
    for f in families:
        print(f"{f:<12}" + "".join(f"{table[f][o]:>12}" for o in columns))
    print(f"{'total':<12}" + "".join(f"{sum(table[f][o] for f in families):>12}" for o in columns))
    bad = [r for r in results if r["outcome"] in ("crash", "sanitizer", "hang", "memory") or r["partial"]]
    for r in bad[:40]:
        print(f"\n[{r['outcome']}{' + partial output ' + str(r['partial']) if r['partial'] else ''}] "
              f"{r['family']} {r['name']} ({r['seconds']} s, exit {r['code']}) kept in {r.get('kept')}\n"
              f"  {r['stderr_tail'][-600:]}")
    if args.report:
        with open(args.report, "w") as f:
            json.dump({"seed": seed, "binary": os.path.abspath(args.bin), "sanitized": runner.sanitized,
                       "seconds": round(elapsed, 1), "counts": table, "runs": results}, f, indent=1)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
