# Writes the .npy fixtures tests/test_npy.c reads.  Run from the repo root:
#   /usr/bin/python3 tests/data/npy/make_fixtures.py
# Needs numpy and torch (Debian: python3-numpy python3-torch).
import io
import numpy as np
import torch

D = "tests/data/npy/"
ramp = (np.arange(24, dtype=np.float64) / 23.0).reshape(2, 3, 4)   # value i/23 at flat index i

np.save(D + "ramp_f4.npy", ramp.astype("<f4"))                      # format 1.0, float32
np.save(D + "ramp_f8.npy", ramp.astype("<f8"))                      # format 1.0, float64
with open(D + "ramp_v2.npy", "wb") as f:                            # format 2.0
    np.lib.format.write_array(f, ramp.astype("<f4"), version=(2, 0))
np.save(D + "ramp_2d.npy", ramp[0].astype("<f4"))                   # [3, 4]
np.save(D + "ramp_4d.npy", ramp.reshape(1, 2, 3, 4).astype("<f4"))  # [1, 2, 3, 4]

# files numpy writes happily but the reader must refuse
np.save(D + "bad_fortran.npy", np.asfortranarray(ramp[0].astype("<f4")))
np.save(D + "bad_bigendian.npy", ramp.astype(">f4"))
np.save(D + "bad_int64.npy", np.arange(12, dtype="<i8").reshape(3, 4))
np.save(D + "bad_float16.npy", ramp.astype("<f2"))
np.save(D + "bad_1d.npy", np.arange(5, dtype="<f4"))
np.save(D + "bad_empty.npy", np.zeros((0, 4), dtype="<f4"))
torch.save(torch.zeros(2, 2), D + "bad_torch_save.pt")

# real attention weights from torch.nn.MultiheadAttention, causal, per head
torch.manual_seed(7)
L, E, H = 5, 8, 2
x = torch.randn(1, L, E)
mha = torch.nn.MultiheadAttention(E, H, batch_first=True)
mask = torch.triu(torch.ones(L, L, dtype=torch.bool), 1)
with torch.no_grad():
    _, w = mha(x, x, x, attn_mask=mask, average_attn_weights=False)   # [1, H, L, L]
np.save(D + "torch_causal_f4.npy", w.numpy())
np.save(D + "torch_causal_f8.npy", w.double().numpy())
with open(D + "tokens5.txt", "w") as f:
    f.write("we\nsaw\nthe\nred\nfox\n")
