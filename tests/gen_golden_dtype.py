#!/usr/bin/python3
"""Writes tests/golden/dtype.bin: PyTorch references for 16-bit storage
(tests/test_dtype.c): the bits of torch's float32 -> float16 / bfloat16
conversions, and attention whose keys and values are stored in 16 bits.

Run from the repository root with Debian's interpreter (python3-torch 1.13):
    make golden   or   /usr/bin/python3 tests/gen_golden_dtype.py

The file has the layout of tests/golden/golden.bin (tests/gen_golden.py
describes it; dtype 3 holds uint16 bits).  Parameter slots:

    p[0] kind: 0 conversions, 1 attention
    conversions: arrays "x" float32 [N] (no NaN: torch's NaN bits are its own
        choice), "f16" and "bf16" uint16 [N] = the bits of x.half() and
        x.bfloat16(); "all" uint16 [65536] every bit pattern, and "all_f16",
        "all_bf16" float32 [65536] = torch's widening of each (NaN patterns
        give NaN; the C test compares NaN-ness there, the bits elsewhere)
    attention: p[1] dtype (1 MHA_F16, 2 MHA_BF16)  p[2] B  p[3] H  p[4] Hkv
        p[5] Lq  p[6] Lk  p[7] D  p[8] Dv  p[9] causal (0 none, 1 top-left,
        2 bottom-right); arrays "q" float32 [B,H,Lq,D], "k" [B,Hkv,Lk,D] and
        "v" [B,Hkv,Lk,Dv] float32 as drawn, "k16" and "v16" uint16 = their
        bits in the case's type (torch's rounding), "out" float64 =
        softmax(q k16^T / sqrt(D) + mask) v16 computed in float64 from the
        16-bit values, and "out_f32" float64 = the same from the float32 k, v
        (what the rounding of storage costs: docs/performance.md)

PyTorch 1.13 has no scaled_dot_product_attention: the math is written in
float64 torch ops, GQA by repeat_interleave (query head h reads KV head
h // (H / Hkv)).  Inputs come from a fixed seed: regenerating gives the same
bytes.
"""
import os
import struct
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_golden import pack_array, write_golden  # noqa: E402  (same encoding)

OUT = "tests/golden/dtype.bin"


def header(name, p, arrays):
    p = list(p) + [0] * (16 - len(p))
    assert len(name) < 48, name
    body = struct.pack("<48s16ifI", name.encode(), *p, 0.0, len(arrays))
    return body + b"".join(pack_array(n, a) for n, a in arrays)


def bits(t):
    """The uint16 bit patterns of a float16 / bfloat16 tensor."""
    return t.view(torch.int16).numpy().view(np.uint16).copy()


def conversion_case():
    g = torch.Generator().manual_seed(1)
    vals = []
    # every rounding boundary of float16 near 1, the normal / subnormal
    # edges, overflow to inf, float32 subnormals, and random values over
    # the whole exponent range, both signs
    for h in list(range(0x3c00, 0x3c40)) + list(range(0x0000, 0x0440)) + list(range(0x7bc0, 0x7c00)):
        lo = torch.tensor([h], dtype=torch.int16).view(torch.float16).float().item()
        hi = torch.tensor([h + 1], dtype=torch.int16).view(torch.float16).float().item()
        mid = (lo + hi) / 2
        vals += [lo, mid, np.nextafter(np.float32(mid), np.float32(-np.inf)),
                 np.nextafter(np.float32(mid), np.float32(np.inf))]
    vals += [65504.0, 65519.996, 65520.0, 65536.0, 1e10, 3.4028234663852886e38, float("inf"),
             2.0 ** -24, 2.0 ** -25, 2.0 ** -25 * 1.0000001, 2.0 ** -26, 1e-45, 1.1754942e-38,
             0.0, 1.0 / 3.0, 3.3895314e38, 3.3961776e38]
    e = torch.randint(-140, 128, (4000,), generator=g).double()
    m = torch.rand(4000, generator=g, dtype=torch.float64) + 1.0
    vals += (m * torch.pow(2.0, e)).tolist()
    x = np.array(vals, dtype=np.float32)
    x = np.concatenate([x, -x])
    xt = torch.from_numpy(x)
    allb = np.arange(65536, dtype=np.uint32).astype(np.uint16)
    a16 = torch.from_numpy(allb.view(np.int16).copy())
    return header("convert", [0], [
        ("x", x), ("f16", bits(xt.half())), ("bf16", bits(xt.bfloat16())),
        ("all", allb), ("all_f16", a16.view(torch.float16).float().numpy()),
        ("all_bf16", a16.view(torch.bfloat16).float().numpy())])


def attend(q, k, v, H, Hkv, causal):
    """float64 attention of q [B,H,Lq,D] over k, v [B,Hkv,Lk,*]."""
    k = k.repeat_interleave(H // Hkv, dim=1)
    v = v.repeat_interleave(H // Hkv, dim=1)
    Lq, Lk, D = q.shape[2], k.shape[2], q.shape[3]
    s = q @ k.transpose(-1, -2) / (D ** 0.5)
    if causal:
        off = 0 if causal == 1 else Lk - Lq
        i = torch.arange(Lq).view(-1, 1)
        j = torch.arange(Lk).view(1, -1)
        s = s.masked_fill(j > i + off, float("-inf"))
    return torch.softmax(s, dim=-1) @ v


def attention_case(name, seed, dt, B, H, Hkv, Lq, Lk, D, Dv, causal):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, Hkv, Lk, D, generator=g)
    v = torch.randn(B, Hkv, Lk, Dv, generator=g)
    to16 = (lambda t: t.half()) if dt == 1 else (lambda t: t.bfloat16())
    k16, v16 = to16(k), to16(v)
    out = attend(q.double(), k16.double(), v16.double(), H, Hkv, causal)
    out32 = attend(q.double(), k.double(), v.double(), H, Hkv, causal)
    return header(name, [1, dt, B, H, Hkv, Lq, Lk, D, Dv, causal], [
        ("q", q.numpy()), ("k", k.numpy()), ("v", v.numpy()),
        ("k16", bits(k16)), ("v16", bits(v16)),
        ("out", out.numpy()), ("out_f32", out32.numpy())])


def cases():
    yield conversion_case()
    for dt, tag in ((1, "f16"), (2, "bf16")):
        yield attention_case(f"{tag}_prefill_causal", 10 + dt, dt, 2, 4, 2, 17, 17, 16, 16, 1)
        yield attention_case(f"{tag}_odd_D7_Dv3", 20 + dt, dt, 1, 3, 3, 7, 130, 7, 3, 0)
        yield attention_case(f"{tag}_decode_gqa", 30 + dt, dt, 1, 8, 2, 1, 300, 32, 32, 2)
        yield attention_case(f"{tag}_one_key", 40 + dt, dt, 1, 1, 1, 3, 1, 1, 1, 0)
        yield attention_case(f"{tag}_chunk_bottom_right", 50 + dt, dt, 1, 4, 1, 5, 260, 32, 32, 2)


def main():
    write_golden(OUT, list(cases()))


if __name__ == "__main__":
    main()
