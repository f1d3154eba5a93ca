"""Benchmark suite: our kernels, FlexAttention and dense SDPA (cuDNN, FlashAttention), timed in one
process on one GPU, for prefill forward, prefill backward and decoding.

On the GPU machine, from the repository root (one call; the default budget stops cleanly at 480 s):

    LONGATTN_COMMIT=$(git rev-parse --short HEAD) python3 benchmarks/suite.py --out $OUT
    python3 benchmarks/suite.py --out $OUT --quick                 # 8k and 64k, Hkv 8
    python3 benchmarks/suite.py --out $OUT --sizes 64k,128k --hkv 8 --methods full,topk,nsa --ops fwd,bwd
    python3 benchmarks/suite.py --out $OUT --plan                  # the ordered cases and estimated seconds; runs nothing
    python3 benchmarks/render.py --in $OUT/suite.jsonl             # docs/benchmarks.md section + docs/benchmarks.json

CPU smoke (tiny shapes: H=4, Hkv=2, D=64; exercises every code path with the back ends a CPU has;
our Triton kernels run only under TRITON_INTERPRET=1, slowly; used by tests/test_benchmark_suite.py):

    TRITON_INTERPRET=0 python benchmarks/suite.py --device cpu --sizes 256 --quick --out /tmp/suite

On the device machine, pass the commit in LONGATTN_COMMIT (it lands in every record and wins over
git, whose metadata in the device's copy of the tree can be stale).

What is timed (B=1, H=32, Hkv in {8, 32}, D=128, bf16, causal, T in {8k, 16k, 32k, 64k, 128k}):

* ``fwd`` / ``bwd`` (prefill): per method (``--methods``: topk = top-16 of 128-token blocks,
  topk-shared = the same shared by a GQA group, nsa and moba = paper defaults, nsa-bf16 = NSA
  with its compressed tokens in the inputs' dtype, moba-g128 = MoBA gated per 128 queries,
  window = 4096, full = dense) and back end: ``ours``
  (``longattn.attention(..., backend="triton")``), ``flex`` (the same selection through
  FlexAttention, compiled), ``sdpa-cudnn`` / ``sdpa-flash`` (dense causal SDPA restricted to one
  back end; GQA through ``enable_gqa`` where the back end takes it, else K/V expanded to H heads
  outside the timing, recorded as ``kv_layout``). The forward runs without autograd; the backward
  is timed alone: one forward with grad, then ``torch.autograd.grad(..., retain_graph=True)``.
* ``decode``: one query token per sequence over a cache of T tokens, B=1 and B=4 with lengths
  T, 3T/4, T/2, T/4 (``--decode-lengths fixed``: T each): dense SDPA over the cache (B=4: one call
  per sequence over its own length; fixed lengths: one batched call),
  and ``longattn.decode.sparse_decode`` with a 4096-token budget chosen by ``select_topk_blocks``
  (128-token blocks) or ``select_quest_pages`` (16-token pages): ``select`` (from the cache
  summaries a cache keeps up to date), ``attend`` (given the selection; ``validate=False``, the
  hot-loop setting), ``both``, and ``summary`` (computing the summaries from the whole cache);
  and NSA's decoding rule (``longattn.decode_nsa.nsa_decode``, paper defaults, ``validate=False``)
  as one ``both`` case over the compressed tokens a cache keeps: ``nsa`` with fp32 tokens (what
  the mean compression gives), ``nsa-bf16`` with bf16 ones (a cache in the model's dtype).
  Decode cases are also timed as CUDA-graph replays (``graph_ms``) where capture works.

Per case: median ms of n CUDA-event-timed runs (L2 flushed before each; warm-up and compilation
excluded; n from 5 to 50, fewer when one run is slow), effective TFLOP/s, bytes moved (floor
estimate), peak memory, speed-up over cuDNN dense of the same shape, and distance from the floor
max(FLOPs / matmul rate, bytes / copy bandwidth), both ceilings measured at the start of the run.
Every path is checked once at T=4096 against the fp32 reference before it is timed (``gate-*``
records); a failing path is not timed. Sparse paths record their peak against one T x T score
matrix (``tt_check_ok``: memory allocated during the call < B*H*T*T*2 bytes / 8).

Results: one JSON line per case in ``--out``/suite.jsonl as each finishes. A rerun with the same
``--out`` skips recorded cases (resume after a crash or a time-out; ``--redo failed,skipped``
re-runs those); a case during which a previous run died is recorded as failed, not retried.
``--max-seconds`` (default 480) stops cleanly before the device call's wall-clock limit: a case
whose estimate does not fit is not started (and not recorded, so a rerun does it), and an alarm 30 s
after the budget stops a case that overruns its estimate (also left for a rerun). A short table is
printed last.

Cost: FlexAttention compiles once per mask family, shape and grad mode (estimated 8 s forward, 20 s
with backward; calibrated from the first calls of the run), so the default plan does not fit one
10-minute call: ``--plan`` shows the order and what fits. In order: 64k prefill at Hkv 8 (dense, ours,
flex for topk / moba / nsa), 128k decoding, then decoding at the other lengths, ours and dense at
the other lengths, Hkv 32, and FlexAttention at the other lengths.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.util
import json
import math
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
import traceback
import uuid
import warnings
from dataclasses import asdict, dataclass

START = time.monotonic()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (HERE, os.path.join(ROOT, "src")):
    if p not in sys.path:
        sys.path.insert(0, p)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import render  # noqa: E402  (benchmarks/render.py)
from _timing import graph_median_ms  # noqa: E402  (benchmarks/_timing.py)

# ---------------------------------------------------------------------- what is measured
PREFILL_METHODS: dict[str, tuple[str, dict]] = {  # label -> (registered method, config)
    "topk": ("topk", {"block_size": 128, "top_k": 16}),
    "nsa": ("nsa", {}),
    # compressed tokens rounded to the inputs' dtype, as a bf16 model (and the paper's kernels) hold them
    "nsa-bf16": ("nsa", {"compressed_dtype": "input"}),
    "moba-g128": ("moba", {"gate_block": 128}),
    "moba": ("moba", {}),
    "topk-shared": ("topk", {"block_size": 128, "top_k": 16, "shared_kv_heads": True}),
    "window": ("window", {"window": 4096}),
}
DECODE_SELECTORS = {  # label -> (function of longattn.decode, block argument name, block size)
    "topk": ("select_topk_blocks", "block_size", 128),
    "quest": ("select_quest_pages", "page_size", 16),
}
SUMMARY_FN = {"topk": "block_key_means", "quest": "page_bounds"}
# NSA's decoding rule (longattn.decode_nsa.nsa_decode, paper defaults): label -> dtype of the compressed
# tokens the cache keeps (fp32 as the mean compression gives them; bf16 as a cache in the model's dtype)
NSA_DECODE = {"nsa": "float32", "nsa-bf16": "bfloat16"}
ALL_METHODS = ["full", *PREFILL_METHODS, "quest"]
ALL_OPS = ("fwd", "bwd", "decode")
ALL_BACKENDS = ("ours", "flex", "sdpa-cudnn", "sdpa-flash", "dense-mask", "reference")
SPARSE_BACKENDS = ("ours", "flex", "dense-mask", "reference")
DENSE_BACKENDS = ("sdpa-cudnn", "sdpa-flash", "reference")
DECODE_PARTS = ("attend", "select", "both", "summary")
LONGATTN_BACKEND = {"ours": "triton", "flex": "flex", "dense-mask": "sdpa", "reference": "reference"}
# ``dense-mask`` (a sparse method's ``sdpa`` path: SDPA under its materialised [B, H, T, T] token
# mask) is what ``auto`` takes below the break-even length; the library declines it past
# longattn.backends.dense.DENSE_MASK_MAX_BYTES, the suite lifts that cap to this to find the
# break-even (16k at H = 32 in bf16 fits, 32k does not).
DENSE_MASK_SUITE_BYTES = 40 << 30
DEFAULT_SIZES = [8192, 16384, 32768, 65536, 131072]
QUICK_SIZES = [8192, 65536]
HEADLINE_T = 65536
TILE = 128  # query rows per kernel program assumed by the sparse byte floor
TOLERANCE_FLOOR = {"bfloat16": 2e-3, "float16": 2e-3, "float32": 2e-5}
REFERENCE_MAX_BYTES = 8 << 30  # the reference materialises B*H*T*T fp32 scores
FATAL_CUDA = ("illegal memory access", "device-side assert", "unspecified launch failure",
              "misaligned address", "an illegal instruction", "CUBLAS_STATUS_EXECUTION_FAILED")


# ---------------------------------------------------------------------- options
def parse_size(text: str) -> int:
    """``"8k" -> 8192``, ``"131072" -> 131072``."""
    s = text.strip().lower()
    try:
        value = int(float(s[:-1]) * 1024) if s.endswith("k") else int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; use e.g. 8k, 64k, 131072") from None
    if value < 16:
        raise argparse.ArgumentTypeError(f"size {text!r} must be >= 16 tokens")
    return value


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="benchmarks/suite.py", description="ours vs FlexAttention vs dense SDPA, one process",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", default=os.environ.get("OUT", "."),
                    help="folder for suite.jsonl (or a path ending in .jsonl); default $OUT or .")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--sizes", default=None, help="comma list of T, e.g. 8k,64k (default 8k..128k; --quick 8k,64k)")
    ap.add_argument("--hkv", default=None, help="comma list of KV heads (default 8,32; --quick 8)")
    ap.add_argument("--methods", default=None, help=f"comma list from {','.join(ALL_METHODS)} (default all)")
    ap.add_argument("--ops", default="fwd,bwd,decode", help="comma list from fwd,bwd,decode")
    ap.add_argument("--backends", default=None,
                    help=f"comma list from {','.join(ALL_BACKENDS)} (default all but reference; cpu: all)")
    ap.add_argument("--quick", action="store_true", help="small subset: 8k and 64k, Hkv 8")
    ap.add_argument("--max-seconds", type=float, default=480.0,
                    help="wall-clock budget from process start; cases that do not fit are left for a rerun (0: none)")
    ap.add_argument("--case-cap", type=float, default=25.0,
                    help="seconds of timed runs per case; a case predicted over it is skipped with the reason")
    ap.add_argument("--gate-len", type=int, default=None, help="T of the correctness gate (default 4096; cpu: smallest size)")
    ap.add_argument("--decode-budget", type=int, default=4096, help="tokens a sparse decoder reads per (sequence, KV head)")
    ap.add_argument("--decode-batch", default="1,4", help="decode batch sizes (B>1: lengths T, ..., T/B)")
    ap.add_argument("--decode-lengths", default="staggered", choices=["staggered", "fixed", "both"],
                    help="cache lengths of a decode batch: staggered T, ..., T/B (default), fixed (every "
                         "sequence T), or both")
    ap.add_argument("--heads", type=int, default=None, help="query heads H (default 32; cpu: 4)")
    ap.add_argument("--head-dim", type=int, default=None, help="head dim D (default 128; cpu: 64)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    ap.add_argument("--redo", default="", help="re-run recorded cases of these statuses: failed,skipped")
    ap.add_argument("--no-graphs", action="store_true", help="do not time decode cases as CUDA-graph replays")
    ap.add_argument("--plan", action="store_true", help="print the ordered cases with estimated seconds and exit")
    ap.add_argument("--seed", type=int, default=0)
    o = ap.parse_args(argv)

    if o.device is None:
        o.device = "cuda" if torch.cuda.is_available() else "cpu"
    if o.device not in ("cuda", "cpu"):
        ap.error(f"--device must be cuda or cpu, got {o.device!r}")
    if o.device == "cuda" and not torch.cuda.is_available() and not o.plan:
        ap.error("--device cuda: no CUDA device here (use --device cpu for the smoke run, or --plan)")
    cpu = o.device == "cpu"  # the CPU smoke run: tiny shapes that exercise every code path in seconds
    o.heads = o.heads or (4 if cpu else 32)
    o.head_dim = o.head_dim or (64 if cpu else 128)
    try:
        o.sizes = [parse_size(s) for s in _csv(o.sizes)] or list(QUICK_SIZES if o.quick else DEFAULT_SIZES)
        default_hkv = ([2] if cpu else [8]) if o.quick else ([2, 8] if cpu else [8, 32])
        o.hkv = [int(h) for h in _csv(o.hkv)] or default_hkv
        o.decode_batch = [int(b) for b in _csv(o.decode_batch)] or [1]
    except (ValueError, argparse.ArgumentTypeError) as exc:
        ap.error(str(exc))
    o.sizes = list(dict.fromkeys(o.sizes))
    o.methods = _csv(o.methods) or list(ALL_METHODS)
    o.ops = _csv(o.ops)
    o.backends = _csv(o.backends) or [b for b in ALL_BACKENDS if b != "reference" or o.device == "cpu"]
    o.redo = set(_csv(o.redo))
    for name, values, allowed in (("--methods", o.methods, ALL_METHODS), ("--ops", o.ops, ALL_OPS),
                                  ("--backends", o.backends, ALL_BACKENDS),
                                  ("--redo", o.redo, ("failed", "skipped"))):
        bad = [v for v in values if v not in allowed]
        if bad:
            ap.error(f"{name}: unknown {bad}; allowed: {','.join(allowed)}")
    for h in o.hkv:
        if h < 1 or o.heads % h:
            ap.error(f"--hkv {h} must divide --heads {o.heads}")
    if any(b < 1 for b in o.decode_batch):
        ap.error("--decode-batch values must be >= 1")
    if o.gate_len is None:
        o.gate_len = 4096 if o.device == "cuda" else min(4096, min(o.sizes))
    if o.decode_budget < 16:
        ap.error("--decode-budget must be >= 16")
    o.out_path = o.out if o.out.endswith(".jsonl") else os.path.join(o.out, "suite.jsonl")
    return o


# ---------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    op: str  # fwd | bwd | decode | gate-fwd | gate-bwd | gate-decode
    method: str  # label (PREFILL_METHODS / DECODE_SELECTORS / full)
    T: int  # prefill: sequence length; decode: longest cache
    B: int
    H: int
    Hkv: int
    D: int
    dtype: str
    backend: str  # ours | flex | sdpa-cudnn | sdpa-flash | reference
    part: str = ""  # decode of a sparse selector: attend | select | both | summary
    fixed: bool = False  # decode: every sequence of the batch holds T tokens (else T, ..., T/B)

    @property
    def case_id(self) -> str:
        fields = [self.op, self.method, f"T{self.T}", f"B{self.B}", f"H{self.H}", f"Hkv{self.Hkv}",
                  f"D{self.D}", self.dtype, self.backend, self.part]
        return "|".join(fields + (["fixed"] if self.fixed else []))

    @property
    def is_decode(self) -> bool:
        return self.op in ("decode", "gate-decode")

    @property
    def lengths(self) -> list[int]:
        return decode_lengths(self.T, self.B, self.fixed) if self.is_decode else [self.T] * self.B


def decode_lengths(T: int, B: int, fixed: bool = False) -> list[int]:
    """Cache lengths of a decode batch: T, then evenly smaller (B=4: T, 3T/4, T/2, T/4); with
    ``fixed``, T for every sequence."""
    if fixed:
        return [T] * B
    return [max(16, T * (B - i) // B) for i in range(B)]


def method_config(label: str, op: str, budget: int = 4096) -> tuple[str, dict]:
    """(registered method or decode selector, its config) of a case label."""
    if label == "full":
        return "full", {}
    if op in ("decode", "gate-decode"):
        if label in NSA_DECODE:
            return "nsa_decode", {"compressed_tokens": NSA_DECODE[label]}
        fn, arg, bs = DECODE_SELECTORS[label]
        return fn, {arg: bs, "top_k": max(1, budget // bs)}
    name, cfg = PREFILL_METHODS[label]
    return name, dict(cfg)


PRIMARY = ("topk", "moba-g128", "moba", "nsa")  # flex NSA last among them: its runs take seconds
SECONDARY = ("nsa-bf16", "topk-shared", "window")


def build_plan(o) -> list[Case]:
    """Every case of the options, most important first:

    1. the 64k prefill (fwd, bwd) at the first Hkv: dense SDPA, then ours for topk, moba, nsa;
    2. decoding at the longest cache (B=1, then B=4);
    3. FlexAttention at 64k for topk, moba, nsa (each new shape and mask costs compilations);
    4. topk-shared and window at 64k (ours, then flex);
    5. decoding at the other lengths; 6. dense and ours at the other lengths;
    7. the other Hkv at 64k (dense, ours) and its longest-cache decoding;
    8. FlexAttention at the other lengths; 9. the rest of the other Hkv.
    """
    sizes = sorted(o.sizes)
    head = HEADLINE_T if HEADLINE_T in sizes else sizes[-1]
    others = [t for t in sorted(sizes, reverse=True) if t != head]
    dec_head = sizes[-1]
    dec_others = [t for t in sorted(sizes, reverse=True) if t != dec_head]
    h0, hrest = o.hkv[0], o.hkv[1:]
    ops = [op for op in ("fwd", "bwd") if op in o.ops]
    mk = lambda op, m, T, B, hkv, be, part="", fixed=False: Case(op, m, T, B, o.heads, hkv, o.head_dim, o.dtype,
                                                                 be, part, fixed)
    rules = {"staggered": [False], "fixed": [True], "both": [False, True]}[o.decode_lengths]
    no_flex = ("ours", "sdpa-cudnn", "sdpa-flash", "dense-mask", "reference")

    def prefill(T: int, hkv: int, backends, methods=("full", *PRIMARY, *SECONDARY)) -> list[Case]:
        out = []
        for m in methods:
            if m not in o.methods:
                continue
            for be in (DENSE_BACKENDS if m == "full" else SPARSE_BACKENDS):
                if be in backends and be in o.backends:
                    out += [mk(op, m, T, 1, hkv, be) for op in ops]
        return out

    def decode(T: int, hkv: int) -> list[Case]:
        if "decode" not in o.ops:
            return []
        out = []
        for B in o.decode_batch:
            for fx in rules if B > 1 else [False]:  # B = 1: both rules are the same batch
                if "full" in o.methods:
                    out += [mk("decode", "full", T, B, hkv, be, "", fx) for be in DENSE_BACKENDS if be in o.backends]
                for m in DECODE_SELECTORS:
                    if m in o.methods:
                        out += [mk("decode", m, T, B, hkv, be, part, fx) for be in ("ours", "reference")
                                if be in o.backends for part in DECODE_PARTS]
                for m in NSA_DECODE:  # the whole step: compressed branch, selection, selected and window branches
                    if m in o.methods:
                        out += [mk("decode", m, T, B, hkv, be, "both", fx) for be in ("ours", "reference")
                                if be in o.backends]
        return out

    plan = prefill(head, h0, no_flex, ("full", *PRIMARY))
    plan += decode(dec_head, h0)
    plan += prefill(head, h0, ("flex",), PRIMARY)
    plan += prefill(head, h0, no_flex, SECONDARY) + prefill(head, h0, ("flex",), SECONDARY)
    for T in dec_others:
        plan += decode(T, h0)
    for T in others:
        plan += prefill(T, h0, no_flex)
    for h in hrest:
        plan += prefill(head, h, no_flex) + decode(dec_head, h)
    for T in others:
        plan += prefill(T, h0, ("flex",))
    for h in hrest:
        plan += prefill(head, h, ("flex",))
        for T in others:
            plan += prefill(T, h, no_flex)
        for T in dec_others:
            plan += decode(T, h)
        for T in others:
            plan += prefill(T, h, ("flex",))
    return list(dict.fromkeys(plan))


def gate_case(case: Case, o) -> Case:
    """The correctness gate a timed case needs: same path at T = gate length (decode: B = the
    largest decode batch, so varying lengths are checked; one gate covers every part)."""
    if case.is_decode:
        return Case("gate-decode", case.method, o.gate_len, max(o.decode_batch), case.H, case.Hkv, case.D,
                    case.dtype, case.backend, "")
    return Case("gate-" + case.op, case.method, o.gate_len, 1, case.H, case.Hkv, case.D, case.dtype,
                case.backend, "")


# ---------------------------------------------------------------------- counting (pure)
def causal_pairs(q_len: int, kv_len: int) -> int:
    """(query, key) pairs of causal attention, queries at the end of the keys."""
    return q_len * (kv_len - q_len + 1) + q_len * (q_len - 1) // 2


def prefill_flops(op: str, *, B: int, H: int, D: int, T: int, density: float = 1.0) -> float:
    """4*B*H*D per (query, key) pair read (QK^T and PV, 2 FLOPs per multiply-add), over the
    pairs the method reads (density x causal dense); backward 2.5x the forward."""
    fwd = 4.0 * B * H * D * density * causal_pairs(T, T)
    return fwd if op == "fwd" else 2.5 * fwd


def prefill_bytes(op: str, *, B: int, H: int, kv_heads: int, D: int, T: int, elt: int,
                  density: float = 1.0, sel_heads: int | None = None, tile: int = TILE) -> float:
    """Floor estimate of bytes moved. Dense (``sel_heads=None``): Q, K, V read and O written once
    (backward: Q, O, dO read, dQ written; K, V read, dK, dV written). Sparse: Q and O once, and the
    selected K/V keys read once per ``tile``-query tile and selection head (``sel_heads`` = H for
    per-head selections, Hkv when a GQA group shares one), at least K and V once."""
    qo = B * H * T * D * elt  # one [B, H, T, D] tensor
    kv_once = B * kv_heads * T * D * elt  # one [B, Hkv, T, D] tensor
    kv_read = kv_once
    if sel_heads is not None:
        kv_read = max(kv_once, density * causal_pairs(T, T) * B * sel_heads * D * elt / tile)
    if op == "fwd":
        return 2 * qo + 2 * kv_read
    return 4 * qo + 2 * kv_read + 2 * kv_once


def decode_attend_flops(D: int, head_keys: float) -> float:
    """``head_keys``: keys read summed over (sequence, query head); 4*D FLOPs per key."""
    return 4.0 * D * head_keys


def decode_attend_bytes(*, B: int, H: int, D: int, elt: int, kv_tokens: float) -> float:
    """``kv_tokens``: cached tokens read summed over (sequence, KV head read): K and V of each,
    plus q read and o written."""
    return 2.0 * kv_tokens * D * elt + 2.0 * B * H * D * elt


def floor_ms(flops: float, nbytes: float, rate: float | None, bandwidth: float | None) -> tuple[float | None, str | None]:
    """(max(FLOPs / matmul rate, bytes / bandwidth) in ms, which term bounds it)."""
    if not rate or not bandwidth:
        return None, None
    t_c, t_m = flops / rate, nbytes / bandwidth
    return max(t_c, t_m) * 1e3, ("compute" if t_c >= t_m else "memory")


def selected_tokens(block_indices, block_counts, cache_seqlens, block_size: int):
    """Tokens each ``(sequence, KV head)`` reads: the first ``counts`` selected blocks, clipped to
    the sequence length. ``[B, Hkv, K], [B, Hkv], [B] -> int64 [B, Hkv]``."""
    K = block_indices.shape[-1]
    valid = torch.arange(K, device=block_indices.device) < block_counts.long()[..., None]
    start = block_indices.long() * block_size
    n = (cache_seqlens.long()[:, None, None] - start).clamp(0, block_size)
    return torch.where(valid, n, 0).sum(-1)


def metrics(flops: float, nbytes: float, median_ms: float | None, ceilings: dict | None) -> dict:
    c = ceilings or {}
    fl, bound = floor_ms(flops, nbytes, c.get("matmul_flops_per_s"), c.get("copy_bytes_per_s"))
    out = {"flops": flops, "bytes": nbytes, "floor_ms": fl, "floor_bound": bound}
    if median_ms:
        out["tflops"] = flops / (median_ms * 1e-3) / 1e12
        out["x_floor"] = median_ms / fl if fl else None
    return out


# ---------------------------------------------------------------------- cost model (for the budget and --plan)
def density_guess(label: str, T: int) -> float:
    keys = {"topk": 2048, "topk-shared": 2048, "moba": 1536, "moba-g128": 1536, "window": 4096,
            "nsa": T / 32 + 1536, "nsa-bf16": T / 32 + 1536, "full": T}.get(label, T)
    return min(1.0, 2.0 * keys / T)


class CostModel:
    """Seconds a case will take on an H200, from BASELINE.md and the earlier flex run (compile
    costs included once per new compiled shape), refined by the times this run measures."""

    def __init__(self, o):
        self.o = o
        self.seen: set = set()
        self.measured: dict[tuple, list[tuple[int, float]]] = {}
        # seconds of one compilation: FlexAttention per new (mask family, shape, grad mode),
        # ours once per (method, part, grad mode); updated from the first calls this run sees
        self.compile_s = {("flex", "fwd"): 8.0, ("flex", "grad"): 20.0, ("ours", "fwd"): 3.0, ("ours", "grad"): 3.0}

    def path_key(self, c: Case) -> tuple:
        return (c.op, c.method, c.backend, c.part, c.Hkv, c.B, c.fixed)

    def predict_ms(self, c: Case) -> float:
        done = self.measured.get(self.path_key(c))
        if done:
            T0, ms0 = min(done, key=lambda x: abs(math.log(x[0] / c.T)))
            p = 1.0 if c.is_decode else (2.0 if c.method in ("full", "moba") or c.backend == "reference"
                                         else 1.7 if c.method.startswith("nsa") else 1.2)
            return ms0 * (c.T / T0) ** p
        return self.model_ms(c)

    def model_ms(self, c: Case) -> float:
        o, T, r = self.o, c.T, c.T / 65536
        scale = c.B * c.H / 32 * c.D / 128
        dense = prefill_flops("fwd", B=c.B, H=c.H, D=c.D, T=T) / 560e12 * 1e3
        if o.device == "cpu":
            nsa = 3 if c.method.startswith("nsa") else 1
            return 1e3 * prefill_flops("fwd", B=c.B, H=c.H, D=c.D, T=T) / 2e11 * nsa + 1
        if c.is_decode:
            tokens = sum(c.lengths)
            kv = 2 * tokens * c.Hkv * c.D * 2
            if c.method == "full":
                return (kv * (c.H / c.Hkv if c.backend == "sdpa-cudnn" else 1)) / 4.2e12 * 1e3 + 0.02 * c.B
            return {"attend": 0.04, "select": 0.15, "both": 0.2, "summary": kv / 2 / 2.5e12 * 1e3 + 0.05}[c.part]
        if c.backend == "reference":
            return 1e3 * 8 * c.B * c.H * T * T * 4 / 3e12
        if c.backend == "dense-mask":  # masked memory-efficient SDPA plus building the mask
            return 2 * dense * (3.0 if c.op == "bwd" else 1.0) + 1e3 * c.B * c.H * T * T * 3 / 2e12
        if c.method == "full":
            f = {"sdpa-cudnn": 1.0, "sdpa-flash": 1.77}[c.backend]
            return dense * f * ({"sdpa-cudnn": 2.83, "sdpa-flash": 2.65}[c.backend] if c.op == "bwd" else 1.0)
        if c.method.startswith("nsa"):
            flex = (907 if c.op == "fwd" else 2100) * r ** 1.67 * scale
            return flex if c.backend == "flex" else 0.15 * flex
        if c.method == "moba":
            flex = (242 if c.op == "fwd" else 308) * r ** 2 * scale
            return flex if c.backend == "flex" else 0.3 * flex
        d = density_guess(c.method, T)
        flex = 2.5 * d * dense * (2.5 if c.op == "bwd" else 1.0) + (4.0 * r + 0.3 if c.op == "fwd" else 0.3)
        return flex if c.backend == "flex" else 0.6 * flex

    def compile_keys(self, c: Case) -> list[tuple[tuple, float]]:
        """(key, seconds) of the compilations a case triggers the first time its key is seen."""
        if self.o.device == "cpu":
            return []
        mode = "grad" if c.op in ("bwd", "gate-bwd") else "fwd"
        if c.backend == "flex":
            fam = {"topk": "causal", "moba-g128": "causal", "topk-shared": "causal-group", "moba": "lookup",
                   "window": "band", "nsa": "nsa", "nsa-bf16": "nsa"}.get(c.method, c.method)
            cost = self.compile_s[("flex", mode)] * (2 if fam == "nsa" else 1)
            return [(("flex", fam, c.T, c.Hkv, mode), cost)]
        if c.backend == "ours":
            return [(("ours", c.method, c.part, mode), self.compile_s[("ours", mode)]),
                    (("ours", c.method, c.part, mode, c.T, c.Hkv, c.B), 0.5)]
        return []

    def calibrate(self, c: Case, new_keys: list[tuple], first_call_s: float | None, median_ms: float | None) -> None:
        """Move the compile estimate halfway to what a first call that compiled actually took."""
        if not new_keys or first_call_s is None or c.backend not in ("flex", "ours") or c.op not in ("fwd", "bwd"):
            return
        key = (c.backend, "grad" if c.op == "bwd" else "fwd")
        runs = (median_ms or 0) / 1e3 * (2.4 if c.op == "bwd" else 1.0)
        observed = max(0.2, first_call_s - runs) / (2 if c.method.startswith("nsa") and c.backend == "flex" else 1)
        if c.backend == "ours" and len(new_keys) == 1:  # only the per-shape specialisation was new
            return
        self.compile_s[key] = 0.5 * self.compile_s[key] + 0.5 * observed

    def runs_ms(self, c: Case, t: float) -> float:
        """Milliseconds of runs for a case whose one run takes ``t`` ms (see Runner.bench)."""
        n = reps_for(t, self.o.case_cap, self.o.device, c.is_decode)
        runs = 1 + 1 + n + 1 + (3 if t < 1 else 0)  # first, estimate, timed, peak, short warm-ups
        if c.op == "bwd":
            runs += 0.5  # the forward with grad
        return runs * t

    def estimate_s(self, c: Case, gate: Case | None) -> float:
        s = 0.3
        for key, cost in self.compile_keys(c):
            if key not in self.seen:
                s += cost
        if gate is not None and gate not in self.seen:
            s += 2.0 + (3.0 if c.method.startswith("nsa") else 0.0)
            for key, cost in self.compile_keys(gate):
                if key not in self.seen:
                    s += cost
        if ("inputs", c.T, c.B, c.Hkv, c.is_decode) not in self.seen:
            s += 0.2 + 0.5 * c.T / 65536
        if not c.is_decode and c.method != "full" and ("shape", c.method, c.T, c.Hkv) not in self.seen:
            s += 0.5 + (0.4 * (c.T / 65536) ** 1.7 if c.method.startswith("nsa")
                        else 1.5 * c.T / 65536 if c.method == "moba" else 0.1)
        return s + self.runs_ms(c, self.predict_ms(c)) / 1e3

    def note(self, c: Case, gate: Case | None, measured_ms: float | None = None,
             first_call_s: float | None = None) -> None:
        new = [key for key, _ in self.compile_keys(c) if key not in self.seen]
        self.calibrate(c, new, first_call_s, measured_ms)
        for key, _ in self.compile_keys(c):
            self.seen.add(key)
        if gate is not None:
            self.seen.add(gate)
            for key, _ in self.compile_keys(gate):
                self.seen.add(key)
        self.seen.add(("inputs", c.T, c.B, c.Hkv, c.is_decode))
        self.seen.add(("shape", c.method, c.T, c.Hkv))
        if measured_ms:
            self.measured.setdefault(self.path_key(c), []).append((c.T, measured_ms))


def reps_for(t_ms: float, cap_s: float, device: str, decode: bool = False) -> int:
    """Timed runs for a case whose one run takes ``t_ms``: about 400 ms of runs (200 for decode),
    5..50 runs (decode up to 100; cpu 1..5), and never more than the per-case cap allows."""
    t = max(t_ms, 1e-3)
    if device == "cpu":
        return max(1, min(5, math.ceil(30 / t)))
    lo, hi, target = (5, 100, 200.0) if decode else (5 if t < 500 else 3, 50, 400.0)
    n = min(hi, max(lo, math.ceil(target / t)))
    return max(1, min(n, int(cap_s * 1e3 / t) - 2))


# ---------------------------------------------------------------------- resume state
def load_state(path: str) -> tuple[dict[str, dict], dict[str, dict]]:
    """(final records by case_id, cases whose last line is a ``started`` marker: a run died
    during them). A truncated last line is ignored."""
    latest = render.latest_by_case(render.load_jsonl(path))
    finals = {k: r for k, r in latest.items() if r.get("status") in render.FINAL}
    stale = {k: r for k, r in latest.items() if r.get("status") == "started"}
    return finals, stale


# ---------------------------------------------------------------------- environment
def env_info(o, argv: list[str] | None) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    commit, dirty = None, None
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip() or None
        status = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", "src",
                                 "benchmarks"], capture_output=True, text=True, timeout=10, check=True).stdout
        dirty = bool(status.strip())
    except Exception:  # noqa: BLE001 - the device copy of the tree may have no git
        pass
    # LONGATTN_COMMIT wins: the device machine's copy of the tree can carry stale git metadata
    # (then git's dirty flag is about that stale commit too, so it is not recorded)
    if os.environ.get("LONGATTN_COMMIT"):
        commit, dirty = os.environ["LONGATTN_COMMIT"], None
    commit = commit or "unknown"
    cuda = o.device == "cuda"
    args = sys.argv[1:] if argv is None else argv
    return {
        "command": shlex.join(["python3", "benchmarks/suite.py", *args]),
        "gpu": torch.cuda.get_device_name() if cuda else (platform.processor() or platform.machine() or "cpu"),
        "device": o.device,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit,
        "dirty": dirty,
    }


# ---------------------------------------------------------------------- the runner
class Skip(Exception):
    """The case cannot run here; the message says why (recorded as ``skipped``)."""


class BudgetExceeded(BaseException):
    pass


ALARM = {"fired": False}
ALARM_GRACE_S = 30.0  # the hard stop: this long after --max-seconds, should one case overrun its estimate


def _fatal(msg: str) -> bool:
    return any(s.lower() in msg.lower() for s in FATAL_CUDA)


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


class Runner:
    def __init__(self, o, env: dict, run_id: str):
        self.o = o
        self.env = env
        self.run_id = run_id
        self.dev = torch.device(o.device)
        self.cuda = self.dev.type == "cuda"
        self.dtype = getattr(torch, o.dtype)
        self.elt = torch.finfo(self.dtype).bits // 8
        self.model = CostModel(o)
        self.done, stale = load_state(o.out_path)
        self.done = {k: r for k, r in self.done.items() if r.get("status") not in o.redo}
        self.stale = stale
        self.this_run: list[dict] = []
        self.not_started: list[str] = []
        self.ceilings: dict | None = None
        self.fatal: str | None = None
        self._inputs = None
        self._dec_inputs = None
        self._shape: dict[tuple, dict] = {}
        self._layout: dict[tuple, str] = {}
        self.flush = torch.empty(64 << 20, dtype=torch.int32, device=self.dev) if self.cuda else None
        self._wrote = False
        self.in_flight: dict[str, Case] = {}  # started, not yet recorded (gate and case)

    # -------------------------------------------------------------- records
    def write(self, obj: dict) -> None:
        path = self.o.out_path
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        line = json.dumps(obj, default=str) + "\n"
        if not self._wrote and os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:  # a run killed mid-write left a cut line: start a fresh one
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    line = "\n" + line
        self._wrote = True
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def base(self, c: Case) -> dict:
        name, cfg = method_config(c.method, c.op, self.o.decode_budget)
        rec = {"case_id": c.case_id, **asdict(c), "config": cfg, "impl": name, "lengths": c.lengths if c.is_decode else None,
               "run_id": self.run_id}
        return rec

    def start(self, c: Case) -> None:
        self.write({"case_id": c.case_id, "status": "started", "run_id": self.run_id, **asdict(c)})
        self.in_flight[c.case_id] = c

    def interrupted(self) -> None:
        """The budget alarm (or Ctrl-C) stopped the run: what was in flight is left for a rerun."""
        for cid, c in list(self.in_flight.items()):
            self.write({"case_id": cid, "status": "interrupted", "run_id": self.run_id, **asdict(c)})
        self.in_flight.clear()

    def record(self, c: Case, status: str, **fields) -> dict:
        if status == "ok" and c.op in ("fwd", "bwd", "decode") and fields.get("median_ms"):
            dense = Case(c.op, "full", c.T, c.B, c.H, c.Hkv, c.D, c.dtype, "sdpa-cudnn", "", c.fixed)
            base = self.done.get(dense.case_id, {}).get("median_ms")
            fields["speedup_vs_cudnn"] = base / fields["median_ms"] if base else None
        rec = {**self.base(c), "status": status, **fields, "ceilings": self.ceilings, "env": self.env,
               "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        self.write(rec)
        self.in_flight.pop(c.case_id, None)
        self.done[c.case_id] = rec
        self.this_run.append(rec)
        return rec

    def elapsed(self) -> float:
        return time.monotonic() - START

    def say(self, text: str) -> None:
        print(f"[{self.elapsed():6.1f}s] {text}", flush=True)

    # -------------------------------------------------------------- timing
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def time_once(self, fn) -> float:
        if self.cuda:
            self.flush.zero_()
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            return s.elapsed_time(e)
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3

    def bench(self, fn, *, cap_s: float | None = None, decode: bool = False) -> dict:
        """Median of n timed runs; the caller has run ``fn`` once already (compilation)."""
        cap_s = self.o.case_cap if cap_s is None else cap_s
        t = self.time_once(fn)
        n = reps_for(t, cap_s, self.o.device, decode)
        if self.cuda and t < 1.0:
            for _ in range(3):
                fn()
        times = []
        if self.cuda:
            events = []
            for _ in range(n):
                self.flush.zero_()
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fn()
                e.record()
                events.append((s, e))
            torch.cuda.synchronize()
            times = [s.elapsed_time(e) for s, e in events]
        else:  # the CPU smoke run: the estimate run counts as a sample
            times.append(t)
            for _ in range(n - 1):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        return {"median_ms": statistics.median(times), "min_ms": times[0], "max_ms": times[-1], "n_reps": n}

    def bench_graph(self, fn, n: int = 50) -> tuple[float | None, str | None]:
        """Median ms of CUDA-graph replays of ``fn`` (captured after warm-up), or the error."""
        if not self.cuda or self.o.no_graphs:
            return None, None
        try:
            return graph_median_ms(fn, n, self.flush), None
        except Exception as exc:  # noqa: BLE001 - capture may be impossible (host syncs)
            msg = f"{type(exc).__name__}: {exc}"[:300]
            try:
                torch.cuda.synchronize()
                torch.ones(1, device=self.dev).sum().item()
            except Exception as exc2:  # noqa: BLE001
                raise RuntimeError(f"CUDA unusable after a failed graph capture: {exc2}") from exc
            return None, msg

    def peak(self, fn) -> tuple[int | None, int | None]:
        if not self.cuda:
            return None, None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        p = torch.cuda.max_memory_allocated()
        return p, p - base

    @staticmethod
    def first_call(fn, *args):
        """Run ``fn`` once (compilation); a back end that falls back to another, or an SDPA back
        end without a kernel for the shape, raises Skip."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                out = fn(*args)
            except RuntimeError as exc:
                msg = str(exc)
                if "No available kernel" in msg or "No viable backend" in msg:
                    raise Skip(f"no kernel of this back end takes the shape: {msg[:300]}") from exc
                raise
        for w in caught:
            msg = str(w.message)
            if "falling back" in msg or "recompile limit" in msg:
                raise Skip(f"the back end did not run it: {msg[:300]}")
        return out

    def poison(self) -> None:
        if self.cuda:
            junk = torch.full((1 << 26,), float("nan"), device=self.dev)
            del junk

    # -------------------------------------------------------------- ceilings
    def measure_ceilings(self) -> dict:
        n = 8192 if self.cuda else 512
        a = torch.randn(n, n, device=self.dev, dtype=self.dtype)
        b = torch.randn(n, n, device=self.dev, dtype=self.dtype)
        c = torch.empty(n, n, device=self.dev, dtype=self.dtype)
        mm = lambda: torch.matmul(a, b, out=c)
        for _ in range(3):
            mm()
        t_mm = self.bench(mm, cap_s=5)["median_ms"]
        del a, b, c
        numel = (1 << 29) if self.cuda else (1 << 22)
        x = torch.randn(numel, device=self.dev, dtype=self.dtype)
        y = torch.empty_like(x)
        cp = lambda: y.copy_(x)
        for _ in range(3):
            cp()
        t_cp = self.bench(cp, cap_s=5)["median_ms"]
        nbytes = 2 * x.numel() * x.element_size()
        del x, y
        self.empty_cache()
        self.ceilings = {
            "matmul_flops_per_s": 2 * n**3 / (t_mm * 1e-3),
            "matmul_desc": f"{n}^3 {self.o.dtype} torch.matmul on random data, median {t_mm:.3f} ms",
            "copy_bytes_per_s": nbytes / (t_cp * 1e-3),
            "copy_desc": f"device copy of {nbytes // 2 / 2**30:.2f} GiB (read + write counted), median {t_cp:.3f} ms",
        }
        rec = {"case_id": f"ceiling|{self.run_id}", "op": "ceiling", "status": "info", "run_id": self.run_id,
               "ceilings": self.ceilings, "env": self.env}
        self.write(rec)
        return self.ceilings

    def empty_cache(self) -> None:
        if self.cuda:
            torch.cuda.empty_cache()

    # -------------------------------------------------------------- inputs
    def randn(self, shape, g):
        return torch.randn(*shape, device=self.dev, dtype=self.dtype, generator=g)

    def prefill_inputs(self, c: Case, seed: int):
        key = (c.T, c.B, c.H, c.Hkv, c.D, c.dtype, seed)
        if self._inputs is not None and self._inputs[0] == key:
            return self._inputs[1]
        self._inputs = None
        self._dec_inputs = None
        self.empty_cache()
        g = torch.Generator(device=self.dev).manual_seed(seed)
        q = self.randn((c.B, c.H, c.T, c.D), g)
        k = self.randn((c.B, c.Hkv, c.T, c.D), g)
        v = self.randn((c.B, c.Hkv, c.T, c.D), g)
        self._inputs = (key, (q, k, v))
        return q, k, v

    def decode_inputs(self, c: Case, seed: int):
        key = (c.T, c.B, c.H, c.Hkv, c.D, c.dtype, seed, tuple(c.lengths))
        if self._dec_inputs is not None and self._dec_inputs[0] == key:
            return self._dec_inputs[1]
        self._inputs = None
        self._dec_inputs = None
        self.empty_cache()
        g = torch.Generator(device=self.dev).manual_seed(seed)
        q = self.randn((c.B, c.H, 1, c.D), g)
        k = self.randn((c.B, c.Hkv, c.T, c.D), g)
        v = self.randn((c.B, c.Hkv, c.T, c.D), g)
        lens = torch.tensor(c.lengths, dtype=torch.int32, device=self.dev)
        self._dec_inputs = (key, (q, k, v, lens))
        return q, k, v, lens

    def shape_info(self, c: Case, q, k) -> dict:
        """Density (pairs read / causal dense pairs), heads with their own selection, and the
        selection's own time (selection methods), once per (method, shape)."""
        key = (c.method, c.T, c.B, c.Hkv)
        if key in self._shape:
            return self._shape[key]
        import longattn

        name, cfg = method_config(c.method, c.op)
        spec = longattn.get_method(name)
        conf = spec.make_config(**cfg)
        info: dict = {"density": 1.0, "sel_heads": None, "select_ms": None}
        if name != "full":
            if spec.selector is not None:
                sel = spec.selector(q, k, True, conf)
                info["density"] = sel.density()
                info["sel_heads"] = int(sel.kv_num_blocks.shape[1])
                del sel
                info["select_ms"] = self.bench(lambda: spec.selector(q, k, True, conf), cap_s=3)["median_ms"]
            else:  # NSA: one selection per KV head (GQA group), compressed and window branches per KV head
                info["density"] = float(spec.density(q, k, True, conf))
                info["sel_heads"] = c.Hkv
        self.empty_cache()
        self._shape[key] = info
        return info

    # -------------------------------------------------------------- availability
    def unavailable(self, c: Case) -> str | None:
        import longattn

        if c.backend.startswith("sdpa"):
            if c.backend == "sdpa-cudnn" and not self.cuda:
                return "cuDNN attention runs on CUDA only"
            return None
        if c.is_decode and c.method in NSA_DECODE:
            if importlib.util.find_spec("longattn.decode_nsa") is None:
                return "longattn.decode_nsa is not in this checkout"
            if c.backend == "ours":
                from longattn.kernels import triton_unavailable_reason

                return triton_unavailable_reason(self.dev)
            return None
        if c.is_decode and c.method != "full":
            if importlib.util.find_spec("longattn.decode") is None:
                return "longattn.decode is not in this checkout"
            dec = importlib.import_module("longattn.decode")
            fn = DECODE_SELECTORS[c.method][0]
            missing = [n for n in ("sparse_decode", fn, SUMMARY_FN[c.method]) if not hasattr(dec, n)]
            if missing:
                return f"longattn.decode has no {', '.join(missing)}"
            if c.backend == "ours":
                from longattn.kernels import triton_unavailable_reason

                return triton_unavailable_reason(self.dev)
            return None
        if c.is_decode:  # dense decode through the reference
            return None
        name, cfg = method_config(c.method, c.op)
        if name not in longattn.list_methods():
            return f"method {name!r} is not registered"
        spec = longattn.get_method(name)
        be = LONGATTN_BACKEND[c.backend]
        if be not in spec.all_backends():
            return (f"method {name!r} has no {be!r} back end in this checkout "
                    f"(it has: {', '.join(sorted(spec.all_backends()))})")
        if c.backend == "reference" and c.B * c.H * c.T * c.T * 4 > REFERENCE_MAX_BYTES and c.T > self.o.gate_len:
            return f"the reference materialises B*H*T*T fp32 scores ({c.B * c.H * c.T * c.T * 4 / 2**30:.0f} GiB)"
        if c.backend == "dense-mask":
            from longattn.backends import dense_mask_bytes

            mask_bytes = dense_mask_bytes(c.B, c.H, c.T, c.T, self.elt)
            if mask_bytes > DENSE_MASK_SUITE_BYTES:
                return (f"the dense-mask path materialises a B*H*T*T token mask ({mask_bytes / 2**30:.0f} GiB with "
                        f"SDPA's additive copy > {DENSE_MASK_SUITE_BYTES / 2**30:.0f} GiB)")
        from longattn.api import validate_inputs

        needs_grad = c.op in ("bwd", "gate-bwd")
        tiny = [torch.zeros(1, h, 16, c.D, device=self.dev, dtype=self.dtype, requires_grad=needs_grad)
                for h in (c.H, c.Hkv, c.Hkv)]
        inputs = validate_inputs(*tiny, causal=True, scale=None)
        with torch.set_grad_enabled(needs_grad):
            return spec.all_backends()[be].can_serve(inputs, spec.make_config(**cfg))

    # -------------------------------------------------------------- paths
    def sdpa_layout(self, c: Case) -> str:
        """``native`` (MHA), ``enable_gqa`` or ``expanded``: how this SDPA back end takes GQA,
        probed once per back end and head counts on a small input of the case's kind (decode:
        one query, not causal; prefill: causal)."""
        if c.H == c.Hkv:
            return "native"
        key = (c.backend, c.H, c.Hkv, c.is_decode)
        if key not in self._layout:
            tq = 1 if c.is_decode else 256
            q = torch.randn(1, c.H, tq, c.D, device=self.dev, dtype=self.dtype)
            k = torch.randn(1, c.Hkv, 256, c.D, device=self.dev, dtype=self.dtype)
            try:
                self.sdpa_fn(c, causal=not c.is_decode)(q, k, k)
                self.sync()
                self._layout[key] = "enable_gqa"
            except RuntimeError as exc:
                if _fatal(str(exc)):
                    raise
                self._layout[key] = "expanded"
        return self._layout[key]

    def sdpa_fn(self, c: Case, causal: bool):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        be = SDPBackend.CUDNN_ATTENTION if c.backend == "sdpa-cudnn" else SDPBackend.FLASH_ATTENTION

        def call(q, k, v):
            with sdpa_kernel([be]):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])

        return call

    def prefill_path(self, c: Case):
        """(prepare(q, k, v) -> args, call(*args) -> out, call_native(q, k, v), layout, kv_heads_read)."""
        import longattn
        from longattn.backends import expand_kv_heads

        if c.backend.startswith("sdpa"):
            layout = self.sdpa_layout(c)
            call = self.sdpa_fn(c, causal=True)
            if layout == "expanded":
                prep = lambda q, k, v: (q, expand_kv_heads(k, c.H), expand_kv_heads(v, c.H))
                native = lambda q, k, v: call(*prep(q, k, v))
                return prep, call, native, layout, c.H
            return (lambda q, k, v: (q, k, v)), call, call, layout, c.Hkv
        name, cfg = method_config(c.method, c.op)
        be = LONGATTN_BACKEND[c.backend]
        if c.backend == "dense-mask":
            from longattn.backends import dense

            dense.DENSE_MASK_MAX_BYTES = max(dense.DENSE_MASK_MAX_BYTES, DENSE_MASK_SUITE_BYTES)
        call = lambda q, k, v: longattn.attention(q, k, v, method=name, backend=be, **cfg)
        return (lambda q, k, v: (q, k, v)), call, call, "native", c.Hkv

    # -------------------------------------------------------------- gates
    def ensure_gate(self, c: Case) -> dict:
        g = gate_case(c, self.o)
        if g.case_id in self.done:
            return self.done[g.case_id]
        reason = self.unavailable(g)
        if reason:
            return self.record(g, "skipped", reason=reason, ok=False)
        if g.backend == "reference" and not g.is_decode:
            return self.record(g, "ok", ok=True, errors={},
                               reason="the reference back end is the specification the gate compares with")
        self.start(g)
        t0 = time.monotonic()
        try:
            errors = self.run_gate(g)
            ok = all(e["ok"] for e in errors.values())
            bad = [f"{k} err {e['err']:.3g} > bound {e['bound']:.3g}" + ("" if e["finite"] else " (non-finite)")
                   for k, e in errors.items() if not e["ok"]]
            rec = self.record(g, "ok", ok=ok, errors=errors, reason="; ".join(bad) or None,
                              wall_s=time.monotonic() - t0)
        except Skip as exc:
            rec = self.record(g, "skipped", ok=False, reason=str(exc))
        except Exception as exc:  # noqa: BLE001
            if ALARM["fired"]:
                raise BudgetExceeded() from exc
            msg = f"{type(exc).__name__}: {exc}"[:1500]
            traceback.print_exc()
            rec = self.record(g, "failed", ok=False, reason=msg)
            if _fatal(msg):
                self.fatal = msg
        self.empty_cache()
        self.model.note(g, None)
        self.say(f"gate {g.op} {g.method} {g.backend} Hkv={g.Hkv} T={g.T}: "
                 f"{'pass' if rec.get('ok') else 'FAIL ' + str(rec.get('reason'))[:200]}")
        return rec

    def _err(self, fast, ref, plain, floor: float, scale_floor: bool) -> dict:
        err, perr = max_err(fast, ref), max_err(plain, ref)
        bound = 2 * perr + floor * (max(1.0, ref.abs().max().item()) if scale_floor else 1.0)
        finite = bool(torch.isfinite(fast).all())
        return {"err": err, "plain_err": perr, "bound": bound, "finite": finite, "ok": finite and err <= bound}

    def run_gate(self, g: Case) -> dict:
        import longattn
        from longattn.backends import plain_precision

        floor = TOLERANCE_FLOOR[g.dtype]
        gen = torch.Generator(device=self.dev).manual_seed(self.o.seed + 1000)
        if g.is_decode:
            return self.run_decode_gate(g, gen, floor)
        name, cfg = method_config(g.method, g.op)
        q, k, v = (self.randn((1, h, g.T, g.D), gen) for h in (g.H, g.Hkv, g.Hkv))
        _, _, native, _, _ = self.prefill_path(g)
        ref_call = lambda qq, kk, vv: longattn.attention(qq, kk, vv, method=name, backend="reference", **cfg)
        if g.op == "gate-fwd":
            with torch.no_grad():
                ref = ref_call(q.float(), k.float(), v.float())
                with plain_precision():
                    plain = ref_call(q, k, v)
                self.poison()
                out = self.first_call(native, q, k, v)
            return {"out": self._err(out, ref, plain, floor, False)}
        dout = self.randn(q.shape, gen)

        def grads(call, qq, kk, vv, first=False):
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (qq, kk, vv))
            out = self.first_call(call, qq, kk, vv) if first else call(qq, kk, vv)
            return (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), dout.to(out.dtype)))

        ref = grads(ref_call, q.float(), k.float(), v.float())
        with plain_precision():
            plain = grads(ref_call, q, k, v)
        self.poison()
        fast = grads(native, q, k, v, first=True)
        return {name_: self._err(f, r, p, floor, name_ != "out")
                for name_, f, r, p in zip(("out", "dq", "dk", "dv"), fast, ref, plain)}

    def run_decode_gate(self, g: Case, gen, floor: float) -> dict:
        import longattn
        from longattn.backends import plain_precision

        lengths = g.lengths
        q = self.randn((g.B, g.H, 1, g.D), gen)
        k = self.randn((g.B, g.Hkv, g.T, g.D), gen)
        v = self.randn((g.B, g.Hkv, g.T, g.D), gen)
        lens = torch.tensor(lengths, dtype=torch.int32, device=self.dev)
        with torch.no_grad():
            if g.method == "full":
                def per_seq(call, qq, kk, vv):
                    return torch.cat([call(qq[b:b + 1], kk[b:b + 1, :, :L], vv[b:b + 1, :, :L])
                                      for b, L in enumerate(lengths)])

                ref_call = lambda qq, kk, vv: longattn.attention(qq, kk, vv, method="full", backend="reference")
                ref = per_seq(ref_call, q.float(), k.float(), v.float())
                with plain_precision():
                    plain = per_seq(ref_call, q, k, v)
                fast_call = self.decode_dense_call(g, q, k, v, lengths)[0]
                self.poison()
                out = self.first_call(fast_call)
                return {"out": self._err(out, ref, plain, floor, False)}
            if g.method in NSA_DECODE:
                return self.nsa_decode_gate(g, q, k, v, lens, floor)
            dec = importlib.import_module("longattn.decode")
            select, sel_kw, bs = self.decode_selector(g, dec, q, k, lens)
            bi, bc = select(q, k, lens, **sel_kw)
            budget = sel_kw["top_k"] * bs
            tokens = selected_tokens(bi, bc, lens, bs)
            if bool((tokens > budget).any()):
                raise AssertionError(f"the selector kept more than {budget} tokens")
            call = lambda qq, kk, vv: dec.sparse_decode(qq, kk, vv, lens, bi, bc, block_size=bs, backend="reference")
            ref = call(q.float(), k.float(), v.float())
            with plain_precision():
                plain = call(q, k, v)
            be = "triton" if g.backend == "ours" else "reference"
            self.poison()
            out = self.first_call(lambda: dec.sparse_decode(q, k, v, lens, bi, bc, block_size=bs, backend=be))
            errors = {"out": self._err(out, ref, plain, floor, False)}
            # the hot-loop setting that is timed (validate=False) must give the same result
            out2 = dec.sparse_decode(q, k, v, lens, bi, bc, block_size=bs, backend=be, validate=False)
            errors["out_unvalidated"] = self._err(out2, ref, plain, floor, False)
            return errors

    def nsa_compressed(self, c: Case, k, v, lens):
        """The compressed tokens a cache keeps for NSA decoding (paper defaults), in the case's
        dtype (:data:`NSA_DECODE`); computed outside any timing."""
        from longattn.decode_nsa import nsa_decode_compress
        from longattn.methods.nsa import NSAConfig

        kc, vc = nsa_decode_compress(k, v, lens, NSAConfig())
        dt = getattr(torch, NSA_DECODE[c.method])
        return kc.to(dt), vc.to(dt)

    def nsa_decode_gate(self, g: Case, q, k, v, lens, floor: float) -> dict:
        """NSA decoding against its reference (``backend="reference"``, fp32 inputs, the same
        compressed tokens), with the plain-bf16 reference as the error scale."""
        from longattn.backends import plain_precision
        from longattn.decode_nsa import nsa_decode

        kc, vc = self.nsa_compressed(g, k, v, lens)
        ref = nsa_decode(q.float(), k.float(), v.float(), lens, k_cmp=kc.float(), v_cmp=vc.float(),
                         backend="reference")
        with plain_precision():
            plain = nsa_decode(q, k, v, lens, k_cmp=kc, v_cmp=vc, backend="reference")
        be = "triton" if g.backend == "ours" else "reference"
        self.poison()
        out = self.first_call(lambda: nsa_decode(q, k, v, lens, k_cmp=kc, v_cmp=vc, backend=be))
        errors = {"out": self._err(out, ref, plain, floor, False)}
        out2 = nsa_decode(q, k, v, lens, k_cmp=kc, v_cmp=vc, backend=be, validate=False)  # the timed setting
        errors["out_unvalidated"] = self._err(out2, ref, plain, floor, False)
        return errors

    # -------------------------------------------------------------- prefill
    def run_prefill(self, c: Case) -> dict:
        q, k, v = self.prefill_inputs(c, self.o.seed)
        info = self.shape_info(c, q, k)
        prep, call, _, layout, kv_heads_read = self.prefill_path(c)
        args = prep(q, k, v)
        fields: dict = {"kv_layout": layout, "kv_heads_read": kv_heads_read, "density": info["density"],
                        "select_ms": info["select_ms"]}
        if c.op == "fwd":
            with torch.no_grad():
                t0 = time.perf_counter()
                out = self.first_call(call, *args)
                self.sync()
                fields["first_call_s"] = time.perf_counter() - t0
                if not bool(torch.isfinite(out).all()):
                    raise RuntimeError("non-finite output at the timed size")
                del out
                fields.update(self.bench(lambda: call(*args)))
                fields["peak_bytes"], fields["peak_extra_bytes"] = self.peak(lambda: call(*args))
                fields.update(self.kernel_only(c, q, k, v))
        else:
            gen = torch.Generator(device=self.dev).manual_seed(self.o.seed + 7)
            ga = [t.detach().requires_grad_(True) for t in args]
            dout = self.randn(q.shape, gen)
            t0 = time.perf_counter()
            out = self.first_call(call, *ga)
            grad = lambda: torch.autograd.grad(out, ga, dout, retain_graph=True)
            grad()
            self.sync()
            fields["first_call_s"] = time.perf_counter() - t0
            try:
                fields.update(self.bench(grad))
                fields["bwd_method"] = "autograd.grad(retain_graph=True) over one forward with grad"
                fields["peak_bytes"], fields["peak_extra_bytes"] = self.peak(grad)
            except RuntimeError as exc:  # a graph that cannot be walked twice: time fwd+bwd minus fwd
                if _fatal(str(exc)):
                    raise
                out = None
                fwdbwd = lambda: torch.autograd.grad(call(*ga), ga, dout)
                both = self.bench(fwdbwd)
                fwd = self.bench(lambda: call(*ga))
                fields.update({k_: both[k_] - fwd["median_ms"] for k_ in ("median_ms", "min_ms", "max_ms")})
                fields["n_reps"] = both["n_reps"]
                fields["bwd_method"] = f"(fwd+bwd) - fwd with grad; retain_graph failed: {str(exc)[:200]}"
                fields["peak_bytes"], fields["peak_extra_bytes"] = self.peak(fwdbwd)
            out = None
        sparse = c.method != "full"
        flops = prefill_flops(c.op, B=c.B, H=c.H, D=c.D, T=c.T, density=info["density"])
        nbytes = prefill_bytes(c.op, B=c.B, H=c.H, kv_heads=kv_heads_read, D=c.D, T=c.T, elt=self.elt,
                               density=info["density"], sel_heads=info["sel_heads"] if sparse else None)
        fields.update(metrics(flops, nbytes, fields.get("median_ms"), self.ceilings))
        fields["keys_per_query"] = info["density"] * causal_pairs(c.T, c.T) / c.T
        fields["bytes_model"] = ("Q,K,V,O once" if not sparse else
                                 f"Q,O once; selected K/V once per {TILE}-query tile and selection head "
                                 f"({info['sel_heads']} heads)") + ("; backward adds dO, dQ, dK, dV" if c.op == "bwd" else "")
        # a dense fallback would allocate at least one [B, H, T, T] score matrix on top of what the
        # call had before it started (inputs; for the backward, what the forward saved)
        tt = c.B * c.H * c.T * c.T * self.elt
        fields["tt_bytes"] = tt
        if fields.get("peak_extra_bytes") is not None:
            fields["tt_check_ok"] = fields["peak_extra_bytes"] < tt / 8
        return fields

    def kernel_only(self, c: Case, q, k, v) -> dict:
        """The attention kernel alone with the selection built once (selection methods)."""
        import longattn

        name, cfg = method_config(c.method, c.op)
        spec = longattn.get_method(name)
        if c.backend not in ("ours", "flex") or spec.selector is None:
            return {}
        try:
            sel = spec.selector(q, k, True, spec.make_config(**cfg))
            scale = 1.0 / math.sqrt(c.D)
            if c.backend == "flex":
                from longattn.backends import flex_call

                bm = sel.to_block_mask()
                fn = lambda: flex_call(q, k, v, bm, scale)
            else:
                from longattn.kernels.block_sparse import block_sparse_attention

                fn = lambda: block_sparse_attention(q, k, v, sel, scale)
            self.first_call(fn)
            return {"kernel_ms": self.bench(fn, cap_s=3)["median_ms"]}
        except Exception as exc:  # noqa: BLE001 - an extra; never fails the case
            if _fatal(str(exc)):
                raise
            return {"kernel_error": f"{type(exc).__name__}: {exc}"[:300]}

    # -------------------------------------------------------------- decode
    def decode_selector(self, c: Case, dec, q, k, lens):
        fn_name, arg, bs = DECODE_SELECTORS[c.method]
        _, cfg = method_config(c.method, "decode", self.o.decode_budget)
        summary = getattr(dec, SUMMARY_FN[c.method])(k, lens, bs)
        kw = dict(cfg)
        kw["key_means" if c.method == "topk" else "bounds"] = summary
        return getattr(dec, fn_name), kw, bs

    def decode_dense_call(self, c: Case, q, k, v, lengths):
        """(call() -> out, kv heads read, layout): dense SDPA or the dense reference over each
        sequence's own length (B > 1 with different lengths: one call per sequence; every sequence
        at the cache's length: one batched call)."""
        import longattn
        from longattn.backends import expand_kv_heads

        if c.backend == "reference":
            one = lambda qq, kk, vv: longattn.attention(qq, kk, vv, method="full", backend="reference")
            layout = "native"
        else:
            layout = self.sdpa_layout(c)
            one = self.sdpa_fn(c, causal=False)  # one query at the end sees the whole cache
        if layout == "expanded":
            k, v = expand_kv_heads(k, c.H), expand_kv_heads(v, c.H)
        if all(L == k.shape[2] for L in lengths):  # B = 1, or a fixed-length batch: one batched call
            return (lambda: one(q, k, v)), k.shape[1], layout
        # each sequence's own keys, contiguous (copied outside the timing)
        pieces = [(q[b:b + 1], k[b:b + 1, :, :L].contiguous(), v[b:b + 1, :, :L].contiguous())
                  for b, L in enumerate(lengths)]
        return (lambda: torch.cat([one(*p) for p in pieces])), k.shape[1], layout

    def run_decode(self, c: Case) -> dict:
        q, k, v, lens = self.decode_inputs(c, self.o.seed)
        lengths = c.lengths
        G = c.H // c.Hkv
        fields: dict = {}
        with torch.no_grad():
            if c.method in NSA_DECODE:
                from longattn.decode_nsa import nsa_decode
                from longattn.methods.nsa import NSAConfig

                cfg = NSAConfig()
                kc, vc = self.nsa_compressed(c, k, v, lens)
                be = "triton" if c.backend == "ours" else "reference"
                call = lambda: nsa_decode(q, k, v, lens, k_cmp=kc, v_cmp=vc, backend=be, validate=False)
                # per sequence and KV head: the compressed tokens the query sees, the selected blocks
                # (at most num_selected of select_block keys, within the sequence) and the window
                n_cmp = [max(0, (L - cfg.compress_block) // cfg.compress_stride + 1) for L in lengths]
                n_sel = [min(L, cfg.num_selected * cfg.select_block) for L in lengths]
                n_win = [min(L, cfg.window) for L in lengths]
                head_keys = c.H * (sum(n_cmp) + sum(n_sel) + sum(n_win))
                flops = decode_attend_flops(c.D, head_keys)
                nbytes = (decode_attend_bytes(B=c.B, H=c.H, D=c.D, elt=self.elt, kv_tokens=c.Hkv * (sum(n_sel) + sum(n_win)))
                          + 2 * c.Hkv * sum(n_cmp) * c.D * kc.element_size())
                fields.update({"kv_layout": "native", "kv_heads_read": c.Hkv, "decode_backend": be, "validate": False,
                               "compressed_tokens": NSA_DECODE[c.method],
                               "selected_tokens": float(c.Hkv * (sum(n_sel) + sum(n_win)))})
                fields["bytes_model"] = ("the visible compressed K,V (in the cache's compressed dtype), the selected "
                                         "blocks and the window once per (sequence, KV head), q, o")
            elif c.method == "full":
                call, kv_heads, layout = self.decode_dense_call(c, q, k, v, lengths)
                fields.update({"kv_layout": layout, "kv_heads_read": kv_heads})
                head_keys = c.H * sum(lengths)
                flops = decode_attend_flops(c.D, head_keys)
                nbytes = decode_attend_bytes(B=c.B, H=c.H, D=c.D, elt=self.elt, kv_tokens=kv_heads * sum(lengths))
                fields["bytes_model"] = "K,V of every cached token once per KV head read, q, o"
            else:
                dec = importlib.import_module("longattn.decode")
                select, kw, bs = self.decode_selector(c, dec, q, k, lens)
                be = "triton" if c.backend == "ours" else "reference"
                bi, bc = select(q, k, lens, **kw)
                tokens = selected_tokens(bi, bc, lens, bs)  # [B, Hkv]
                kv_tokens = float(tokens.sum())
                nblocks = sum(-(-L // bs) for L in lengths)
                summary_fn = getattr(dec, SUMMARY_FN[c.method])
                attend = lambda: dec.sparse_decode(q, k, v, lens, bi, bc, block_size=bs, backend=be, validate=False)
                sel_only = lambda: select(q, k, lens, **kw)
                both = lambda: dec.sparse_decode(q, k, v, lens, *select(q, k, lens, **kw), block_size=bs, backend=be,
                                                 validate=False)
                summary = lambda: summary_fn(k, lens, bs)
                call = {"attend": attend, "select": sel_only, "both": both, "summary": summary}[c.part]
                # the summaries a cache keeps: top-k one fp32 mean key per block; Quest min and max per page
                meta_bytes = (4 * c.Hkv * nblocks * c.D if c.method == "topk" else 2 * self.elt * c.Hkv * nblocks * c.D)
                sel_flops = 2.0 * c.D * nblocks * (c.Hkv if c.method == "topk" else 2 * c.Hkv)  # q summed per group
                att_flops = decode_attend_flops(c.D, G * kv_tokens)
                att_bytes = decode_attend_bytes(B=c.B, H=c.H, D=c.D, elt=self.elt, kv_tokens=kv_tokens)
                sel_bytes = meta_bytes + c.B * c.H * c.D * self.elt
                flops, nbytes = {
                    "attend": (att_flops, att_bytes),
                    "select": (sel_flops, sel_bytes),
                    "both": (att_flops + sel_flops, att_bytes + sel_bytes),
                    "summary": (0.0, self.elt * c.Hkv * c.D * sum(lengths) + meta_bytes),
                }[c.part]
                fields.update({"kv_layout": "native", "kv_heads_read": c.Hkv, "selected_tokens": kv_tokens,
                               "budget_tokens": kw["top_k"] * bs, "decode_backend": be, "validate": False})
                fields["bytes_model"] = {
                    "attend": "K,V of the selected tokens once per (sequence, KV head), q, o",
                    "select": "the cached summaries (top-k: fp32 block means; Quest: page min and max), q",
                    "both": "summaries + selected K,V + q, o",
                    "summary": "every valid cached key once, summaries written",
                }[c.part]
                head_keys = G * kv_tokens
            t0 = time.perf_counter()
            self.first_call(call)
            self.sync()
            fields["first_call_s"] = time.perf_counter() - t0
            fields.update(self.bench(call, decode=True))
            fields["graph_ms"], graph_error = self.bench_graph(call)
            if graph_error:
                fields["graph_error"] = graph_error
            fields["peak_bytes"], fields["peak_extra_bytes"] = self.peak(call)
        fields.update(metrics(flops, nbytes, fields.get("median_ms"), self.ceilings))
        fields["keys_per_query"] = head_keys / (c.B * c.H)
        return fields

    # -------------------------------------------------------------- one case
    def run_case(self, c: Case) -> None:
        if c.case_id in self.done:
            return
        g = gate_case(c, self.o)
        reason = self.unavailable(c)
        if reason:
            rec = self.record(c, "skipped", reason=reason)
            self.say(f"skip    {describe(c)}: {reason[:150]}")
            return
        t_pred = self.model.predict_ms(c)
        if 3 * t_pred > self.o.case_cap * 1e3:
            reason = (f"predicted {t_pred / 1e3:.1f} s per run; 3 runs exceed the per-case cap of "
                      f"{self.o.case_cap:.0f} s (--case-cap)")
            self.record(c, "skipped", reason=reason, predicted_ms=t_pred)
            self.say(f"skip    {describe(c)}: {reason}")
            return
        est = self.model.estimate_s(c, g if g.case_id not in self.done else None)
        if self.o.max_seconds and self.elapsed() + est > self.o.max_seconds - 5:
            self.not_started.append(c.case_id)
            self.say(f"budget  {describe(c)}: estimated {est:.0f} s does not fit; left for a rerun")
            return
        gate = self.ensure_gate(c)
        if self.fatal:
            return
        if not gate.get("ok"):
            why = gate.get("reason") or gate.get("status")
            self.record(c, "skipped", reason=f"correctness gate at T={g.T} did not pass: {why}"[:1500],
                        gate_ok=False)
            self.say(f"skip    {describe(c)}: gate did not pass")
            return
        self.start(c)
        t0 = time.monotonic()
        try:
            fields = self.run_decode(c) if c.is_decode else self.run_prefill(c)
            rec = self.record(c, "ok", gate_ok=True, wall_s=time.monotonic() - t0, predicted_s=est, **fields)
            self.say(f"ok      {describe(c)}: {rec['median_ms']:.4g} ms, {fmt_x(rec.get('x_floor'))} floor, "
                     f"{rec.get('tflops') or 0:.3g} TFLOP/s, {time.monotonic() - t0:.1f} s")
        except Skip as exc:
            self.record(c, "skipped", reason=str(exc), gate_ok=True)
            self.say(f"skip    {describe(c)}: {str(exc)[:150]}")
        except torch.OutOfMemoryError as exc:
            self.record(c, "failed", reason=f"out of memory: {str(exc)[:300]}", gate_ok=True)
            self.say(f"failed  {describe(c)}: out of memory")
        except Exception as exc:  # noqa: BLE001 - record and go on with the next case
            if ALARM["fired"]:  # the budget alarm, wrapped by library code: not the case's failure
                raise BudgetExceeded() from exc
            msg = f"{type(exc).__name__}: {exc}"[:1500]
            traceback.print_exc()
            self.record(c, "failed", reason=msg, gate_ok=True)
            self.say(f"failed  {describe(c)}: {msg[:200]}")
            if _fatal(msg):
                self.fatal = msg
        finally:
            self.empty_cache()
        rec = self.done.get(c.case_id, {})
        self.model.note(c, g, rec.get("median_ms"), rec.get("first_call_s"))


def describe(c: Case) -> str:
    part = f":{c.part}" if c.part else ""
    b = f"{c.B}*" if c.fixed else f"{c.B}"
    return f"{c.op:6} {c.method + part:18} T={render.size_label(c.T):>5} B={b} Hkv={c.Hkv:<2} {c.backend}"


def fmt_x(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


# ---------------------------------------------------------------------- the closing table
def summary_table(records: list[dict], limit_chars: int = 8000) -> str:
    """A compact pivot of the ok records: one row per (op, method, part, T, B, Hkv), the median
    ms of each back end present, the speed-ups of ours and flex over cuDNN dense of the same shape,
    and their distance from the floor (median / floor)."""
    ok = [r for r in records if r.get("status") == "ok" and r.get("op") in render.TIMED_OPS]
    dense = render.dense_times(ok)
    rows: dict[tuple, dict] = {}
    for r in sorted(ok, key=render.sort_key):
        key = (r["op"], r["method"] + (f":{r['part']}" if r.get("part") else ""), r["T"], r["B"], r["Hkv"],
               bool(r.get("fixed")))
        rows.setdefault(key, {})[r["backend"]] = r
    present = {r["backend"] for r in ok}
    cols = [b for b in render.BACKEND_ORDER if b in present] or ["ours", "flex", "sdpa-cudnn", "sdpa-flash"]
    short = {"sdpa-cudnn": "cudnn", "sdpa-flash": "flash", "dense-mask": "mask", "reference": "ref"}
    head = (f"{'op':6} {'method':18} {'T':>5} {'B':>3} {'Hkv':>3} | "
            + " ".join(f"{short.get(b, b):>8}" for b in cols)
            + f" | {'ours/cu':>7} {'flex/cu':>7} | {'ours xfl':>8} {'flex xfl':>8}")
    lines = ["median ms per back end; x/cu = speed-up over SDPA cuDNN dense of the same shape; "
             "xfl = median / floor; B*: every sequence of the batch holds T tokens", head, "-" * len(head)]
    order = sorted(rows, key=lambda k: (render.TIMED_OPS.index(k[0]), k[2] != HEADLINE_T, -k[2], k[4], k[3], k[5]))
    used = sum(len(x) + 1 for x in lines)

    def speed(byb, b):
        s = render.speedups(byb[b], dense)[0] if b in byb else None
        return f"{s:6.2f}x" if s else f"{'-':>7}"

    for i, key in enumerate(order):
        byb = rows[key]
        ms = lambda b: f"{byb[b]['median_ms']:8.3f}" if b in byb else f"{'-':>8}"
        xf = lambda b: f"{byb[b]['x_floor']:7.2f}x" if b in byb and byb[b].get("x_floor") else f"{'-':>8}"
        b = f"{key[3]}*" if key[5] else f"{key[3]}"
        line = (f"{key[0]:6} {key[1][:18]:18} {render.size_label(key[2]):>5} {b:>3} {key[4]:>3} | "
                + " ".join(ms(b) for b in cols) + f" | {speed(byb, 'ours')} {speed(byb, 'flex')} | "
                f"{xf('ours')} {xf('flex')}")
        if used + len(line) > limit_chars:
            lines.append(f"... {len(order) - i} more rows: python3 benchmarks/render.py --in <suite.jsonl>")
            break
        lines.append(line)
        used += len(line) + 1
    return "\n".join(lines)


def closing_report(runner: Runner | None, o, plan: list[Case]) -> str:
    finals, _ = load_state(o.out_path)
    records = list(finals.values())
    out = ["", "=" * 40 + " benchmark suite " + "=" * 40, summary_table(records)]
    if runner is not None:
        mine = runner.this_run
        count = lambda s: sum(1 for r in mine if r.get("status") == s and not r["op"].startswith("gate"))
        gates = [r for r in mine if r["op"].startswith("gate")]
        out.append(
            f"this run: {count('ok')} timed, {count('skipped')} skipped, {count('failed')} failed, "
            f"{len(runner.not_started)} not started (budget; rerun with the same --out), gates "
            f"{sum(1 for r in gates if r.get('ok'))}/{len(gates)} passed; "
            f"{sum(1 for c in plan if c.case_id in finals)}/{len(plan)} planned cases recorded; "
            f"{runner.elapsed():.0f} s"
        )
        reasons: dict[str, int] = {}
        for r in mine:
            if r.get("status") in ("skipped", "failed") or (r["op"].startswith("gate") and not r.get("ok")):
                key = f"{r['status']}: {(r.get('reason') or '')[:140]}"
                reasons[key] = reasons.get(key, 0) + 1
        for k, n in sorted(reasons.items(), key=lambda x: -x[1])[:12]:
            out.append(f"  {n:3d} x {k}")
        if runner.fatal:
            out.append(f"STOPPED on a CUDA error that poisons the context: {runner.fatal[:300]}")
        if runner.ceilings:
            c = runner.ceilings
            out.append(f"ceilings: matmul {c['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s, copy "
                       f"{c['copy_bytes_per_s'] / 1e12:.3g} TB/s; results: {o.out_path}")
    return "\n".join(out)


def print_plan(o, plan: list[Case]) -> None:
    """The cases in run order with their estimated seconds, simulating the budget the way the run
    applies it (a case that does not fit is left for a rerun and the next ones are tried)."""
    model = CostModel(o)
    done, _ = load_state(o.out_path)
    clock, left, left_s, fitted = 12.0, 0, 0.0, 0  # start-up, imports and ceilings
    for c in plan:
        if c.case_id in done:
            continue
        g = gate_case(c, o)
        t = model.predict_ms(c)
        if 3 * t > o.case_cap * 1e3:
            print(f"{'skip':>7}          {describe(c)}  (predicted {t / 1e3:.1f} s per run > --case-cap)")
            continue
        est = model.estimate_s(c, g)
        if o.max_seconds and clock + est > o.max_seconds - 5:
            left += 1
            left_s += est
            print(f"{est:6.1f}s {'-':>8}  {describe(c)}  (left for a rerun)")
            continue
        clock += est
        fitted += 1
        model.note(c, g)
        print(f"{est:6.1f}s {clock:7.1f}s  {describe(c)}")
    print(f"{len(plan)} cases: {fitted} fit in an estimated {clock:.0f} s (--max-seconds {o.max_seconds:.0f}); "
          f"{left} left for a rerun with the same --out (about {left_s:.0f} s more, less once compiled shapes are shared)")


# ---------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    plan = build_plan(o)
    if o.plan:
        print_plan(o, plan)
        return 0
    threads = torch.get_num_threads()
    if o.device == "cpu":  # tiny smoke shapes: threads only spin against each other on a busy machine
        torch.set_num_threads(1)
    run_id = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    env = env_info(o, argv)
    print(json.dumps({**env, "run_id": run_id, "out": o.out_path, "cases": len(plan)}), flush=True)
    runner: Runner | None = None
    use_alarm = bool(o.max_seconds) and hasattr(signal, "SIGALRM") and \
        __import__("threading").current_thread() is __import__("threading").main_thread()
    old_handler = None

    def on_alarm(signum, frame):
        ALARM["fired"] = True
        raise BudgetExceeded()

    if use_alarm:  # a hard stop shortly after the budget, should one case overrun its estimate
        old_handler = signal.signal(signal.SIGALRM, on_alarm)
        ALARM["fired"] = False
        signal.alarm(max(1, int(o.max_seconds + ALARM_GRACE_S - (time.monotonic() - START))))
    try:
        runner = Runner(o, env, run_id)
        for cid, marker in runner.stale.items():
            fields = {k: marker[k] for k in Case.__dataclass_fields__ if k in marker}
            try:
                runner.record(Case(**fields), "failed",
                              reason="the previous run ended during this case (killed, crashed or timed out); "
                                     "--redo failed retries it")
            except TypeError:
                continue
            if "failed" in o.redo:
                runner.done.pop(cid, None)
        runner.measure_ceilings()
        runner.say(f"ceilings: matmul {runner.ceilings['matmul_flops_per_s'] / 1e12:.1f} TFLOP/s, copy "
                   f"{runner.ceilings['copy_bytes_per_s'] / 1e9:.0f} GB/s")
        for c in plan:
            if runner.fatal:
                break
            if o.max_seconds and runner.elapsed() > o.max_seconds - 5:
                runner.not_started.append(c.case_id)
                continue
            runner.run_case(c)
    except (BudgetExceeded, KeyboardInterrupt):
        if runner is not None:
            runner.interrupted()
        print("stopped: wall-clock budget (or interrupt) reached during a case; it is left for a rerun", flush=True)
    finally:
        if use_alarm:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old_handler)
        torch.set_num_threads(threads)
    print(closing_report(runner, o, plan), flush=True)
    return 0 if runner is not None and not runner.fatal else 1


if __name__ == "__main__":
    sys.exit(main())
