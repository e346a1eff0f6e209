#!/usr/bin/python3
"""Writes tests/golden/golden.bin: PyTorch reference results for tests/test_golden.c.

Run from the repository root with Debian's interpreter (python3-torch 1.13,
python3-numpy):   make golden   or   /usr/bin/python3 tests/gen_golden.py

Every case draws its inputs and weights as float32 with a fixed seed, stores
those float32 values, and stores the result of running the same values in
float64 (module.double()), so the C test compares its float32 path against a
float64 result without ever needing PyTorch.  The output is deterministic:
regenerating gives the same bytes.

FILE FORMAT (all integers and floats little-endian; tests/golden.h reads it)

    file    := "MHAGOLD1" (8 bytes)  u32 version (=1)  u32 ncases  case*
    case    := char name[48]         NUL-padded case name
               i32 p[16]             parameters, meaning below (unused = 0)
               f32 scale             attention scale, 0 = default 1/sqrt(D)
               u32 narrays
               array*
    array   := char name[24]         NUL-padded, e.g. "query", "out_proj.weight"
               u32 dtype             0 = float32, 1 = uint8, 2 = float64, 3 = uint16
                                     (16-bit storage bits: tests/gen_golden_dtype.py)
               u32 ndim              1..4
               u32 shape[4]          unused dimensions are 0
               data                  prod(shape) elements, row-major, no padding

    p[0]  KIND          0 = module (mha_module_forward), 1 = sdpa (mha_sdpa_forward)
    p[1]  B             p[2] H         p[3] Lq        p[4] Lk
    p[5]  E (module) or D (sdpa)       p[6] kdim (module) or Dv (sdpa)
    p[7]  vdim (module)
    p[8]  add_zero_attn (module)
    p[9]  causal        0 = none, 1 = top-left, 2 = bottom-right (set opt.causal;
                        an "attn_mask" array, if any, holds only the other mask:
                        the golden was computed with the triangle merged in)
    p[10] per_head_weights  1: "weights" is [B,H,Lq,Lk'], 0: head average [B,Lq,Lk']
    p[11] attn_mask kind    mha_mask_kind of the "attn_mask" array (1 BOOL,
                            2 BOOL_KEEP, 3 FLOAT), 0 = no attn_mask
    p[12] key_padding_mask kind, same coding
    p[13] expected NaN rows replaced (informational: PyTorch gave NaN for
          some fully masked query rows; see fix_fully_masked())

    Input arrays of a module case are named as in the state_dict of
    nn.MultiheadAttention ("in_proj_weight", "q_proj_weight", "k_proj_weight",
    "v_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias",
    "bias_k", "bias_v"), plus "query", "key", "value", "attn_mask",
    "key_padding_mask".  SDPA cases have "q", "k", "v" and the masks.
    Expected results are float64: "out" and "weights".

Masks are given to the C code in the shapes PyTorch takes them: attn_mask
[Lq,Lk], [B*H,Lq,Lk] (row b*H + h) or, for SDPA, [B,H,Lq,Lk]; key_padding_mask
[B,Lk].  Bool masks are stored as uint8 0/1.
"""
import os
import struct
import sys

import numpy as np
import torch
import torch.nn as nn

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "golden.bin")

MASK_NONE, MASK_BOOL, MASK_BOOL_KEEP, MASK_FLOAT = 0, 1, 2, 3
CAUSAL_NONE, CAUSAL_TOP_LEFT, CAUSAL_BOTTOM_RIGHT = 0, 1, 2
NINF = float("-inf")


# ---------------------------------------------------------------- writing

def pack_array(name, a):
    a = np.ascontiguousarray(a)
    if a.dtype == np.float32:
        code = 0
    elif a.dtype == np.uint8:
        code = 1
    elif a.dtype == np.float64:
        code = 2
    elif a.dtype == np.uint16:
        code = 3
    else:
        raise TypeError(f"{name}: unsupported dtype {a.dtype}")
    assert 1 <= a.ndim <= 4, name
    shape = list(a.shape) + [0] * (4 - a.ndim)
    head = struct.pack("<24sII4I", name.encode(), code, a.ndim, *shape)
    return head + a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()


def write_golden(path, blobs):
    """The file: magic, version 1, the case count, then the packed cases."""
    data = b"MHAGOLD1" + struct.pack("<II", 1, len(blobs)) + b"".join(blobs)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {path}: {len(blobs)} cases, {len(data)} bytes")


def pack_case(name, params, scale, arrays):
    p = [0] * 16
    for k, v in params.items():
        p[PARAM[k]] = int(v)
    assert len(name) < 48, name
    body = struct.pack("<48s16ifI", name.encode(), *p, scale, len(arrays))
    return body + b"".join(pack_array(n, a) for n, a in arrays)


PARAM = {"kind": 0, "B": 1, "H": 2, "Lq": 3, "Lk": 4, "E": 5, "kdim": 6, "vdim": 7,
         "add_zero_attn": 8, "causal": 9, "per_head": 10, "attn_kind": 11,
         "kpm_kind": 12, "nan_fixed": 13}


# ---------------------------------------------------------------- inputs

class Draw:
    """float32 draws from one seeded generator per case."""

    def __init__(self, seed):
        self.g = torch.Generator().manual_seed(seed)

    def uniform(self, *shape, amp=1.0):
        return (torch.rand(*shape, generator=self.g, dtype=torch.float32) * 2 - 1) * amp

    def bools(self, *shape, p=0.3):
        return torch.rand(*shape, generator=self.g) < p


def causal_block(Lq, Lk, align):
    """bool [Lq,Lk], True = blocked.  Top-left: key j is visible to query i
    iff j <= i.  Bottom-right: iff j <= i + Lk - Lq (the last query sees
    every key, as in decoding with a cache)."""
    off = 0 if align == CAUSAL_TOP_LEFT else Lk - Lq
    i = torch.arange(Lq).unsqueeze(1)
    j = torch.arange(Lk).unsqueeze(0)
    return j > i + off


def float_mask(draw, shape, p_block=0.2):
    """A float mask: finite offsets in [-3, 3] and some -inf (blocked)."""
    m = draw.uniform(*shape, amp=3.0)
    return m.masked_fill(draw.bools(*shape, p=p_block), NINF)


def to_u8(m):
    return m.to(torch.uint8).numpy()


# ---------------------------------------------------------------- module cases

def fix_fully_masked(mod64, q, k, v, per_head, out):
    """PyTorch 1.13 returns NaN for a query row whose keys are all masked
    (softmax over only -inf).  mha.h defines that row instead: zero attention
    weights and a zero context vector for that head, so the head contributes
    nothing and a query blocked in every head outputs out_proj.bias.

    Here the weights of such rows are set to 0 and the output is recomputed
    from the (fixed) per-head weights in float64:
        ctx_h = P_h V_h;  out = concat_h(ctx_h) Wo^T + bo
    with V built exactly as F.multi_head_attention_forward builds it
    (projection, bias_v row, then a zero row after the head split).  Rows that
    PyTorch did compute are checked against this recomputation, so the
    recomputation is itself verified on every case that uses it."""
    B, Lq, E = q.shape
    H = mod64.num_heads
    D = E // H
    P = torch.nan_to_num(per_head, nan=0.0)
    if mod64._qkv_same_embed_dim:
        wv = mod64.in_proj_weight[2 * E:]
    else:
        wv = mod64.v_proj_weight
    bv = mod64.in_proj_bias[2 * E:] if mod64.in_proj_bias is not None else None
    vp = torch.nn.functional.linear(v, wv, bv)                       # [B,Lk,E]
    if mod64.bias_v is not None:
        vp = torch.cat([vp, mod64.bias_v.reshape(1, 1, E).expand(B, 1, E)], dim=1)
    vh = vp.reshape(B, -1, H, D).transpose(1, 2)                     # [B,H,Lk,D]
    if mod64.add_zero_attn:
        vh = torch.cat([vh, torch.zeros(B, H, 1, D, dtype=vh.dtype)], dim=2)
    ctx = (P @ vh).transpose(1, 2).reshape(B, Lq, E)
    mine = torch.nn.functional.linear(ctx, mod64.out_proj.weight, mod64.out_proj.bias)
    ok = ~torch.isnan(out).any(dim=-1)
    if ok.any():
        err = (mine[ok] - out[ok]).abs().max().item()
        assert err < 1e-12, f"recomputed output disagrees with PyTorch by {err}"
    return P, mine


def module_case(name, seed, B, H, Lq, Lk, E, kdim=None, vdim=None, bias=True,
                add_bias_kv=False, add_zero_attn=False, self_attn=False,
                attn_mask=None, kpm=None, causal=CAUSAL_NONE, per_head=False,
                amp=1.0, merge_kpm=False):
    """One nn.MultiheadAttention(batch_first=True) case.

    attn_mask / kpm: callables (draw) -> tensor in PyTorch's dtype (bool or
    float32), or None.  causal: the golden uses the explicit triangular mask
    (torch 1.13's MHA has no is_causal); the C side sets opt.causal.
    merge_kpm: PyTorch 1.13 cannot combine a float key_padding_mask with a
    float attn_mask (masked_fill needs a bool mask), and with a bool
    attn_mask it logical_or's the float key_padding_mask, treating any
    nonzero value as "blocked".  PyTorch 2.x and mha.h instead turn bool masks
    into -inf and add every float mask.  For these combinations the generator
    builds that sum as one [B*H,Lq,Lk] float mask and gives PyTorch that."""
    draw = Draw(seed)
    kdim = kdim or E
    vdim = vdim or E
    mod = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv,
                                add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                                batch_first=True)
    mod.eval()
    # Overwrite every parameter (biases too: PyTorch zero-initialises them,
    # which would hide a bias bug) with uniform values of unit-ish gain.
    with torch.no_grad():
        for pname, p in mod.named_parameters():
            fan_in = p.shape[-1] if p.dim() == 2 else E
            p.copy_(draw.uniform(*p.shape, amp=(3.0 / fan_in) ** 0.5))
    sd = {k: v.detach().clone() for k, v in mod.state_dict().items()}

    query = draw.uniform(B, Lq, E, amp=amp)
    if self_attn:
        assert Lq == Lk and kdim == E and vdim == E
        key = value = query
    else:
        key = draw.uniform(B, Lk, kdim, amp=amp)
        value = draw.uniform(B, Lk, vdim, amp=amp)
    am = attn_mask(draw) if attn_mask else None
    kp = kpm(draw) if kpm else None

    # float64 copies of the very same values
    mod64 = nn.MultiheadAttention(E, H, bias=bias, add_bias_kv=add_bias_kv,
                                  add_zero_attn=add_zero_attn, kdim=kdim, vdim=vdim,
                                  batch_first=True)
    mod64.load_state_dict(sd)
    mod64.double().eval()
    q64 = query.double()
    k64 = q64 if self_attn else key.double()
    v64 = q64 if self_attn else value.double()

    t_am = am
    if causal != CAUSAL_NONE:
        tri = causal_block(Lq, Lk, causal)
        if am is None:
            t_am = tri
        elif am.is_floating_point():
            t_am = am.masked_fill(tri, NINF)        # broadcasts over a 3-D mask
        else:
            t_am = am | tri
    if t_am is not None and t_am.is_floating_point():
        t_am = t_am.double()
    t_kp = kp
    if t_kp is not None and t_kp.is_floating_point():
        t_kp = t_kp.double()
    if merge_kpm:
        assert t_am is not None and t_kp.is_floating_point()
        if not t_am.is_floating_point():
            t_am = torch.zeros(t_am.shape, dtype=torch.float64).masked_fill(t_am, NINF)
        am3 = t_am.expand(B * H, Lq, Lk) if t_am.dim() == 2 else t_am
        t_am = am3 + t_kp.reshape(B, 1, 1, Lk).expand(B, H, Lq, Lk).reshape(B * H, Lq, Lk)
        t_kp = None

    # Grad stays enabled and the parameters require grad, so PyTorch takes its
    # documented slow path (the 1.13 fast path raises for bias=False).
    out, w_head = mod64(q64, k64, v64, key_padding_mask=t_kp, attn_mask=t_am,
                        need_weights=True, average_attn_weights=False)
    _, w_avg = mod64(q64, k64, v64, key_padding_mask=t_kp, attn_mask=t_am,
                     need_weights=True, average_attn_weights=True)
    out, w_head, w_avg = out.detach(), w_head.detach(), w_avg.detach()
    nan_fixed = bool(torch.isnan(out).any() or torch.isnan(w_head).any())
    if nan_fixed:
        with torch.no_grad():
            w_head, out = fix_fully_masked(mod64, q64, k64, v64, w_head, out)
        w_avg = w_head.mean(dim=1)
    weights = w_head if per_head else w_avg
    assert torch.isfinite(out).all() and torch.isfinite(weights).all(), name

    # float32 PyTorch on the same inputs: how far plain float32 rounding is
    # from the float64 result (printed, to judge the tolerance).
    am32 = t_am.float() if t_am is not None and t_am.is_floating_point() else t_am
    kp32 = t_kp.float() if t_kp is not None and t_kp.is_floating_point() else t_kp
    out32, _ = mod(query, key, value, key_padding_mask=kp32, attn_mask=am32, need_weights=True)
    out32 = out32.detach().double()
    ok = torch.isfinite(out32).all(dim=-1)
    f32err = rel_err(out32[ok], out[ok]) if ok.any() else 0.0

    arrays = [("query", query.numpy())]
    if not self_attn:
        arrays += [("key", key.numpy()), ("value", value.numpy())]
    for k in ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
              "in_proj_bias", "out_proj.weight", "out_proj.bias", "bias_k", "bias_v"]:
        if k in sd:
            t = sd[k]
            if k.startswith("bias_"):
                t = t.reshape(E)          # stored [1,1,E]
            arrays.append((k, t.numpy()))
    attn_kind = kpm_kind = MASK_NONE
    if am is not None:
        attn_kind = MASK_FLOAT if am.is_floating_point() else MASK_BOOL
        arrays.append(("attn_mask", am.numpy() if am.is_floating_point() else to_u8(am)))
    if kp is not None:
        kpm_kind = MASK_FLOAT if kp.is_floating_point() else MASK_BOOL
        arrays.append(("key_padding_mask", kp.numpy() if kp.is_floating_point() else to_u8(kp)))
    arrays += [("out", out.numpy()), ("weights", weights.numpy())]
    params = dict(kind=0, B=B, H=H, Lq=Lq, Lk=Lk, E=E, kdim=kdim, vdim=vdim,
                  add_zero_attn=add_zero_attn, causal=causal, per_head=per_head,
                  attn_kind=attn_kind, kpm_kind=kpm_kind, nan_fixed=nan_fixed)
    return name, params, 0.0, arrays, f32err


def rel_err(a, b):
    a = a.double()
    b = b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den else num


# ---------------------------------------------------------------- SDPA cases

def sdpa_case(name, seed, B, H, Lq, Lk, D, Dv, scale=0.0, attn=None, attn_kind=MASK_NONE,
              kpm=None, kpm_kind=MASK_NONE, causal=CAUSAL_NONE, amp=1.0):
    """softmax(Q K^T * scale + mask) V in float64 torch.  (torch 1.13 has no
    F.scaled_dot_product_attention, so the formula is written out.)

    attn: callable (draw) -> tensor [Lq,Lk], [B*H,Lq,Lk] or [B,H,Lq,Lk]:
    bool in the convention attn_kind says (MASK_BOOL: True blocks;
    MASK_BOOL_KEEP: True lets the key take part), or float (added).
    kpm: callable -> [B,Lk] in the convention kpm_kind says.
    A query row with every key blocked gets zero weights and a zero output
    (mha.h's definition; a plain softmax would give NaN)."""
    draw = Draw(seed)
    q = draw.uniform(B, H, Lq, D, amp=amp)
    k = draw.uniform(B, H, Lk, D, amp=amp)
    v = draw.uniform(B, H, Lk, Dv)
    s = 1.0 / D ** 0.5 if scale == 0.0 else float(np.float32(scale))
    scores = (q.double() @ k.double().transpose(-1, -2)) * s        # [B,H,Lq,Lk]
    blocked = torch.zeros(B, H, Lq, Lk, dtype=torch.bool)
    arrays = [("q", q.numpy()), ("k", k.numpy()), ("v", v.numpy())]
    if attn is not None:
        m = attn(draw)
        if m.dim() == 3:
            m4 = m.reshape(B, H, Lq, Lk)
        else:
            m4 = m.expand(B, H, Lq, Lk) if m.dim() == 2 else m
        if attn_kind == MASK_FLOAT:
            scores = scores + m4.double()
            arrays.append(("attn_mask", m.numpy()))
        else:
            blocked |= m4 if attn_kind == MASK_BOOL else ~m4
            arrays.append(("attn_mask", to_u8(m)))
    if kpm is not None:
        m = kpm(draw)
        m4 = m.reshape(B, 1, 1, Lk).expand(B, H, Lq, Lk)
        if kpm_kind == MASK_FLOAT:
            scores = scores + m4.double()
            arrays.append(("key_padding_mask", m.numpy()))
        else:
            blocked |= m4 if kpm_kind == MASK_BOOL else ~m4
            arrays.append(("key_padding_mask", to_u8(m)))
    if causal != CAUSAL_NONE:
        blocked |= causal_block(Lq, Lk, causal)
    scores = scores.masked_fill(blocked, NINF)
    empty = torch.isneginf(scores).all(dim=-1, keepdim=True)
    p = torch.softmax(scores, dim=-1)
    p = torch.where(empty, torch.zeros_like(p), p)                  # NaN rows -> 0
    out = p @ v.double()
    assert torch.isfinite(out).all() and torch.isfinite(p).all(), name
    arrays += [("out", out.numpy()), ("weights", p.numpy())]
    params = dict(kind=1, B=B, H=H, Lq=Lq, Lk=Lk, E=D, kdim=Dv, causal=causal, per_head=1,
                  attn_kind=attn_kind if attn is not None else MASK_NONE,
                  kpm_kind=kpm_kind if kpm is not None else MASK_NONE,
                  nan_fixed=bool(empty.any()))
    return name, params, float(np.float32(scale)), arrays, None


# ---------------------------------------------------------------- the case list

def cases():
    C = []
    M = module_case
    # -- self-attention, sizes: H = 1 and 12, odd L, E not a power of two
    C.append(M("self_B1_L1_E6_H1", 1, B=1, H=1, Lq=1, Lk=1, E=6, self_attn=True))
    C.append(M("self_B2_L7_E24_H12_perhead", 2, B=2, H=12, Lq=7, Lk=7, E=24, self_attn=True,
               per_head=True))
    C.append(M("self_B3_L17_E36_H12", 3, B=3, H=12, Lq=17, Lk=17, E=36, self_attn=True))
    C.append(M("self_B1_L130_E36_H12", 4, B=1, H=12, Lq=130, Lk=130, E=36, self_attn=True))
    C.append(M("self_B1_L130_E24_H1_perhead", 5, B=1, H=1, Lq=130, Lk=130, E=24,
               self_attn=True, per_head=True))
    C.append(M("self_B3_L3_E20_H4", 6, B=3, H=4, Lq=3, Lk=3, E=20, self_attn=True))
    # -- cross-attention, Lq != Lk
    C.append(M("cross_B2_Lq3_Lk17_E24_H12", 10, B=2, H=12, Lq=3, Lk=17, E=24))
    C.append(M("cross_B1_Lq130_Lk7_E36_H12_perhead", 11, B=1, H=12, Lq=130, Lk=7, E=36,
               per_head=True))
    C.append(M("cross_B3_Lq1_Lk130_E24_H1", 12, B=3, H=1, Lq=1, Lk=130, E=24))
    # -- kdim != vdim != E: separate q/k/v_proj_weight
    C.append(M("kvdim_B2_Lq7_Lk17_E24_k10_v7_H12", 20, B=2, H=12, Lq=7, Lk=17, E=24,
               kdim=10, vdim=7, per_head=True))
    C.append(M("kvdim_B3_Lq17_Lk3_E36_k5_v13_H1", 21, B=3, H=1, Lq=17, Lk=3, E=36,
               kdim=5, vdim=13))
    # -- bias=False
    C.append(M("nobias_self_B2_L17_E24_H12", 30, B=2, H=12, Lq=17, Lk=17, E=24, bias=False,
               self_attn=True))
    C.append(M("nobias_kvdim_B2_Lq3_Lk7_E36_k17_v3_H12", 31, B=2, H=12, Lq=3, Lk=7, E=36,
               kdim=17, vdim=3, bias=False, per_head=True))
    # -- add_bias_kv, add_zero_attn, both (also with masks: PyTorch pads them)
    C.append(M("biaskv_B2_Lq7_Lk17_E24_H12", 40, B=2, H=12, Lq=7, Lk=17, E=24,
               add_bias_kv=True, per_head=True))
    C.append(M("zeroattn_B2_L17_E36_H12", 41, B=2, H=12, Lq=17, Lk=17, E=36,
               add_zero_attn=True, self_attn=True))
    C.append(M("biaskv_zeroattn_B3_Lq7_Lk3_E24_H1", 42, B=3, H=1, Lq=7, Lk=3, E=24,
               add_bias_kv=True, add_zero_attn=True))
    C.append(M("biaskv_zeroattn_masks_B2_Lq7_Lk17_E24_H12", 43, B=2, H=12, Lq=7, Lk=17, E=24,
               add_bias_kv=True, add_zero_attn=True, per_head=True,
               attn_mask=lambda d: d.bools(7, 17, p=0.3),
               kpm=lambda d: d.bools(2, 17, p=0.3)))
    C.append(M("biaskv_kvdim_nobias_fmask_B2_Lq3_Lk7_E24_H12", 44, B=2, H=12, Lq=3, Lk=7,
               E=24, kdim=11, vdim=5, bias=False, add_bias_kv=True,
               attn_mask=lambda d: float_mask(d, (2 * 12, 3, 7))))
    # -- key_padding_mask alone: bool and float
    C.append(M("kpm_bool_B3_L17_E24_H12", 50, B=3, H=12, Lq=17, Lk=17, E=24, self_attn=True,
               kpm=lambda d: d.bools(3, 17, p=0.35)))
    C.append(M("kpm_float_B2_Lq7_Lk17_E36_H12_perhead", 51, B=2, H=12, Lq=7, Lk=17, E=36,
               per_head=True, kpm=lambda d: float_mask(d, (2, 17))))
    # -- attn_mask alone: bool and float, 2-D [Lq,Lk] and 3-D [B*H,Lq,Lk]
    C.append(M("amask_bool2d_B2_Lq7_Lk17_E24_H12", 60, B=2, H=12, Lq=7, Lk=17, E=24,
               attn_mask=lambda d: d.bools(7, 17, p=0.4)))
    C.append(M("amask_bool3d_B2_Lq7_Lk17_E24_H12_perhead", 61, B=2, H=12, Lq=7, Lk=17, E=24,
               per_head=True, attn_mask=lambda d: d.bools(2 * 12, 7, 17, p=0.4)))
    C.append(M("amask_float2d_B3_L17_E36_H12", 62, B=3, H=12, Lq=17, Lk=17, E=36,
               self_attn=True, attn_mask=lambda d: float_mask(d, (17, 17))))
    C.append(M("amask_float3d_B3_Lq3_Lk7_E24_H12_perhead", 63, B=3, H=12, Lq=3, Lk=7, E=24,
               per_head=True, attn_mask=lambda d: float_mask(d, (3 * 12, 3, 7))))
    C.append(M("amask_float3d_B1_L130_E24_H1", 64, B=1, H=1, Lq=130, Lk=130, E=24,
               self_attn=True, attn_mask=lambda d: float_mask(d, (1, 130, 130), p_block=0.1)))
    # -- attn_mask + key_padding_mask
    C.append(M("bool2d_kpmbool_B3_Lq7_Lk17_E24_H12", 70, B=3, H=12, Lq=7, Lk=17, E=24,
               attn_mask=lambda d: d.bools(7, 17, p=0.3), kpm=lambda d: d.bools(3, 17, p=0.3)))
    C.append(M("bool3d_kpmbool_B2_L17_E36_H12_perhead", 71, B=2, H=12, Lq=17, Lk=17, E=36,
               self_attn=True, per_head=True,
               attn_mask=lambda d: d.bools(2 * 12, 17, 17, p=0.3),
               kpm=lambda d: d.bools(2, 17, p=0.3)))
    C.append(M("float2d_kpmbool_B2_Lq7_Lk17_E24_H12", 72, B=2, H=12, Lq=7, Lk=17, E=24,
               attn_mask=lambda d: float_mask(d, (7, 17)), kpm=lambda d: d.bools(2, 17, p=0.3)))
    C.append(M("float3d_kpmbool_B2_Lq3_Lk7_E24_H12_perhead", 73, B=2, H=12, Lq=3, Lk=7, E=24,
               per_head=True, attn_mask=lambda d: float_mask(d, (2 * 12, 3, 7)),
               kpm=lambda d: d.bools(2, 7, p=0.3)))
    C.append(M("float2d_kpmfloat_B2_Lq7_Lk17_E24_H12", 74, B=2, H=12, Lq=7, Lk=17, E=24,
               attn_mask=lambda d: float_mask(d, (7, 17)), kpm=lambda d: float_mask(d, (2, 17)),
               merge_kpm=True))
    C.append(M("float3d_kpmfloat_B2_L7_E36_H12_perhead", 75, B=2, H=12, Lq=7, Lk=7, E=36,
               self_attn=True, per_head=True,
               attn_mask=lambda d: float_mask(d, (2 * 12, 7, 7)),
               kpm=lambda d: float_mask(d, (2, 7)), merge_kpm=True))
    C.append(M("bool2d_kpmfloat_B2_Lq7_Lk17_E24_H12_perhead", 76, B=2, H=12, Lq=7, Lk=17,
               E=24, per_head=True, attn_mask=lambda d: d.bools(7, 17, p=0.3),
               kpm=lambda d: float_mask(d, (2, 17)), merge_kpm=True))
    # -- causal (opt.causal in C, the explicit triangle for PyTorch)
    C.append(M("causal_self_B2_L17_E24_H12", 80, B=2, H=12, Lq=17, Lk=17, E=24,
               self_attn=True, causal=CAUSAL_TOP_LEFT, per_head=True))
    C.append(M("causal_self_B1_L130_E36_H12", 81, B=1, H=12, Lq=130, Lk=130, E=36,
               self_attn=True, causal=CAUSAL_TOP_LEFT))
    C.append(M("causal_topleft_B2_Lq7_Lk17_E24_H12", 82, B=2, H=12, Lq=7, Lk=17, E=24,
               causal=CAUSAL_TOP_LEFT))
    C.append(M("causal_bottomright_B2_Lq3_Lk17_E24_H12", 83, B=2, H=12, Lq=3, Lk=17, E=24,
               causal=CAUSAL_BOTTOM_RIGHT, per_head=True))
    C.append(M("causal_bottomright_B3_Lq1_Lk7_E36_H1", 84, B=3, H=1, Lq=1, Lk=7, E=36,
               causal=CAUSAL_BOTTOM_RIGHT))
    C.append(M("causal_kpmbool_B3_L17_E24_H12", 85, B=3, H=12, Lq=17, Lk=17, E=24,
               self_attn=True, causal=CAUSAL_TOP_LEFT, kpm=lambda d: d.bools(3, 17, p=0.2)))
    C.append(M("causal_float2d_kpmbool_B2_L17_E36_H12", 87, B=2, H=12, Lq=17, Lk=17, E=36,
               self_attn=True, causal=CAUSAL_TOP_LEFT,
               attn_mask=lambda d: float_mask(d, (17, 17), p_block=0.1),
               kpm=lambda d: d.bools(2, 17, p=0.2)))
    C.append(M("causal_br_bool3d_B2_Lq7_Lk17_E24_H12_perhead", 88, B=2, H=12, Lq=7, Lk=17,
               E=24, causal=CAUSAL_BOTTOM_RIGHT, per_head=True,
               attn_mask=lambda d: d.bools(2 * 12, 7, 17, p=0.2)))
    C.append(M("causal_biaskv_zeroattn_B2_L7_E24_H12", 86, B=2, H=12, Lq=7, Lk=7, E=24,
               causal=CAUSAL_TOP_LEFT, add_bias_kv=True, add_zero_attn=True, per_head=True))

    # -- fully masked query rows: PyTorch gives NaN, mha.h zero weights/context
    def kpm_pad_all_of_b1(d):
        m = d.bools(3, 7, p=0.3)
        m[1, :] = True                      # batch element 1: every key padded
        m[0, 0] = False
        return m

    def bool2d_block_row2(d):
        m = d.bools(5, 7, p=0.3)
        m[2, :] = True                      # query 2 blocked everywhere
        m[:, 6] = False
        m[2, 6] = True
        return m

    def bool3d_block_one_head(d):
        m = d.bools(2 * 12, 5, 7, p=0.3)
        m[1 * 12 + 4, 3, :] = True          # batch 1, head 4, query 3 only
        return m

    def float_ninf_row(d):
        m = float_mask(d, (5, 7))
        m[0, :] = NINF                      # query 0 blocked by -inf in a float mask
        return m

    C.append(M("fullmask_kpm_batch_B3_Lq5_Lk7_E24_H12_perhead", 90, B=3, H=12, Lq=5, Lk=7,
               E=24, per_head=True, kpm=kpm_pad_all_of_b1))
    C.append(M("fullmask_bool2d_row_B3_Lq5_Lk7_E24_H12", 91, B=3, H=12, Lq=5, Lk=7, E=24,
               attn_mask=bool2d_block_row2, kpm=kpm_pad_all_of_b1))
    C.append(M("fullmask_bool3d_head_B2_Lq5_Lk7_E24_H12_perhead", 92, B=2, H=12, Lq=5, Lk=7,
               E=24, per_head=True, attn_mask=bool3d_block_one_head))
    C.append(M("fullmask_bool3d_head_B2_Lq5_Lk7_E24_H12_avg", 92, B=2, H=12, Lq=5, Lk=7,
               E=24, attn_mask=bool3d_block_one_head))
    C.append(M("fullmask_float_row_B2_Lq5_Lk7_E36_H1", 93, B=2, H=1, Lq=5, Lk=7, E=36,
               attn_mask=float_ninf_row))
    C.append(M("fullmask_nobias_B3_Lq5_Lk7_E24_H12", 94, B=3, H=12, Lq=5, Lk=7, E=24,
               bias=False, kpm=kpm_pad_all_of_b1))
    # with add_zero_attn the appended key is never masked: no NaN, no fix-up
    C.append(M("fullmask_zeroattn_B3_Lq5_Lk7_E24_H12", 95, B=3, H=12, Lq=5, Lk=7, E=24,
               add_zero_attn=True, kpm=kpm_pad_all_of_b1))

    # -- large logits: inputs x30
    C.append(M("large_x30_self_B2_L17_E36_H12", 100, B=2, H=12, Lq=17, Lk=17, E=36,
               self_attn=True, amp=30.0, per_head=True))
    C.append(M("large_x30_cross_B2_Lq7_Lk130_E24_H1", 101, B=2, H=1, Lq=7, Lk=130, E=24,
               amp=30.0, kpm=lambda d: d.bools(2, 130, p=0.2)))

    # -- SDPA on already projected heads
    S = sdpa_case
    C.append(S("sdpa_plain_B2_H3_Lq7_Lk17_D5_Dv9", 200, B=2, H=3, Lq=7, Lk=17, D=5, Dv=9))
    C.append(S("sdpa_B1_H1_Lq1_Lk1_D3_Dv3", 201, B=1, H=1, Lq=1, Lk=1, D=3, Dv=3))
    C.append(S("sdpa_B1_H2_L130_D3_Dv2", 202, B=1, H=2, Lq=130, Lk=130, D=3, Dv=2))
    C.append(S("sdpa_scale_B2_H2_Lq17_Lk7_D8_Dv4", 203, B=2, H=2, Lq=17, Lk=7, D=8, Dv=4,
               scale=0.37))
    C.append(S("sdpa_bool_block_4d_B2_H3_Lq7_Lk17_D5_Dv6", 204, B=2, H=3, Lq=7, Lk=17, D=5,
               Dv=6, attn=lambda d: d.bools(2, 3, 7, 17, p=0.35), attn_kind=MASK_BOOL))
    C.append(S("sdpa_bool_keep_4d_B2_H3_Lq7_Lk17_D5_Dv6", 204, B=2, H=3, Lq=7, Lk=17, D=5,
               Dv=6, attn=lambda d: d.bools(2, 3, 7, 17, p=0.65), attn_kind=MASK_BOOL_KEEP))
    C.append(S("sdpa_bool_keep_2d_scale_B3_H1_Lq3_Lk7_D4_Dv4", 205, B=3, H=1, Lq=3, Lk=7, D=4,
               Dv=4, scale=1.7, attn=lambda d: d.bools(3, 7, p=0.6), attn_kind=MASK_BOOL_KEEP))
    C.append(S("sdpa_bool_3d_B2_H3_Lq7_Lk7_D6_Dv3", 206, B=2, H=3, Lq=7, Lk=7, D=6, Dv=3,
               attn=lambda d: d.bools(2 * 3, 7, 7, p=0.3), attn_kind=MASK_BOOL))
    C.append(S("sdpa_float_4d_B2_H3_Lq7_Lk17_D5_Dv6", 207, B=2, H=3, Lq=7, Lk=17, D=5, Dv=6,
               attn=lambda d: float_mask(d, (2, 3, 7, 17)), attn_kind=MASK_FLOAT))
    C.append(S("sdpa_kpm_keep_causal_B2_H2_L17_D4_Dv5", 208, B=2, H=2, Lq=17, Lk=17, D=4, Dv=5,
               kpm=lambda d: d.bools(2, 17, p=0.8), kpm_kind=MASK_BOOL_KEEP,
               causal=CAUSAL_TOP_LEFT))
    C.append(S("sdpa_causal_bottomright_B1_H3_Lq3_Lk17_D7_Dv7", 209, B=1, H=3, Lq=3, Lk=17,
               D=7, Dv=7, causal=CAUSAL_BOTTOM_RIGHT))

    def keep_with_empty_row(d):
        m = d.bools(2, 3, 5, 7, p=0.6)
        m[0, 1, 2, :] = False               # KEEP convention: nothing kept
        return m
    C.append(S("sdpa_fullmask_keep_B2_H3_Lq5_Lk7_D4_Dv4", 210, B=2, H=3, Lq=5, Lk=7, D=4,
               Dv=4, attn=keep_with_empty_row, attn_kind=MASK_BOOL_KEEP,
               kpm=lambda d: d.bools(2, 7, p=0.2), kpm_kind=MASK_BOOL))
    C.append(S("sdpa_large_x30_B2_H2_L17_D8_Dv8", 211, B=2, H=2, Lq=17, Lk=17, D=8, Dv=8,
               amp=30.0))
    return C


def main():
    torch.set_num_threads(1)
    all_cases = cases()
    blob = [b"MHAGOLD1", struct.pack("<II", 1, len(all_cases))]
    names = set()
    for name, params, scale, arrays, f32err in all_cases:
        assert name not in names, name
        names.add(name)
        blob.append(pack_case(name, params, scale, arrays))
        note = f"  torch float32 out rel err {f32err:.1e}" if f32err is not None else ""
        if params.get("nan_fixed"):
            note += "  (NaN rows -> documented zeros)"
        print(f"{name:52s}{len(blob[-1]):8d} B{note}")
    data = b"".join(blob)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "wb") as f:
        f.write(data)
    print(f"wrote {len(all_cases)} cases, {len(data)} bytes to tests/golden/{os.path.basename(OUT)}")


if __name__ == "__main__":
    sys.exit(main())
