"""Where the microseconds of one sparse decoding step go, kernel by kernel: CUPTI kernel
durations (``torch.profiler``) of CUDA-graph replays, with L2 flushed before each replay (cold,
as ``suite.py`` and ``decode_sweep.py`` time decode) and without (warm), at 128k cached tokens in
every sequence, B = 1 (``--batch`` for others), H = 32, Hkv = 8, D = 128, bf16, a 4,096-token top-k
budget of 128-token blocks.

Variants: an empty kernel (the launch floor), the selection (scoring and ranking kernels), the
split-K attention alone (the split count ``sparse_decode`` chooses for the batch, at least 2),
the merge alone, and the whole step (selection, attention, merge). Per variant: the graph replay
time (CUDA events) and each kernel's mean duration in replay order; at the end, each compiled
kernel's registers, spills and shared memory. ``--method quest`` profiles Quest's selector;
``--score-tiles`` also times the selection under other scoring tiles.

    python3 benchmarks/decode_profile.py --out $OUT/decode_profile.jsonl
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import triton
import triton.language as tl
from _timing import capture_graph, graph_median_ms


@triton.jit
def _empty(X):
    if tl.program_id(0) < 0:  # never: keeps the pointer argument
        tl.store(X, 0)


def kernel_times(fn, flush: torch.Tensor | None, reps: int = 20) -> list[tuple[str, float]]:
    """Mean CUPTI duration (us) of each kernel of one graph replay of ``fn``, in launch order."""
    g = capture_graph(fn)
    per_replay: list[list[tuple[str, float]]] = []
    from torch.profiler import ProfilerActivity, profile

    for _ in range(reps):
        if flush is not None:
            flush.zero_()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            g.replay()
            torch.cuda.synchronize()
        ks = [(e.name, e.device_time) for e in prof.events() if e.device_time > 0]
        per_replay.append(ks)
    n = min(len(k) for k in per_replay)
    return [(per_replay[0][i][0][:60], statistics.mean(k[i][1] for k in per_replay)) for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=131072)
    ap.add_argument("--batch", default="1", help="comma list of batch sizes (every sequence holds T tokens)")
    ap.add_argument("--method", default="topk", choices=["topk", "quest"],
                    help="selector: topk (128-token blocks, 32 kept) or quest (16-token pages, 256 kept)")
    ap.add_argument("--score-tiles", default="",
                    help="also time the selection under these scoring tiles: BLOCK_NB:num_warps,...")
    ap.add_argument("--out", default="decode_profile.jsonl")
    args = ap.parse_args()
    tiles = [tuple(int(x) for x in t.split(":")) for t in args.score_tiles.split(",") if t]
    for B in [int(b) for b in args.batch.split(",")]:
        profile_batch(args.T, B, args.out, args.method, tiles)
    kernel_info(args.out)


def profile_batch(T: int, B: int, out: str, method: str = "topk", tiles=()) -> None:
    from longattn.decode import block_key_means, page_bounds, select_quest_pages, select_topk_blocks, sparse_decode
    from longattn.kernels.decode import decode_partials, merge_partials
    from longattn.kernels.decode.kernel import _sm_count, choose_num_splits, tile_config, work_units

    dev = torch.device("cuda")
    flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
    H, Hkv, D, budget = 32, 8, 128, 4096
    bs = 128 if method == "topk" else 16
    top_k = budget // bs
    scale = D ** -0.5
    g = torch.Generator(device=dev).manual_seed(1)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    if method == "topk":
        means = block_key_means(k, lens, bs)
        select = lambda: select_topk_blocks(q, k, lens, block_size=bs, top_k=top_k, key_means=means, backend="triton")
    else:
        means = page_bounds(k, lens, bs)
        select = lambda: select_quest_pages(q, k, lens, page_size=bs, top_k=top_k, bounds=means, backend="triton")
    idx, cnt = select()
    cfg = tile_config(H // Hkv, 1, bs, D, q.dtype)
    splits = choose_num_splits(B * Hkv, cfg["row_tiles"], work_units(idx.shape[-1], cfg), _sm_count(dev))
    # the split kernel alone writes partials: at least 2 splits (a step with one split writes the output)
    o_part, l_part = decode_partials(q, k, v, lens, idx, cnt, block_size=bs, scale=scale, num_splits=max(2, splits))
    x = torch.zeros(1, device=dev)

    variants = {
        "empty": lambda: _empty[(256,)](x),
        "select": select,
        "split_only": lambda: decode_partials(q, k, v, lens, idx, cnt, block_size=bs, scale=scale,
                                              num_splits=max(2, splits), o_part=o_part, lse_part=l_part),
        "merge_only": lambda: merge_partials(o_part, l_part, q.dtype),
        "step": lambda: sparse_decode(q, k, v, lens, *select(), block_size=bs, scale=scale, backend="triton",
                                      validate=False),
    }
    with open(out, "a") as f:
        for name, fn in variants.items():
            for cold in (True, False):
                fl = flush if cold else None
                row = {"variant": name, "method": method, "B": B, "T": T, "splits": splits,
                       "split_only_splits": max(2, splits), "L2": "cold" if cold else "warm",
                       "replay_us": round(graph_median_ms(fn, flush=fl) * 1e3, 2),
                       "kernels_us": [(n, round(t, 2)) for n, t in kernel_times(fn, fl)]}
                print(json.dumps(row), flush=True)
                f.write(json.dumps(row) + "\n")
        from longattn.kernels.decode import select as sel_mod

        default = sel_mod.SCORE_TILE
        for tile in tiles:
            sel_mod.SCORE_TILE = tile
            try:
                same = all(torch.equal(a, b) for a, b in zip(select(), (idx, cnt)))
                row = {"variant": "select_tile", "method": method, "B": B, "T": T, "tile": tile,
                       "same_selection": same, "replay_us": round(graph_median_ms(select, flush=flush) * 1e3, 2),
                       "kernels_us": [(n, round(t, 2)) for n, t in kernel_times(select, flush)]}
            finally:
                sel_mod.SCORE_TILE = default
            print(json.dumps(row), flush=True)
            f.write(json.dumps(row) + "\n")
    del k, v, means


def kernel_info(out: str) -> None:
    with open(out, "a") as f:
        from longattn.kernels.decode.kernel import _decode_split_kernel, _merge_kernel
        from longattn.kernels.decode.select import _score_kernel
        from longattn.kernels.nsa.kernel import _select_rank

        for kern in (_decode_split_kernel, _merge_kernel, _select_rank, _score_kernel):
            for dev_cache in kern.device_caches.values():
                for key, ck in dev_cache[0].items():
                    row = {"kernel": kern.__name__,
                           "n_regs": getattr(ck, "n_regs", None), "n_spills": getattr(ck, "n_spills", None),
                           "shared": ck.metadata.shared, "num_warps": ck.metadata.num_warps, "key": str(key)[-160:]}
                    print(json.dumps(row), flush=True)
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
