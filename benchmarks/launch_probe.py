"""Where a warm Triton launch spends its host time, on the GPU machine: the top-k forward at 64k
(B = 1, H = 32, Hkv = 8, D = 128, bf16) is called 30 times with timing wrappers around the pieces
``JITFunction.run`` calls -- the current device and stream, the argument binder (binding and
specialisation), ``compute_cache_key``, the compiled kernel's ``launch_metadata`` and its C
launcher -- and around ``run`` itself; per kernel, the median microseconds of each piece per
launch and the rest of ``run`` (grid, global-value check, Python glue). longattn's own launch
path (``longattn.kernels.launch``, which skips ``JITFunction.run`` once a kernel is warm) is
turned off here, so every launch goes through Triton's; ``host_wait.py --ab`` times the two.

    python3 benchmarks/launch_probe.py > $OUT/launch_probe.txt
"""
import statistics
import sys
import time
from collections import defaultdict

import torch
import triton.runtime.jit as jit
from triton.compiler.compiler import CompiledKernel
from triton.runtime.driver import driver

import longattn
from longattn.kernels.launch import FastKernel

sys.path.insert(0, "benchmarks")
from _inputs import prefill_qkv  # noqa: E402

spent: dict[str, float] = defaultdict(float)  # piece -> us, for the launch in progress


def timed(piece, fn):
    def wrapper(*a, **kw):
        t = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            spent[piece] += 1e6 * (time.perf_counter() - t)
    return wrapper


def main() -> None:
    FastKernel.launch = lambda self, grid, args, kwargs: self._slow(grid, args, kwargs, "launch_probe")
    q, k, v = prefill_qkv(65536)  # the same seeded tensors the other 64k scripts time
    f = lambda: longattn.attention(q, k, v, method="topk", block_size=128, top_k=16, backend="triton")  # noqa: E731
    for _ in range(3):  # compile and load every kernel first
        f()
    torch.cuda.synchronize()

    active = driver.active
    for name in ("get_current_device", "get_current_stream"):
        setattr(active, name, timed("device+stream", getattr(active, name)))
    jit.compute_cache_key = timed("cache key", jit.compute_cache_key)
    CompiledKernel.launch_metadata = timed("launch metadata", CompiledKernel.launch_metadata)
    per_launch: dict[str, list[dict[str, float]]] = defaultdict(list)
    real_run = jit.JITFunction.run

    def run(self, *a, **kw):
        if not getattr(self, "_probe_wrapped", False):  # the binder and the launchers of this kernel
            for device, (cache, key_cache, target, backend, binder) in list(self.device_caches.items()):
                self.device_caches[device] = (cache, key_cache, target, backend, timed("binder", binder))
                for compiled in cache.values():  # ``run`` is a property over ``_run``, set on first use
                    compiled._run = timed("C launcher", compiled.run)
            self._probe_wrapped = True
        spent.clear()
        t = time.perf_counter()
        out = real_run(self, *a, **kw)
        total = 1e6 * (time.perf_counter() - t)
        parts = dict(spent)
        parts["rest of run"] = total - sum(parts.values())
        parts["total"] = total
        per_launch[self.__name__].append(parts)
        return out

    jit.JITFunction.run = run
    f()  # wraps the binders and launchers
    torch.cuda.synchronize()
    per_launch.clear()
    for _ in range(30):
        f()
        torch.cuda.synchronize()
    print("median us per launch (30 calls of the top-k forward at 64k)")
    for name, rows in per_launch.items():
        pieces = sorted({p for r in rows for p in r}, key=lambda p: (p == "total", p))
        print(f"{name}: " + ", ".join(f"{p} {statistics.median(r.get(p, 0.0) for r in rows):.1f}" for p in pieces))


if __name__ == "__main__":
    main()
