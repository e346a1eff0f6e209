#!/usr/bin/env python3
"""Time torch.nn.MultiheadAttention on the shapes of `make bench`.

    OPENBLAS_NUM_THREADS=T OMP_NUM_THREADS=T python3 bench/torch_mha.py --threads T [B,L ...]

E = 512, H = 8, batch_first, eval mode under torch.inference_mode(), self
attention mha(x, x, x).  Prints one line per shape and weights setting:
    torch B L threads need_weights median_ms
need_weights=0 is PyTorch's fused fast path (no weights returned);
need_weights=1 returns the head-averaged weights like mha.h's unfused path.
With one thread the time is the process's CPU time (a shared machine does
not inflate it), with more the wall clock: the same clocks as bench_mha.
bench/bench_mha.c runs this script and prints the ratios.

With --train (table 5 of bench_mha), training mode with dropout 0 and autograd:
    torchtrain fwdbwd B L threads median_ms    mha(x, x, x) forward, then
        backward of (out * dy).sum() into x.grad and every weight's .grad
    torchtrain encstep 8 128 threads median_ms  nn.TransformerEncoderLayer(512, 8,
        2048, dropout=0, batch_first=True): forward, backward, torch.optim.AdamW step
"""
import os
import sys
import time

SHAPES = [(1, 128), (8, 128), (1, 512), (1, 2048), (4, 1024)]
TRAIN_SHAPES = [(1, 128), (8, 128), (1, 512), (1, 2048)]


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def time_call(fn, clock, min_reps=5, max_reps=50, budget=1.0):
    fn()  # warm up
    times = []
    start = clock()
    while len(times) < max_reps and (len(times) < min_reps or clock() - start < budget):
        t0 = clock()
        fn()
        times.append(clock() - t0)
    return median(times)


def train(torch, threads, clock):
    E, H, F = 512, 8, 2048
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True, dropout=0.0).train()
    for B, L in TRAIN_SHAPES:
        x = torch.randn(B, L, E, requires_grad=True)
        dy = torch.randn(B, L, E)

        def step():
            mha.zero_grad(set_to_none=False)
            x.grad = None
            out, _ = mha(x, x, x, need_weights=False)
            out.backward(dy)
        ms = 1e3 * time_call(step, clock)
        print(f"torchtrain fwdbwd {B} {L} {threads} {ms:.4f}", flush=True)
    layer = torch.nn.TransformerEncoderLayer(E, H, F, dropout=0.0, batch_first=True).train()
    opt = torch.optim.AdamW(layer.parameters())
    x = torch.randn(8, 128, E)
    dy = torch.randn(8, 128, E)

    def enc_step():
        opt.zero_grad(set_to_none=False)
        layer(x).backward(dy)
        opt.step()
    ms = 1e3 * time_call(enc_step, clock)
    print(f"torchtrain encstep 8 128 {threads} {ms:.4f}", flush=True)


def main():
    args = sys.argv[1:]
    threads = 1
    if len(args) >= 2 and args[0] == "--threads":
        threads = int(args[1])
        args = args[2:]
    do_train = "--train" in args
    args = [a for a in args if a != "--train"]
    shapes = [tuple(int(v) for v in a.split(",")) for a in args] or SHAPES
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(var) != str(threads):
            print(f"# warning: {var} is {os.environ.get(var)!r}, not {threads}", file=sys.stderr)
    import torch
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    E, H = 512, 8
    mha = torch.nn.MultiheadAttention(E, H, batch_first=True).eval()
    clock = time.process_time if threads == 1 else time.perf_counter
    if do_train:
        train(torch, threads, clock)
        return
    with torch.inference_mode():
        for B, L in shapes:
            x = torch.randn(B, L, E)
            for need in (0, 1):
                ms = 1e3 * time_call(lambda: mha(x, x, x, need_weights=bool(need)), clock)
                print(f"torch {B} {L} {threads} {need} {ms:.4f}", flush=True)


if __name__ == "__main__":
    main()
