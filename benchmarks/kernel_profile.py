"""Kernel-level profile of one call on the GPU (``torch.profiler``, CUDA time per kernel):
``nsa``, ``moba``, ``window`` as a training step (forward + backward of
``longattn.attention(..., backend="triton")`` for a random output gradient), ``topk`` as a
forward (16 blocks of 128). B = 1, H = 32, Hkv = 8, D = 128, bf16, T = 65536. Prints each call's
median time (CUDA events, 5 calls) and the kernel table sorted by CUDA time.

    python3 benchmarks/kernel_profile.py nsa topk > $OUT/kernel_profile.txt
"""

from __future__ import annotations

import sys

import torch
from _timing import median_ms
from torch.profiler import ProfilerActivity, profile

import longattn


def main() -> None:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    T = 65536
    q, k, v = (torch.randn(1, h, T, 128, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (32, 8, 8))
    do = torch.randn_like(q)
    for name in sys.argv[1:] or ["nsa", "topk"]:
        if name in ("nsa", "moba", "window"):
            def f(name=name):
                return torch.autograd.grad(longattn.attention(q, k, v, method=name, backend="triton"), (q, k, v), do)
        elif name == "topk":
            def f():
                return longattn.attention(q.detach(), k.detach(), v.detach(), method="topk", backend="triton",
                                          block_size=128, top_k=16)
        else:
            raise SystemExit(f"unknown case {name!r}: nsa, moba, window or topk")
        print(name, "median ms", median_ms(f, 5), flush=True)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            f()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=30, max_name_column_width=70),
              flush=True)


if __name__ == "__main__":
    main()
