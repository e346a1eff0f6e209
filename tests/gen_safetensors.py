"""Writes the .safetensors files tests/test_safetensors.c reads (tests/data/safetensors/).

Debian's torch 1.13 has no safetensors package, so the files come from the
small writer below, which follows the format description: an unsigned 64-bit
little-endian header length, a JSON header (dtype, shape, data_offsets per
tensor, optional __metadata__), padded with spaces, then the raw
little-endian data.

  encoder.safetensors   the state_dict of a 2-layer nn.TransformerEncoder
                        (batch_first=True, eval), plus test.x and the
                        outputs PyTorch computed from it (plain and causal)
  mha_kv.safetensors    an nn.MultiheadAttention with kdim, vdim and
                        add_bias_kv (separate q/k/v weights), inputs, output
  dtypes.safetensors    F16, BF16, F64 tensors with their exact float32
                        values beside them, an I64 tensor, __metadata__
  bad_*.safetensors     one broken file for each check of the reader

Run:  /usr/bin/python3 tests/gen_safetensors.py   (deterministic output)
"""
import json
import os
import struct

import numpy as np
import torch

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "safetensors")

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.float64: "F64", torch.int64: "I64"}


def raw(t):
    """Little-endian bytes of a tensor, C order (bfloat16 through its int16 view)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().astype("<i2").tobytes()
    return t.numpy().astype(t.numpy().dtype.newbyteorder("<")).tobytes()


def pack(tensors, metadata=None):
    """The bytes of a .safetensors file holding tensors (name -> torch tensor)."""
    header, blobs, at = {}, [], 0
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, t in tensors.items():
        b = raw(t)
        header[name] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [at, at + len(b)]}
        blobs.append(b)
        at += len(b)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)          # the data starts 8-byte aligned
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def with_header(text, data=b""):
    """A file with a hand-written header (for the broken ones)."""
    text = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(text)) + text + data


def write(name, data):
    with open(os.path.join(OUT, name), "wb") as f:
        f.write(data)


def encoder_file():
    torch.manual_seed(11)
    E, H, F, B, L = 16, 4, 24, 2, 5
    layer = torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, batch_first=True)
    enc = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    with torch.no_grad():
        for p in enc.parameters():          # not the default init: biases nonzero, norms not 1/0
            p.copy_(torch.randn_like(p) * 0.3)
        x = torch.randn(B, L, E)
        y = enc(x)
        causal = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
        y_causal = enc(x, mask=causal)
    tensors = dict(enc.state_dict())
    tensors["test.x"] = x
    tensors["test.y"] = y
    tensors["test.y_causal"] = y_causal
    write("encoder.safetensors", pack(tensors, {"format": "pt", "nhead": str(H)}))
    return tensors


def mha_file():
    """nn.MultiheadAttention with kdim/vdim (separate q/k/v weights) and add_bias_kv."""
    torch.manual_seed(12)
    E, H, KD, VD, B, LQ, LK = 12, 3, 5, 7, 2, 3, 4
    m = torch.nn.MultiheadAttention(E, H, kdim=KD, vdim=VD, add_bias_kv=True, batch_first=True).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn_like(p) * 0.4)
        q, k, v = torch.randn(B, LQ, E), torch.randn(B, LK, KD), torch.randn(B, LK, VD)
        out, _ = m(q, k, v, need_weights=False)
    tensors = {"attn." + k_: t for k_, t in m.state_dict().items()}
    tensors.update({"test.q": q, "test.k": k, "test.v": v, "test.out": out})
    write("mha_kv.safetensors", pack(tensors))


def dtypes_file():
    # values chosen to hit each branch of the conversions: normal, subnormal,
    # zero and negative zero, the largest finite, infinities, NaN
    v = [0.0, -0.0, 1.0, -2.5, 0.333251953125, 65504.0, 6.103515625e-05, 5.960464477539063e-08,
         -3.0517578125e-05, float("inf"), float("-inf"), float("nan")]
    f16 = torch.tensor(v, dtype=torch.float16).reshape(3, 4)
    bf = torch.tensor([0.0, -0.0, 1.0, -2.5, 3.140625, 1e30, 9.183549615799121e-41, -1e-38,
                       float("inf"), float("-inf"), float("nan"), 257.0], dtype=torch.bfloat16)
    f64 = torch.tensor([[0.1, -1e300, 1e-300], [3.0, float("inf"), 12345.678901234]], dtype=torch.float64)
    tensors = {
        "half": f16, "half.as_f32": f16.float(),
        "bf16": bf, "bf16.as_f32": bf.float(),
        "double": f64, "double.as_f32": f64.float(),
        "scalar": torch.tensor(7.5, dtype=torch.float32),
        "empty": torch.zeros(0, 3, dtype=torch.float32),
        "steps": torch.arange(5, dtype=torch.int64),
        "n\u00e9e \"quoted\"": torch.ones(2, dtype=torch.float32),
    }
    write("dtypes.safetensors", pack(tensors, {"format": "pt", "note": "tab\there"}))


def bad_files(enc):
    ok = '"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'
    d8 = b"\0" * 8
    cases = {
        "bad_short": b"\x05\0\0\0",
        "bad_header_past_end": struct.pack("<Q", 1000) + b'{"a":{}}',
        "bad_header_huge": struct.pack("<Q", 1 << 62) + b"{}",
        "bad_not_json": with_header("PK\x03\x04 not json"),
        "bad_json_unclosed": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}', d8),
        "bad_json_trailing_comma": with_header('{' + ok + ',}', d8),
        "bad_json_escape": with_header('{"a\\q":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', d8),
        "bad_json_control": with_header('{"a\tb":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', d8),
        "bad_json_after": with_header('{' + ok + '} x', d8),
        "bad_json_leading_zero": with_header('{"a":{"dtype":"F32","shape":[02],"data_offsets":[0,8]}}', d8),
        "bad_utf8": with_header(b'{"a\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', d8),
        "bad_negative_dim": with_header('{"a":{"dtype":"F32","shape":[-2],"data_offsets":[0,8]}}', d8),
        "bad_float_dim": with_header('{"a":{"dtype":"F32","shape":[2.0],"data_offsets":[0,8]}}', d8),
        "bad_too_many_dims": with_header('{"a":{"dtype":"F32","shape":[1,1,1,1,1,1,1,1,2],'
                                         '"data_offsets":[0,8]}}', d8),
        "bad_dtype": with_header('{"a":{"dtype":"F33","shape":[2],"data_offsets":[0,8]}}', d8),
        "bad_missing_field": with_header('{"a":{"dtype":"F32","data_offsets":[0,8]}}', d8),
        "bad_unknown_field": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":1}}', d8),
        "bad_offsets_three": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8,8]}}', d8),
        "bad_offsets_reversed": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}', d8),
        "bad_offsets_past_end": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 4),
        "bad_offsets_size": with_header('{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}', d8),
        "bad_overlap": with_header('{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                                   '"b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', d8),
        "bad_hole": with_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', d8),
        "bad_trailing_data": with_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', d8),
        "bad_duplicate": with_header('{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
                                     '"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', d8),
        "bad_metadata_value": with_header('{"__metadata__":{"n":3},' + ok + '}', d8),
        "bad_shape_overflow": with_header('{"a":{"dtype":"F64","shape":[4294967296,4294967296],'
                                          '"data_offsets":[0,8]}}', d8),
    }
    for name, data in cases.items():
        write(name + ".safetensors", data)

    # loads, but the module helper must name what is wrong
    t = {k: v for k, v in enc.items() if k.startswith("layers.0.")}
    t["layers.0.self_attn.out_proj.bias"] = torch.zeros(17)             # misshaped
    write("bad_module_shape.safetensors", pack(t))
    t = {k: v for k, v in enc.items() if k.startswith("layers.0.") and "linear2.weight" not in k}
    write("bad_module_missing.safetensors", pack(t))
    t = {k: v for k, v in enc.items() if k.startswith("layers.0.")}
    t["layers.0.norm1.weight"] = torch.ones(16, dtype=torch.int64)       # a dtype that is not read
    write("bad_module_dtype.safetensors", pack(t))


def main():
    os.makedirs(OUT, exist_ok=True)
    enc = encoder_file()
    mha_file()
    dtypes_file()
    bad_files(enc)


if __name__ == "__main__":
    main()
