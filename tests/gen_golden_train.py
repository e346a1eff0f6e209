#!/usr/bin/python3
"""Writes tests/golden/train_golden.bin: PyTorch autograd references for
tests/test_train_golden.c (the backward passes and training pieces of mha.h).

Run from the repository root with Debian's interpreter (python3-torch 1.13):
    /usr/bin/python3 tests/gen_golden_train.py        (or: make golden)

Every tensor is drawn as float32 from a fixed seed and stored as float32; the
module is then run in float64 on those same values (module.double()), and the
float64 forward result and autograd gradients are stored.  The C test runs its
float32 code on the float32 values and compares with the float64 results.
Regenerating gives identical bytes.

FILE FORMAT (little-endian)
    file  := "MHATRAIN" u32 ncases case*
    case  := char name[32]  i32 p[12]  u32 narrays  array*
    array := char name[32]  u32 dtype (0 float32, 1 uint8, 2 float64, 3 int32)
             u32 count      data[count]        (shapes follow from p)

    p[0] kind: 0 nn.MultiheadAttention, 1 nn.TransformerEncoderLayer,
               2 cross-entropy, 3 AdamW, 4 SGD
    kind 0/1:  p[1] B  p[2] Lq  p[3] Lk  p[4] E  p[5] H
               kind 0: p[6] kdim  p[7] vdim  p[8] add_bias_kv + 2 * add_zero_attn
               kind 1: p[6] F (dim_feedforward)  p[7] activation (0 relu, 1 gelu)
                       p[8] norm_first
               p[9] attn_mask: 0 none, 1 bool [Lq,Lk] (nonzero = blocked), 3 float [Lq,Lk]
               p[10] key_padding_mask: 0 none, 1 bool [B,Lk]   p[11] bias (1/0)
    kind 2:    p[1] rows  p[2] V           arrays logits, targets (int32, -100 = ignore),
                                           expected loss [1], dlogits
    kind 3:    p[1] n     p[2] steps       arrays hyper (f64: lr, beta1, beta2, eps,
               p[3] 1: hyper are PyTorch's       weight_decay), p0, grads [steps*n], expected p
                    defaults (mha_adamw_defaults() must equal them)
    kind 4:    p[1] n     p[2] steps       arrays hyper (f64: lr, weight_decay), p0, grads,
                                           expected p (torch.optim.SGD, no momentum)
    Arrays of kind 0/1 are named as in the module's state_dict; "x"/"query"/
    "key"/"value" are inputs (self-attention: one tensor used three times,
    so "grad.query" is its whole gradient and there is no "grad.key"/"grad.value"), "dout" is dLoss/dout (the loss is sum(out * dout)),
    "out" the forward result and "grad.<name>" the gradient of each tensor.
"""
import os
import struct

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden", "train_golden.bin")
DTYPES = {np.float32: 0, np.uint8: 1, np.float64: 2, np.int32: 3}

gen = torch.Generator().manual_seed(20261121)


def draw(*shape, amp=1.0, offset=0.0):
    """float32 values, uniform in [offset - amp, offset + amp)"""
    return ((torch.rand(*shape, generator=gen) * 2 - 1) * amp + offset).float()


def pack(name, a):
    a = np.ascontiguousarray(a)
    code = DTYPES[a.dtype.type]
    return struct.pack("<32sII", name.encode(), code, a.size) + a.tobytes()


def case(name, p, arrays):
    p = list(p) + [0] * (12 - len(p))
    head = struct.pack("<32s12iI", name.encode(), *p, len(arrays))
    return head + b"".join(pack(n, a) for n, a in arrays)


def f32(t):
    return t.detach().float().numpy()


def f64(t):
    return t.detach().double().numpy()


def make_masks(B, Lq, Lk, attn_kind, kpm_kind):
    """attn_mask / key_padding_mask as PyTorch takes them; no query loses all its keys"""
    am = kpm = None
    if attn_kind == 1:   # causal triangle as a bool mask: True = blocked
        am = torch.triu(torch.ones(Lq, Lk, dtype=torch.bool), diagonal=1)
    elif attn_kind == 3:
        am = draw(Lq, Lk, amp=1.0)
    if kpm_kind == 1:
        kpm = torch.rand(B, Lk, generator=gen) < 0.3
        kpm[:, 0] = False          # key 0 stays visible to every query
    return am, kpm


def mask_arrays(am, kpm):
    out = []
    if am is not None:
        out.append(("attn_mask", am.numpy().astype(np.uint8) if am.dtype == torch.bool else f32(am)))
    if kpm is not None:
        out.append(("key_padding_mask", kpm.numpy().astype(np.uint8)))
    return out


def mha_case(name, B, Lq, Lk, E, H, self_attn, attn_kind=0, kpm_kind=0, bias=True,
             kdim=None, vdim=None, add_bias_kv=False, add_zero_attn=False):
    m = nn.MultiheadAttention(E, H, bias=bias, batch_first=True, kdim=kdim, vdim=vdim,
                              add_bias_kv=add_bias_kv, add_zero_attn=add_zero_attn)
    sd = {k: draw(*v.shape, amp=0.5) for k, v in m.state_dict().items()}
    m.load_state_dict(sd)
    m.double()
    kdim, vdim = kdim or E, vdim or E
    q = draw(B, Lq, E)
    k = q if self_attn else draw(B, Lk, kdim)
    v = q if self_attn else draw(B, Lk, vdim)
    am, kpm = make_masks(B, Lq, Lk, attn_kind, kpm_kind)
    dout = draw(B, Lq, E)
    if self_attn:   # one leaf used three times: its gradient is the sum of all three uses
        qd = kd = vd = q.double().requires_grad_()
    else:
        qd, kd, vd = (t.double().requires_grad_() for t in (q, k, v))
    out, _ = m(qd, kd, vd, attn_mask=None if am is None else (am if am.dtype == torch.bool else am.double()),
               key_padding_mask=kpm, need_weights=False)
    (out * dout.double()).sum().backward()
    arrays = [("query", f32(q)), ("key", f32(k)), ("value", f32(v)), ("dout", f32(dout))]
    arrays += [(n, f32(t)) for n, t in sd.items()]
    arrays += mask_arrays(am, kpm)
    arrays += [("out", f64(out)), ("grad.query", f64(qd.grad))]
    if not self_attn:
        arrays += [("grad.key", f64(kd.grad)), ("grad.value", f64(vd.grad))]
    arrays += [("grad." + n, f64(t.grad)) for n, t in m.named_parameters()]
    flags = int(add_bias_kv) + 2 * int(add_zero_attn)
    return case(name, [0, B, Lq, Lk, E, H, kdim, vdim, flags, attn_kind, kpm_kind, int(bias)], arrays)


def encoder_case(name, B, L, E, H, Fd, gelu, norm_first, attn_kind=0, kpm_kind=0):
    layer = nn.TransformerEncoderLayer(E, H, Fd, dropout=0.0, activation="gelu" if gelu else "relu",
                                       batch_first=True, norm_first=norm_first)
    sd = {}
    for k, v in layer.state_dict().items():
        if k.startswith("norm") and k.endswith("weight"):
            sd[k] = draw(*v.shape, amp=0.3, offset=1.0)
        else:
            sd[k] = draw(*v.shape, amp=0.5)
    layer.load_state_dict(sd)
    layer.double().train()           # dropout is 0; train() keeps PyTorch off its fused path
    x = draw(B, L, E)
    am, kpm = make_masks(B, L, L, attn_kind, kpm_kind)
    dout = draw(B, L, E)
    xd = x.double().requires_grad_()
    y = layer(xd, src_mask=None if am is None else (am if am.dtype == torch.bool else am.double()),
              src_key_padding_mask=kpm)
    (y * dout.double()).sum().backward()
    arrays = [("x", f32(x)), ("dout", f32(dout))]
    arrays += [(n, f32(t)) for n, t in sd.items()]
    arrays += mask_arrays(am, kpm)
    arrays += [("out", f64(y)), ("grad.x", f64(xd.grad))]
    arrays += [("grad." + n, f64(t.grad)) for n, t in layer.named_parameters()]
    return case(name, [1, B, L, L, E, H, Fd, int(gelu), int(norm_first), attn_kind, kpm_kind, 1], arrays)


def xent_case(name, n, V):
    logits = draw(n, V, amp=3.0)
    targets = torch.randint(0, V, (n,), generator=gen)
    targets[n // 2] = -100
    z = logits.double().requires_grad_()
    loss = F.cross_entropy(z, targets, ignore_index=-100)
    loss.backward()
    return case(name, [2, n, V], [("logits", f32(logits)), ("targets", targets.numpy().astype(np.int32)),
                                  ("loss", f64(loss).reshape(1)), ("dlogits", f64(z.grad))])


def adamw_case(name, n, steps, lr, wd, betas=(0.9, 0.999), eps=1e-8, defaults=False):
    p0 = draw(n)
    grads = draw(steps, n, amp=2.0)
    p = nn.Parameter(p0.double().clone())
    if defaults:   # the optimizer exactly as torch.optim.AdamW([p]) makes it
        opt = torch.optim.AdamW([p])
        g = opt.param_groups[0]
        lr, wd, betas, eps = g["lr"], g["weight_decay"], g["betas"], g["eps"]
    else:
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd)
    for s in range(steps):
        p.grad = grads[s].double().clone()
        opt.step()
    hyper = np.array([lr, betas[0], betas[1], eps, wd], dtype=np.float64)
    return case(name, [3, n, steps, int(defaults)], [("hyper", hyper), ("p0", f32(p0)),
                                                     ("grads", f32(grads)), ("p", f64(p))])


def sgd_case(name, n, steps, lr, wd):
    p0 = draw(n)
    grads = draw(steps, n, amp=2.0)
    p = nn.Parameter(p0.double().clone())
    opt = torch.optim.SGD([p], lr=lr, weight_decay=wd)
    for s in range(steps):
        p.grad = grads[s].double().clone()
        opt.step()
    hyper = np.array([lr, wd], dtype=np.float64)
    return case(name, [4, n, steps], [("hyper", hyper), ("p0", f32(p0)), ("grads", f32(grads)),
                                      ("p", f64(p))])


def main():
    torch.set_grad_enabled(True)
    cases = [
        mha_case("mha self B2 L5 E6 H3", 2, 5, 5, 6, 3, True),
        mha_case("mha cross kpm B2 Lq3 Lk7 E8 H2", 2, 3, 7, 8, 2, False, kpm_kind=1),
        mha_case("mha causal B1 L17 E12 H4", 1, 17, 17, 12, 4, True, attn_kind=1),
        mha_case("mha float mask nobias B3 L7 E9", 3, 7, 7, 9, 3, True, attn_kind=3, bias=False),
        mha_case("mha kdim vdim B2 Lq4 Lk6 E6", 2, 4, 6, 6, 2, False, kdim=5, vdim=3),
        mha_case("mha bias_kv zero_attn kpm", 2, 5, 7, 8, 4, False, kpm_kind=1, kdim=3, vdim=10,
                 add_bias_kv=True, add_zero_attn=True),
        mha_case("mha self bias_kv causal", 1, 6, 6, 6, 3, True, attn_kind=1, add_bias_kv=True),
        encoder_case("enc post relu B2 L5 E8 H2", 2, 5, 8, 2, 16, False, False),
        encoder_case("enc post gelu causal B2 L7 E6", 2, 7, 6, 3, 10, True, False, attn_kind=1),
        encoder_case("enc pre relu kpm B3 L4 E12 H4", 3, 4, 12, 4, 24, False, True, kpm_kind=1),
        encoder_case("enc pre gelu fmask B1 L9 E10", 1, 9, 10, 5, 7, True, True, attn_kind=3),
        xent_case("cross-entropy 13x7", 13, 7),
        adamw_case("adamw n37 3 steps", 37, 3, 0.01, 0.1),
        # appended after the cases above, so their bytes stay as they were
        adamw_case("adamw defaults n7 1 step", 7, 1, 0, 0, defaults=True),
        adamw_case("adamw defaults n29 6 steps", 29, 6, 0, 0, defaults=True),
        adamw_case("adamw beta1 0 n23 4 steps", 23, 4, 0.01, 0.05, betas=(0.0, 0.99)),
        adamw_case("adamw wd 0 n17 5 steps", 17, 5, 0.003, 0.0, betas=(0.8, 0.95), eps=1e-6),
        adamw_case("adamw beta1 0 wd 0 n3 1 step", 3, 1, 0.02, 0.0, betas=(0.0, 0.5)),
        sgd_case("sgd wd n19 3 steps", 19, 3, 0.05, 0.1),
        sgd_case("sgd n5 1 step", 5, 1, 0.3, 0.0),
    ]
    data = b"MHATRAIN" + struct.pack("<I", len(cases)) + b"".join(cases)
    os.makedirs(os.path.dirname(OUT), exist_ok=True)
    with open(OUT, "wb") as f:
        f.write(data)
    print(f"wrote {OUT}: {len(cases)} cases, {len(data)} bytes")


if __name__ == "__main__":
    main()
