"""How long the top-k forward keeps the GPU waiting for the host, on the GPU.

The top-k forward (16 blocks of 128, ``backend="triton"``; B = 1, H = 32, Hkv = 8, D = 128, bf16,
T = 65536 by default) is timed two ways: as ``suite.py`` does (CUDA events around the call on an
idle GPU), and pre-queued (a 10 ms spin kernel runs first, so the host has queued the whole call
before the start event executes). The difference is the time the GPU spends waiting for the
host's launches. Then one pre-queued call's kernels are listed (start offset and CUPTI
duration), and the host time at which each stage of the call begins and ends (``--marks``:
wrappers around the stages, median of 30 calls, microseconds from the call's start; the
wrappers add about a microsecond each).

    python3 benchmarks/host_wait.py [--marks] [--ab 5] > $OUT/host_wait.txt
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _timing import median_ms
from torch.profiler import ProfilerActivity, profile

import longattn


PRE_QUEUE_CYCLES = 20_000_000  # about 10 ms of GPU work ahead of the call


def host_marks(fn, reps: int = 30) -> list[tuple[str, float]]:
    """Median host time (us from the call's start) of the entry (>) and exit (<) of each stage."""
    import triton.runtime.jit as tjit

    import longattn.api as api
    import longattn.kernels.block_sparse as bsp
    import longattn.kernels.nsa as nsa
    import longattn.methods._common as common
    import longattn.methods.topk as topk
    from longattn.kernels.launch import FastKernel

    marks: list[tuple[str, float]] = []
    saved = []

    def wrap(mod, name):
        fn0 = getattr(mod, name)
        saved.append((mod, name, fn0))

        def w(*a, **kw):
            marks.append((name + " >", time.perf_counter()))
            r = fn0(*a, **kw)
            marks.append((name + " <", time.perf_counter()))
            return r
        setattr(mod, name, w)

    for mod, name in ((api, "validate_inputs"), (api, "resolve_backend"), (common, "pooled_queries"),
                      (common, "pooled_keys"), (topk, "pooled_block_scores"), (nsa, "rank_blocks"),
                      (bsp, "_unchecked_block_sparse_attention"), (bsp, "_forward"), (api, "nonfinite_flags")):
        wrap(mod, name)
    run0 = tjit.JITFunction.run
    launch0 = FastKernel.launch

    def run(self, *a, **kw):
        marks.append(("triton run " + self.__name__ + " >", time.perf_counter()))
        r = run0(self, *a, **kw)
        marks.append(("triton run " + self.__name__ + " <", time.perf_counter()))
        return r

    def launch(self, *a, **kw):
        marks.append(("launch " + self.fn.__name__ + " >", time.perf_counter()))
        r = launch0(self, *a, **kw)
        marks.append(("launch " + self.fn.__name__ + " <", time.perf_counter()))
        return r
    tjit.JITFunction.run = run
    FastKernel.launch = launch
    try:
        fn()
        torch.cuda.synchronize()
        rows = []
        for _ in range(reps):
            marks.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            t1 = time.perf_counter()
            rows.append([(label, (t - t0) * 1e6) for label, t in marks] + [("return", (t1 - t0) * 1e6)])
    finally:
        tjit.JITFunction.run = run0
        FastKernel.launch = launch0
        for mod, name, fn0 in saved:
            setattr(mod, name, fn0)
    return [(label, statistics.median(r[i][1] for r in rows)) for i, (label, _) in enumerate(rows[0])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--marks", action="store_true")
    ap.add_argument("--ab", type=int, default=0,
                    help="rounds of timing (as suite.py does) with longattn's fast kernel launches on, then off "
                         "(every launch through Triton's own path)")
    args = ap.parse_args()
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(1, h, args.T, 128, device="cuda", dtype=torch.bfloat16, generator=g) for h in (32, 8, 8))
    fn = lambda: longattn.attention(q, k, v, method="topk", block_size=128, top_k=16, backend="triton")  # noqa: E731
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    print(f"timed as suite.py does: {median_ms(fn, 20):.3f} ms; pre-queued: "
          f"{median_ms(fn, 20, pre_queue_cycles=PRE_QUEUE_CYCLES):.3f} ms")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        torch.cuda._sleep(PRE_QUEUE_CYCLES)
        fn()
        torch.cuda.synchronize()
    ev = sorted((e for e in prof.events() if e.device_type.name == "CUDA" and e.device_time > 0
                 and "spin" not in e.name), key=lambda e: e.time_range.start)
    t0 = ev[0].time_range.start
    print("start us  duration us  kernel (one pre-queued call)")
    for e in ev:
        print(f"{e.time_range.start - t0:9.1f} {e.device_time:12.1f}  {e.name[:90]}")
    from longattn.kernels.launch import _FAST, FastKernel

    if args.ab:
        launch0 = FastKernel.launch
        rows = {"fast launches": [], "Triton's own launches": []}
        for _ in range(args.ab):
            for label in rows:
                if label != "fast launches":
                    FastKernel.launch = lambda self, grid, a, kw: self._slow(grid, a, kw, "disabled")
                fn()
                rows[label].append(median_ms(fn, 20))
                FastKernel.launch = launch0
        for label, ms in rows.items():
            print(f"{label}: median {statistics.median(ms):.3f} ms over {len(ms)} rounds "
                  f"({', '.join(f'{m:.3f}' for m in ms)})")
    for fk in _FAST.values():
        print(f"{fk.fn.__name__}: {fk.slow_launches} launches through Triton's own path, the last for {fk.last_slow!r}")
    if args.marks:
        print("host us from the call's start (median of 30 calls)")
        for label, t in host_marks(fn):
            print(f"{t:9.1f}  {label}")


if __name__ == "__main__":
    main()
