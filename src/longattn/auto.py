"""How ``backend="auto"`` orders the backends: per method, mode (inference or training) and key
length, the path measured fastest on an NVIDIA H200 (``docs/benchmarks.md``, section "auto").

Measured with B = 1, H = 32, Hkv = 8, D = 128, bf16, causal prefill, each method at the
configuration the benchmark suite uses (top-k 16 of 128-token blocks, MoBA and NSA paper
defaults, window 4096): ``benchmarks/suite.py`` runs of 2026-11-29 (64k, 128k) and 2026-11-30
(2k-32k, top-k backward at 64k), in ``docs/results/``, and ``benchmarks/auto_check.py`` (256-16k,
every backend beside what ``auto`` chose). Between measured lengths the step at or below the length
applies; below the shortest measured length (256), the first step. ``sdpa`` for a sparse method is
dense SDPA under its materialised token mask: on CUDA it declines past
``longattn.backends.dense.DENSE_MASK_MAX_BYTES`` (1 GiB: about 3.3k tokens at B = 1, H = 32 in
bf16, 2.6k in fp32), and the next backend in the order serves. So where the table puts ``sdpa``
first up to a longer length (``window`` in training up to 4k, ``moba``), the cap decides the
switch at B = 1, H = 32: ours from about 3.3k. A backend that cannot
serve an input is skipped; the reference is always last.

Methods not listed (``full``) keep ``sdpa``, then ``flex``. For at most :data:`SMALL_QUERY` queries (decoding, small chunks: compiled
FlexAttention would recompile for every new key length) the order is ``sdpa``, then on CUDA
``triton`` (past the mask cap: a 16-query mask over a million keys), then the reference. On CPU:
``sdpa``, then the reference.
"""

from __future__ import annotations

from .registry import AttnInputs, MethodSpec

SMALL_QUERY = 16

Order = tuple[str, ...]
Steps = tuple[tuple[int, Order], ...]

_MASK_FIRST: Order = ("sdpa", "triton", "flex")
_OURS_FIRST: Order = ("triton", "flex", "sdpa")

#: method -> mode ("infer": no autograd, "train": forward + backward) -> steps (from key length, order)
GPU_STEPS: dict[str, dict[str, Steps]] = {
    # fwd: masked 1.61 / 1.76 ms vs ours 2.50 / 1.98 at 256 / 512 (auto_check 2026-11-30 11:2x);
    # ours 1.38 ms vs masked 3.13 at 2k (2.17 vs 2.36 at 1k), ahead of Flex at 4k-64k (2.09 vs
    # 3.35 ... 10.13 vs 11.88). fwd+bwd: masked 2.68 / 3.15 vs ours 3.63 / 4.51 at 256 / 512; ours
    # 2.68 vs masked 3.85 at 2k (3.12 vs 3.47 at 1k); ours vs Flex 5.56 vs 5.73 at 8k, 8.48 vs 9.56
    # at 16k, but 29.6 vs 27.4 at 64k (bwd 19.50 vs 15.54)
    "topk": {"infer": ((0, _MASK_FIRST), (1024, _OURS_FIRST)),
             "train": ((0, _MASK_FIRST), (1024, _OURS_FIRST), (65536, ("flex", "triton", "sdpa")))},
    # fwd: ours 0.79 / 1.32 vs masked 1.67 / 1.83 at 256 / 512, equal at 1k (1.43 vs 1.44), ours
    # 0.75 vs masked 1.09 at 2k, ours 5.72 vs Flex 7.96 at 32k
    # fwd+bwd: masked 1.97 / 2.08 vs ours 3.45 / 3.24 at 256 / 512, masked 1.77 vs ours 2.39 at 2k;
    # ours 3.12 vs masked 3.78 at 4k; ours 24.1 vs Flex 23.9 at 32k
    "window": {"infer": ((0, _OURS_FIRST),),
               "train": ((0, _MASK_FIRST), (4096, _OURS_FIRST))},
    # sink 4 + window 1020 (defaults), auto_check 2026-11-30: fwd ours 0.89 / 0.98 / 1.01 / 1.38 /
    # 2.19 ms vs masked 1.20 / 1.14 / 1.41 at 512 / 1k / 2k and Flex 4.01 / 4.63 at 4k / 16k;
    # fwd+bwd masked 2.30 / 2.18 / 2.69 vs ours 2.91 / 2.38 / 2.94 at 512 / 1k / 2k, ours 2.93 /
    # 7.84 vs Flex 4.55 / 9.14 at 4k / 16k
    "sink": {"infer": ((0, _OURS_FIRST),),
             "train": ((0, _MASK_FIRST), (4096, _OURS_FIRST))},
    # BigBird defaults (block 64; 3 window, 2 global, 3 random blocks), auto_check 2026-11-30: fwd
    # masked 1.49 vs ours 1.69 at 1k (2.28 vs 1.86 at 512: noise at this size), ours 1.30 vs masked
    # 3.22 at 2k, ours 1.23 / 1.62 vs Flex 3.41 / 4.65 at 4k / 16k; fwd+bwd masked 2.81 vs ours
    # 3.82 at 512, ours 2.90 vs masked 3.07 at 1k, 3.03 vs 3.49 at 2k, ours 3.75 / 6.85 vs Flex
    # 6.11 / 11.18 at 4k / 16k
    "bigbird": {"infer": ((0, _MASK_FIRST), (2048, _OURS_FIRST)),
                "train": ((0, _MASK_FIRST), (1024, _OURS_FIRST))},
    # per-token gates: masked SDPA while it fits (its cap stops it at about 3.3k), then ours since
    # the kernels run per-token selections key-major (2026-11-30 14:1x UTC): suite fwd / bwd 4.44 / 5.33
    # ms at 8k, 15.9 / 13.7 at 32k, 38.5 / 26.5 at 64k, against Flex 60.8 / 84.2 at 32k (before:
    # ours 124.0 / 259.4 at 32k, behind Flex); auto_check at 2k-16k: docs/benchmarks.md, "auto"
    "moba": {"infer": ((0, _MASK_FIRST),),
             "train": ((0, _MASK_FIRST),)},
    # NSA's own kernels: fwd 68.3 ms vs Flex 284.1 at 32k, 216.9 vs 1224 at 64k; training (kernels
    # with their backward, 2026-11-30) fwd+bwd 740.8 ms at 64k vs Flex 2754 (chunked scan: 2242)
    "nsa": {"infer": ((0, ("triton", "flex")),), "train": ((0, ("triton", "flex")),)},
}

_DEFAULT_GPU: Order = ("sdpa", "flex")
_SMALL: Order = ("sdpa",)
_SMALL_GPU: Order = ("sdpa", "triton")


def auto_order(spec: MethodSpec, inputs: AttnInputs) -> list[str]:
    """The backends ``auto`` tries for ``inputs``, in order (only those ``spec`` has)."""
    if inputs.q.device.type != "cuda":
        order = _SMALL
    elif inputs.q_len <= SMALL_QUERY:
        order = _SMALL_GPU
    else:
        steps = GPU_STEPS.get(spec.name, {}).get("train" if inputs.needs_grad else "infer")
        if steps:
            order = steps[0][1]
            for start, o in steps:
                if inputs.kv_len >= start:
                    order = o
        else:
            order = _DEFAULT_GPU
    have = spec.all_backends()
    return [b for b in (*order, "reference") if b in have]
