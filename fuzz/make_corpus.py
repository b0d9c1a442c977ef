#!/usr/bin/env python3
"""Writes the seed corpus of the fuzz targets (fuzz/corpus/<target>/): small valid inputs and
typical malformed ones. Standard library only; run from anywhere: python3 fuzz/make_corpus.py"""
import json
import os
import struct

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "corpus")


def npy(descr, shape, data, version=1, fortran=False, header_text=None):
    shape_text = "(" + "".join(f"{d}, " for d in shape).rstrip(" ") + ")" if len(shape) != 1 else f"({shape[0]},)"
    if header_text is None:
        header_text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape_text}, }}"
    header = header_text.encode("latin-1")
    prefix_len = 10 if version == 1 else 12
    pad = 64 - (prefix_len + len(header) + 1) % 64
    header += b" " * pad + b"\n"
    length = struct.pack("<H", len(header)) if version == 1 else struct.pack("<I", len(header))
    return b"\x93NUMPY" + bytes([version, 0]) + length + header + data


def safetensors(header_obj, data, raw_header=None):
    header = raw_header if raw_header is not None else json.dumps(header_obj).encode()
    header += b" " * ((8 - len(header) % 8) % 8)
    return struct.pack("<Q", len(header)) + header + data


def write(target, name, data):
    folder = os.path.join(ROOT, target)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name), "wb") as f:
        f.write(data)


def main():
    f32 = struct.pack("<6f", 0.5, -1.25, 3.0, 1e-7, -2.5e5, 7.0)
    write("npy", "valid_f32_2x3.npy", npy("<f4", (2, 3), f32))
    write("npy", "valid_f64_vector.npy", npy("<f8", (3,), struct.pack("<3d", 1.5, -2.0, 1e300)))
    write("npy", "valid_i64_scalar.npy", npy("<i8", (), struct.pack("<q", -(2**62))))
    write("npy", "valid_i32_empty.npy", npy("<i4", (0, 4), b""))
    write("npy", "valid_v2_f32.npy", npy("<f4", (6,), f32, version=2))
    write("npy", "bad_magic.npy", b"\x93NUMPZ\x01\x00" + npy("<f4", (2, 3), f32)[8:])
    write("npy", "bad_version.npy", npy("<f4", (2, 3), f32)[:6] + b"\x04\x00" + npy("<f4", (2, 3), f32)[8:])
    write("npy", "truncated_data.npy", npy("<f4", (2, 3), f32)[:-5])
    write("npy", "trailing_bytes.npy", npy("<f4", (2, 3), f32) + b"\x00\x01")
    write("npy", "big_endian.npy", npy(">f4", (2, 3), f32))
    write("npy", "fortran_order.npy", npy("<f4", (2, 3), f32, fortran=True))
    write("npy", "unsupported_dtype.npy", npy("<c8", (2, 3), f32))
    write("npy", "negative_dim.npy", npy("<f4", (-2, 3), f32))
    write("npy", "overflow_shape.npy", npy("<f4", (2**62, 2**62, 0), b""))
    write("npy", "huge_dim.npy", npy("<f8", (99999999999999999999,), b""))
    write("npy", "header_not_dict.npy", npy("<f4", (), b"", header_text="[1, 2, 3]"))
    write("npy", "header_unterminated.npy", npy("<f4", (), b"", header_text="{'descr': '<f4"))
    write("npy", "header_deep.npy", npy("<f4", (), b"", header_text="(" * 40 + ")" * 40))
    write("npy", "header_length_past_end.npy", b"\x93NUMPY\x01\x00\xff\xff{'descr'")
    write("npy", "empty.npy", b"")

    t = {"a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
         "b": {"dtype": "I64", "shape": [], "data_offsets": [24, 32]}}
    data = f32 + struct.pack("<q", 7)
    write("safetensors", "valid_two.safetensors", safetensors(t, data))
    write("safetensors", "valid_metadata.safetensors",
          safetensors({"__metadata__": {"format": "longtape-checkpoint-v1", "step": "3"},
                       "w": {"dtype": "BF16", "shape": [2], "data_offsets": [0, 4]}}, b"\x80\x3f\x00\xc0"))
    write("safetensors", "valid_empty.safetensors", safetensors({}, b""))
    write("safetensors", "valid_f64_zero_dim.safetensors",
          safetensors({"z": {"dtype": "F64", "shape": [0, 5], "data_offsets": [0, 0]}}, b""))
    write("safetensors", "truncated.safetensors", safetensors(t, data)[:-3])
    write("safetensors", "gap.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12))
    write("safetensors", "overlap.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                       "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\x00" * 12))
    write("safetensors", "size_mismatch.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\x00" * 8))
    write("safetensors", "overflow_shape.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [2**62, 2**62], "data_offsets": [0, 0]}}, b""))
    write("safetensors", "negative_dim.safetensors",
          safetensors({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b""))
    write("safetensors", "bad_dtype.safetensors",
          safetensors({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}, b"\x00"))
    write("safetensors", "duplicate_key.safetensors",
          safetensors(None, b"\x00" * 8, raw_header=b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                                    b'"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}'))
    write("safetensors", "not_json.safetensors", safetensors(None, b"", raw_header=b"{\"a\": [1, 2"))
    write("safetensors", "header_len_huge.safetensors", struct.pack("<Q", 2**63 + 5) + b"{}")
    write("safetensors", "metadata_not_strings.safetensors", safetensors({"__metadata__": {"step": 3}}, b""))
    write("safetensors", "short.safetensors", b"\x02\x00\x00")
    write("safetensors", "invalid_utf8.safetensors", safetensors(None, b"", raw_header=b'{"\xff\xfe": 1}'))

    # flags: first byte selects the parser (fuzz/entries.cpp), the rest is the value.
    flags = {
        "signed_ok": (0, b"42"), "signed_minus": (0, b"-1"), "signed_int64_max": (0, b"9223372036854775807"),
        "signed_over": (0, b"9223372036854775808"), "signed_empty": (0, b""), "signed_garbage": (0, b"12abc"),
        "count_zero": (8, b"0"), "count_2p40": (8, b"1099511627776"), "count_2p62": (8, b"4611686018427387904"),
        "ranks_plus": (24, b"+8"), "unsigned_minus_one": (1, b"-1"), "unsigned_minus_zero": (1, b"-0"),
        "unsigned_ok": (1, b"18446744073709551615"), "real_nan": (2, b"nan"), "real_inf": (2, b"-inf"),
        "real_ok": (2, b"3e-3"), "real_unit_open": (10, b"1.0"), "real_positive_zero": (18, b"0"),
        "real_hex": (2, b"0x1p3"), "list_ok": (3, b"2048, 4096"), "list_negative": (3, b"-1,2"),
        "list_huge": (3, b"1,99999999999999999999"), "list_empty_item": (3, b"1,,2"), "list_over_2p40": (3, b"1099511627777"),
        "grid_ok": (4, b"16x32"), "grid_overflow": (4, b"1099511627776x1099511627776"), "grid_garbage": (4, b"x"),
        "device_ok": (5, b"cuda:1"), "device_huge": (5, b"cuda:99999999999999999999"), "device_bad": (5, b"tpu"),
        "dtype_ok": (6, b"bf16"), "dtype_bad": (6, b"f16\x00"), "mixing_ok": (7, b"head_groups"),
        "mixing_bad": (7, b"\xff\xfe"),
    }
    for name, (selector, value) in flags.items():
        write("flags", name, bytes([selector]) + value)


if __name__ == "__main__":
    main()
