"""Sparse decoding at 128k cached tokens: where do the microseconds go, and does the split-K count
matter? Times, as cold-L2 CUDA-graph replays (as ``suite.py`` times decode), one decoding step of
B sequences (lengths T, 3T/4, ... as the suite; ``--fixed``: T each), H = 32, Hkv = 8, D = 128, bf16, a 4,096-token
budget of 128-token blocks chosen by ``select_topk_blocks``:

* dense SDPA decoding over the whole cache (the baseline, same run);
* the top-k selection kernels alone;
* the split-K attention over a fixed selection with ``num_splits`` in the heuristic's choice and
  a sweep (1 means the split kernel writes the output directly, no merge);
* selection + attention with the default settings;
* with ``--configs``, the split-K attention at the heuristic's split count under other tiles of
  the split kernel (``BLOCK_N:num_stages:num_warps``, e.g. ``64:3:4,128:2:8``);
* the launch floor: one empty Triton kernel, two in a row (plain and with programmatic
  dependent launch), and a small ``torch.zeros`` before one (the cost of a per-call counter
  buffer that a kernel with an in-kernel merge would need).

One JSON line per measurement to ``--out`` (appended as it goes) and a table on stdout.

    python3 benchmarks/decode_sweep.py --out $OUT/decode_sweep.jsonl
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
import triton.language as tl
from _timing import graph_median_ms


@triton.jit
def _empty(X, USE_GDC: tl.constexpr):
    if USE_GDC:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if tl.program_id(0) < 0:  # never: keeps the pointer argument
        tl.store(X, 0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--splits", default="1,4,8,16,32,64")
    ap.add_argument("--fixed", action="store_true", help="every sequence holds T tokens")
    ap.add_argument("--configs", default="", help="split-kernel tiles to try: BLOCK_N:num_stages:num_warps,...")
    ap.add_argument("--out", default="decode_sweep.jsonl")
    args = ap.parse_args()

    from longattn.decode import block_key_means, select_topk_blocks, sparse_decode
    from longattn.kernels.decode import choose_num_splits, sparse_decode_triton, tile_config, work_units
    from longattn.kernels.decode import kernel as dk
    from longattn.kernels.decode.kernel import _sm_count

    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)  # > L2 (60 MiB on the H200)
    H, Hkv, D, bs, budget = 32, 8, 128, 128, 4096
    top_k = budget // bs
    scale = D ** -0.5

    def record(**row) -> None:
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    launch_floor(record, flush)
    for B in (int(x) for x in args.batches.split(",")):
        T = args.T
        g = torch.Generator(device=dev).manual_seed(B)
        k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.tensor([T if args.fixed else T - i * T // max(B, 1) for i in range(B)], dtype=torch.int32,
                            device=dev)
        means = block_key_means(k, lens, bs)
        sel = lambda: select_topk_blocks(q, k, lens, block_size=bs, top_k=top_k, key_means=means, backend="triton")
        idx, cnt = sel()
        base = dict(B=B, T=T, H=H, Hkv=Hkv, D=D, budget=budget, block=bs, fixed=args.fixed)
        if B == 1 or args.fixed:
            dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        else:  # per-sequence lengths: a key-padding mask (what a batched dense decode must read anyway)
            mask = (torch.arange(T, device=dev)[None, :] < lens[:, None])[:, None, None, :]
            dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        record(**base, what="sdpa_dense", ms=graph_median_ms(dense, flush=flush))
        record(**base, what="select_topk_kernels", ms=graph_median_ms(sel, flush=flush))
        cfg = tile_config(H // Hkv, 1, bs, D, q.dtype)
        auto = choose_num_splits(B * Hkv, cfg["row_tiles"], work_units(idx.shape[-1], cfg), _sm_count(dev))
        for s in sorted({auto, *(int(x) for x in args.splits.split(","))}):
            fn = lambda s=s: sparse_decode_triton(q, k, v, lens, idx, cnt, block_size=bs, scale=scale, num_splits=s)
            record(**base, what="attend", num_splits=s, heuristic=s == auto, ms=graph_median_ms(fn, flush=flush))

        def both():
            i, c = sel()
            return sparse_decode(q, k, v, lens, i, c, block_size=bs, scale=scale, backend="triton", validate=False)

        record(**base, what="select_and_attend", num_splits=auto, ms=graph_median_ms(both, flush=flush))
        ref = sparse_decode_triton(q, k, v, lens, idx, cnt, block_size=bs, scale=scale, num_splits=auto)[0]
        default_config = dk.tile_config
        for spec in filter(None, args.configs.split(",")):
            bn, stages, warps = (int(x) for x in spec.split(":"))

            def patched(*a, bn=bn, stages=stages, warps=warps):
                c = default_config(*a)
                return {**c, "BLOCK_N": bn, "CHUNKS": -(-bs // bn), "SLOTS": max(1, bn // bs), "num_stages": stages,
                        "num_warps": warps}

            dk.tile_config = patched
            try:
                fn = lambda: sparse_decode_triton(q, k, v, lens, idx, cnt, block_size=bs, scale=scale, num_splits=auto)
                diff = (fn()[0].float() - ref.float()).abs().max().item()
                record(**base, what="attend_tile", config=spec, num_splits=auto, max_diff=diff,
                       ms=graph_median_ms(fn, flush=flush))
            finally:
                dk.tile_config = default_config

        del k, v, means
        torch.cuda.empty_cache()


def launch_floor(record, flush) -> None:
    """Graph-replay times of empty kernels: what a launch costs before any work."""
    x = torch.zeros(1, device="cuda")
    one = lambda: _empty[(256,)](x, USE_GDC=False)
    two = lambda: (_empty[(256,)](x, USE_GDC=False), _empty[(256,)](x, USE_GDC=False))
    two_pdl = lambda: (_empty[(256,)](x, USE_GDC=True), _empty[(256,)](x, USE_GDC=True, launch_pdl=True))
    zeros_one = lambda: (torch.zeros(2, 8, dtype=torch.int32, device="cuda"), _empty[(256,)](x, USE_GDC=False))
    for what, fn in (("empty_x1", one), ("empty_x2", two), ("empty_x2_pdl", two_pdl), ("zeros_then_empty", zeros_one)):
        record(what=what, ms=graph_median_ms(fn, flush=flush))


if __name__ == "__main__":
    main()
