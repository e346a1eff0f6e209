#!/usr/bin/python3
"""Writes tests/golden/decode.bin: PyTorch references for tests/test_decode.c
(grouped-query attention, sliding window, soft-capping, ALiBi, sinks, the
log-sum-exp, and their gradients).

Run from the repository root with Debian's interpreter (python3-torch 1.13):
    make golden   or   /usr/bin/python3 tests/gen_golden_decode.py

PyTorch 1.13 has no enable_gqa and no scaled_dot_product_attention, so the
math is written in float64 torch ops, as issue 9 asks: repeat_interleave for
GQA, an explicit tanh cap, the ALiBi bias added to the scores, the window and
causal limits as a boolean mask, a sink logit concatenated as one more column
and dropped after the softmax, torch.logsumexp for the lse, and autograd for
the gradients of L = sum(dout * out).  Inputs are drawn as float32 with a
fixed seed and stored as float32; the results are computed from the same
values in float64.  The file has the layout of tests/golden/golden.bin
(tests/gen_golden.py describes it); the parameter slots mean

    p[0] B   p[1] H   p[2] Hkv   p[3] Lq   p[4] Lk   p[5] D   p[6] Dv
    p[7] causal: 0 none, 1 top-left, 2 bottom-right, 3 none but bottom-right
         alignment for the window and ALiBi
    p[8] window (0/1)   p[9] window_left   p[10] window_right   (-1 = unbounded)
    p[11] alibi: 0 none, 1 the paper's slopes, 2 the "slopes" array
    p[12] sinks (0/1, the "sinks" array)
    p[13] gradients stored (dq, dk, dv, dsinks for the "dout" array)
    p[14] kind: 0 attention (above), 1 RoPE alone, 2 a decoder module
    p[15] RoPE kind (1 half-split / rotate_half, 2 interleaved)

RoPE cases (kind 1): p[0..3] = B, H, L, D; p[4] rotary_dim; p[5] pos0; the
float32 "theta" [1]; arrays x [B,H,L,D], dout; expected "out" and "dx".
Module cases (kind 2): p[0..6] = B, H, Hkv, L, E, rotary_dim, position
offset; causal (p[7]) as above with Lq = Lk = L; weights q_proj_weight [E,E],
k_proj_weight, v_proj_weight [Hkv*E/H, E], in_proj_bias [E + 2 Hkv E/H],
out_proj.weight, out_proj.bias, "theta"; input x [B,L,E], dout; expected
"out", "dx" and the weight gradients "d" + name.

Arrays: q [B,H,Lq,D], k [B,Hkv,Lk,D], v [B,Hkv,Lk,Dv] (float32); softcap [1]
(float32, 0 = off); slopes [H], sinks [H], dout [B,H,Lq,Dv] (float32); out,
lse [B,H,Lq], weights [B,H,Lq,Lk] and the gradients (float64).
"""
import math
import os
import struct
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gen_golden import pack_array, write_golden  # noqa: E402  (same encoding)

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "decode.bin")


def paper_slopes(n):
    """ALiBi slopes as the paper's reference code computes them."""
    def pow2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]
    if math.log2(n).is_integer():
        return pow2(n)
    p2 = 2 ** math.floor(math.log2(n))
    return pow2(p2) + paper_slopes(2 * p2)[0::2][: n - p2]


def attend(q, k, v, H, Hkv, causal, window, left, right, cap, scale, slopes, sinks):
    """float64 reference: returns out, lse, weights."""
    B, _, Lq, D = q.shape
    Lk = k.shape[2]
    G = H // Hkv
    k = k.repeat_interleave(G, dim=1)          # query head h reads KV head h // G
    v = v.repeat_interleave(G, dim=1)
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if cap > 0:
        s = cap * torch.tanh(s / cap)
    off = Lk - Lq if causal in (2, 3) else 0
    i = torch.arange(Lq, dtype=torch.float64).view(Lq, 1) + off
    j = torch.arange(Lk, dtype=torch.float64).view(1, Lk)
    if slopes is not None:
        s = s + slopes.view(1, H, 1, 1) * (j - i)
    allowed = torch.ones(Lq, Lk, dtype=torch.bool)
    if causal in (1, 2):
        allowed &= j <= i
    if window:
        if left >= 0:
            allowed &= j >= i - left
        if right >= 0:
            allowed &= j <= i + right
    s = s.masked_fill(~allowed, float("-inf"))
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, H, 1, 1).expand(B, H, Lq, 1)], dim=-1)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.softmax(s, dim=-1)
    if sinks is not None:
        p = p[..., :-1]
    return torch.matmul(p, v), lse, p


def rope(x, kind, R, theta, pos):
    """float64 RoPE on x [..., L, D] at positions pos [L]: rotate_half for
    kind 1, pairs (2m, 2m+1) for kind 2; features past R unchanged."""
    inv = theta ** (-torch.arange(0, R, 2, dtype=torch.float64) / R)     # [R/2]
    ang = pos.view(-1, 1).double() * inv.view(1, -1)                     # [L, R/2]
    xr, rest = x[..., :R], x[..., R:]
    if kind == 1:
        cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)
        x1, x2 = xr[..., : R // 2], xr[..., R // 2:]
        rot = torch.cat([-x2, x1], -1)                                   # rotate_half
    else:
        cos, sin = ang.cos().repeat_interleave(2, -1), ang.sin().repeat_interleave(2, -1)
        rot = torch.stack([-xr[..., 1::2], xr[..., 0::2]], -1).flatten(-2)
    return torch.cat([xr * cos + rot * sin, rest], -1)


def header(name, p, scale, arrays):
    p = list(p) + [0] * (16 - len(p))
    assert len(name) < 48, name
    body = struct.pack("<48s16ifI", name.encode(), *p, scale, len(arrays))
    return body + b"".join(pack_array(n, a) for n, a in arrays)


def rope_case(name, seed, B, H, L, D, kind, R, theta, pos0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(B, H, L, D, generator=g) * 2 - 1
    dout = torch.rand(B, H, L, D, generator=g) * 2 - 1
    xd = x.double().requires_grad_(True)
    out = rope(xd, kind, R, theta, torch.arange(pos0, pos0 + L))
    (out * dout.double()).sum().backward()
    arrays = [("x", x.numpy()), ("dout", dout.numpy()),
              ("theta", torch.tensor([theta], dtype=torch.float32).numpy()),
              ("out", out.detach().numpy()), ("dx", xd.grad.numpy())]
    return header(name, [B, H, L, D, R, pos0, 0, 0, 0, 0, 0, 0, 0, 1, 1, kind], 0.0, arrays)


def module_case(name, seed, B, H, Hkv, L, E, kind, R, theta, offset, causal):
    """A decoder layer's attention: GQA projections, RoPE on Q and K, causal
    softmax attention, output projection."""
    g = torch.Generator().manual_seed(seed)
    D = E // H
    Ekv = Hkv * D

    def draw(*shape, amp=1.0):
        return (torch.rand(*shape, generator=g) * 2 - 1) * amp

    w = {"q_proj_weight": draw(E, E, amp=0.4), "k_proj_weight": draw(Ekv, E, amp=0.4),
         "v_proj_weight": draw(Ekv, E, amp=0.4), "in_proj_bias": draw(E + 2 * Ekv, amp=0.2),
         "out_proj.weight": draw(E, E, amp=0.3), "out_proj.bias": draw(E, amp=0.1)}
    x, dout = draw(B, L, E), draw(B, L, E)
    wd = {k: v.double().requires_grad_(True) for k, v in w.items()}
    xd = x.double().requires_grad_(True)
    bq, bk, bv = wd["in_proj_bias"][:E], wd["in_proj_bias"][E:E + Ekv], wd["in_proj_bias"][E + Ekv:]
    q = (xd @ wd["q_proj_weight"].T + bq).view(B, L, H, D).transpose(1, 2)
    k = (xd @ wd["k_proj_weight"].T + bk).view(B, L, Hkv, D).transpose(1, 2)
    v = (xd @ wd["v_proj_weight"].T + bv).view(B, L, Hkv, D).transpose(1, 2)
    pos = torch.arange(offset, offset + L)
    q, k = rope(q, kind, R, theta, pos), rope(k, kind, R, theta, pos)
    o, _, _ = attend(q, k, v, H, Hkv, causal, 0, -1, -1, 0.0, 1.0 / math.sqrt(D), None, None)
    out = o.transpose(1, 2).reshape(B, L, E) @ wd["out_proj.weight"].T + wd["out_proj.bias"]
    (out * dout.double()).sum().backward()
    arrays = [(k_, v_.numpy()) for k_, v_ in w.items()]
    arrays += [("x", x.numpy()), ("dout", dout.numpy()),
               ("theta", torch.tensor([theta], dtype=torch.float32).numpy()),
               ("out", out.detach().numpy()), ("dx", xd.grad.numpy())]
    arrays += [("d" + k_, v_.grad.numpy()) for k_, v_ in wd.items()]
    return header(name, [B, H, Hkv, L, E, R, offset, causal, 0, 0, 0, 0, 0, 1, 2, kind], 0.0,
                  arrays)


def case(name, seed, B, H, Hkv, Lq, Lk, D, Dv, causal=0, window=0, left=-1, right=-1, cap=0.0,
         alibi=0, sinks=False, grad=True, scale=0.0):
    g = torch.Generator().manual_seed(seed)

    def draw(*shape, amp=1.0):
        return (torch.rand(*shape, generator=g, dtype=torch.float32) * 2 - 1) * amp

    q, k, v = draw(B, H, Lq, D, amp=1.5), draw(B, Hkv, Lk, D, amp=1.5), draw(B, Hkv, Lk, Dv)
    own = draw(H, amp=0.3) + 0.4
    sk = draw(H, amp=1.5)
    dout = draw(B, H, Lq, Dv)
    qd, kd, vd = (t.double().requires_grad_(True) for t in (q, k, v))
    sd = sk.double().requires_grad_(True)
    slopes = None
    if alibi == 1:
        slopes = torch.tensor(paper_slopes(H), dtype=torch.float64)
    elif alibi == 2:
        slopes = own.double()
    sc = scale if scale > 0 else 1.0 / math.sqrt(D)
    out, lse, w = attend(qd, kd, vd, H, Hkv, causal, window, left, right, cap, sc, slopes,
                         sd if sinks else None)
    assert torch.isfinite(out).all(), name
    arrays = [("q", q.numpy()), ("k", k.numpy()), ("v", v.numpy()),
              ("softcap", torch.tensor([cap], dtype=torch.float32).numpy()),
              ("slopes", own.numpy()), ("sinks", sk.numpy()), ("dout", dout.numpy()),
              ("out", out.detach().numpy()), ("lse", lse.detach().numpy()),
              ("weights", w.detach().numpy())]
    if grad:
        (out * dout.double()).sum().backward()
        arrays += [("dq", qd.grad.numpy()), ("dk", kd.grad.numpy()), ("dv", vd.grad.numpy())]
        if sinks:
            arrays.append(("dsinks", sd.grad.numpy()))
    p = [B, H, Hkv, Lq, Lk, D, Dv, causal, window, left, right, alibi, int(sinks), int(grad), 0, 0]
    assert len(name) < 48, name
    body = struct.pack("<48s16ifI", name.encode(), *p, scale, len(arrays))
    return body + b"".join(pack_array(n, a) for n, a in arrays)


def cases():
    yield case("gqa_B2_H8_Hkv2", 1, 2, 8, 2, 5, 9, 4, 3)
    yield case("mqa_decode_Lq1_Lk130", 2, 1, 6, 1, 1, 130, 16, 16, causal=2)
    yield case("gqa_prefill_causal_br", 3, 1, 4, 2, 17, 23, 8, 8, causal=2)
    yield case("window_5_2", 4, 2, 3, 3, 7, 7, 5, 5, window=1, left=5, right=2)
    yield case("window_causal_3", 5, 1, 4, 2, 9, 140, 8, 6, causal=2, window=1, left=3, right=0)
    yield case("window_left_unbounded", 6, 1, 2, 1, 6, 11, 4, 4, window=1, left=-1, right=1,
               causal=3)
    yield case("softcap_gemma", 7, 2, 4, 2, 5, 8, 8, 8, cap=1.5, scale=1.0)
    yield case("alibi_paper_H6_causal", 8, 1, 6, 6, 7, 7, 4, 4, causal=1, alibi=1)
    yield case("alibi_paper_H12_br", 9, 1, 12, 4, 3, 13, 4, 4, causal=2, alibi=1)
    yield case("alibi_caller_slopes", 10, 2, 3, 1, 4, 6, 5, 3, alibi=2, causal=3)
    yield case("sinks_gptoss", 11, 2, 4, 2, 5, 7, 6, 6, sinks=True, causal=1)
    yield case("sinks_window_mqa", 12, 1, 4, 1, 8, 8, 4, 4, sinks=True, window=1, left=2,
               right=0, causal=1)
    yield case("all_features", 13, 2, 6, 3, 7, 19, 8, 5, causal=2, window=1, left=6, right=0,
               cap=4.0, alibi=1, sinks=True)
    yield case("decode_long_Lk300", 14, 1, 8, 2, 1, 300, 32, 32, causal=2, window=1, left=200,
               right=0, sinks=True, grad=False)
    yield case("odd_D1_Lk1", 15, 1, 3, 1, 1, 1, 1, 1, sinks=True)
    yield rope_case("rope_half_llama", 20, 2, 3, 7, 8, 1, 8, 10000.0, 0)
    yield rope_case("rope_interleaved_gptj", 21, 1, 2, 5, 6, 2, 6, 10000.0, 3)
    yield rope_case("rope_partial_R4_D10_theta500", 22, 1, 2, 9, 10, 1, 4, 500.0, 17)
    yield rope_case("rope_interleaved_partial_pos1000", 23, 2, 1, 3, 12, 2, 8, 1e6, 1000)
    yield module_case("module_gqa_rope_half", 30, 2, 4, 2, 6, 16, 1, 4, 10000.0, 0, 1)
    yield module_case("module_mqa_rope_interleaved", 31, 1, 6, 1, 9, 24, 2, 4, 100.0, 5, 2)
    yield module_case("module_mha_rope_partial", 32, 2, 2, 2, 5, 12, 1, 4, 10000.0, 2, 1)


def main():
    write_golden(OUT, list(cases()))


if __name__ == "__main__":
    main()
