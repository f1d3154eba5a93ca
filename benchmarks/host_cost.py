"""Host-side cost of the top-k forward (16 blocks of 128, ``backend="triton"``) on the GPU: the
call's median time by CUDA events, the host time of one call (from a synchronised start to its
return; the call ends by reading the finiteness check, so it includes waiting for the GPU), and
a cProfile of 10 calls (by own time and by cumulative time). B = 1, H = 32, Hkv = 8, D = 128, bf16.

    python3 benchmarks/host_cost.py 65536 > $OUT/host_cost.txt
"""

from __future__ import annotations

import cProfile
import io
import pstats
import sys
import time

import torch
from _timing import median_ms

import longattn


def main() -> None:
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
    q, k, v = (torch.randn(1, h, T, 128, device=dev, dtype=torch.bfloat16, generator=g) for h in (32, 8, 8))

    def f():
        return longattn.attention(q, k, v, method="topk", backend="triton", block_size=128, top_k=16)

    for _ in range(3):
        f()
    torch.cuda.synchronize()
    print("event median ms", median_ms(f, 10))
    host = []
    for _ in range(10):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        f()
        host.append((time.perf_counter() - t0) * 1e3)
    print("host ms per call (incl. the final finiteness read)", sorted(host)[5])
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(10):
        f()
    torch.cuda.synchronize()
    pr.disable()
    for key, n in (("tottime", 30), ("cumtime", 40)):
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats(key).print_stats(n)
        print(s.getvalue())


if __name__ == "__main__":
    main()
