"""Launch settings of NSA's prefill kernels on the GPU: the compressed branch
(``compressed_attention``, forward; ``cmp_bwd``: forward + backward, both backward kernels, or
``cmp_bwd_dq`` / ``cmp_bwd_dkdv``: one of them, tile shapes too), the selection scores
(``selection_scores``), through
``longattn.kernels.nsa.LAUNCH_OVERRIDES``. T = 65536 by default, B = 1, H = 32, Hkv = 8, D = 128,
bf16 queries, fp32 compressed tokens (the mean compression), paper defaults. Each configuration's
output is compared with the default's (max abs difference; the scores must pick the same blocks,
checked through the ranking kernel). One JSON line per configuration to ``--out`` as it goes.

    python3 benchmarks/nsa_tile_sweep.py --out $OUT/nsa_tiles.jsonl --max-seconds 100
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import torch
from _inputs import prefill_qkv
from _timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="nsa_tiles.jsonl")
    ap.add_argument("--max-seconds", type=float, default=100.0)
    ap.add_argument("--cmp-dtype", default="fp32", choices=["fp32", "bf16"],
                    help="compressed tokens: fp32 (the mean) or bf16 (compressed_dtype='input')")
    ap.add_argument("--scores-configs", default="",
                    help="score-kernel settings to try instead of the built-in list: rows:block_n:warps:stages[:split] "
                         "(split 0: the tf32x3 overlap dot; default 1: three exact bf16 parts),...")
    ap.add_argument("--kernels", default="scores,cmp_fwd",
                    help="comma list from scores, cmp_fwd, cmp_bwd, cmp_bwd_dq, cmp_bwd_dkdv")
    args = ap.parse_args()
    t_end = time.monotonic() + args.max_seconds

    import longattn
    import longattn.kernels.nsa as K
    from longattn.methods import nsa as m

    dev = torch.device("cuda")
    H, Hkv, D, T = 32, 8, 128, args.T
    q, k, v = prefill_qkv(T, H, Hkv, D, device=dev)
    cfg = longattn.get_method("nsa").make_config()
    l, d, ls, scale = cfg.compress_block, cfg.compress_stride, cfg.select_block, D ** -0.5
    with torch.no_grad():
        kc, vc = m.nsa_compress(k, v, cfg)
        if args.cmp_dtype == "bf16":
            kc, vc = kc.to(q.dtype), vc.to(q.dtype)
    cmp = lambda: K.compressed_attention(q, kc, vc, kv_len=T, compress_block=l, compress_stride=d, scale=scale)
    o_ref, lse = cmp()
    scores = lambda: K.selection_scores(q, kc, lse, kv_len=T, compress_block=l, compress_stride=d, select_block=ls,
                                        scale=scale)
    rank = lambda p: K.select_blocks(p, kv_len=T, select_block=ls, num_selected=cfg.num_selected,
                                     num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks)[0]
    p_ref = scores()
    idx_ref = rank(p_ref)

    sweeps = {
        "scores": [dict(rows=r, num_warps=w, num_stages=s, block_n=n)
                   for r, w, s, n in itertools.product((64, 32), (4, 8), (2, 3), (64, 128))],
        "cmp_fwd": [dict(rows=r, num_warps=w, num_stages=s, block_n=n)
                    for r, w, s, n in itertools.product((64, 128, 32), (4, 8), (2,), (32, 64))],
        "cmp_bwd": [dict(num_warps=w, num_stages=s) for w, s in itertools.product((4, 8), (1, 2, 3))],
        # tile shapes of each backward kernel alone (rows of a query tile, compressed tokens per tile)
        "cmp_bwd_dq": [dict(rows=r, block_n=n, num_warps=w, num_stages=s) for r, n, w, s in (
            (128, 32, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (128, 64, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3),
            (64, 128, 4, 2), (128, 32, 4, 3))],
        "cmp_bwd_dkdv": [dict(rows=r, block_n=n, num_warps=w, num_stages=s) for r, n, w, s in (
            (32, 128, 4, 2), (64, 128, 4, 2), (64, 128, 8, 2), (128, 64, 8, 2), (128, 128, 8, 2), (32, 64, 4, 2),
            (128, 64, 4, 2), (32, 128, 4, 3), (64, 64, 4, 3))],
    }
    if args.scores_configs:
        sweeps["scores"] = []
        for spec in args.scores_configs.split(","):
            r, n, w, s, *split = (int(x) for x in spec.split(":"))
            sweeps["scores"].append(dict(rows=r, block_n=n, num_warps=w, num_stages=s,
                                         ovl_split=bool(split[0]) if split else True))  # the kernel's default
    qg, kg, vg = (t.detach().requires_grad_() for t in (q, kc, vc))
    do = torch.randn_like(q)
    cmp_grad = lambda: torch.autograd.grad(K.compressed_attention(
        qg, kg, vg, kv_len=T, compress_block=l, compress_stride=d, scale=scale)[0], (qg, kg, vg), do)
    g_ref = cmp_grad()
    for kernel in args.kernels.split(","):
        configs = sweeps[kernel]
        for tune in [{}] + configs:
            if time.monotonic() > t_end:
                break
            K.LAUNCH_OVERRIDES.clear()
            K.LAUNCH_OVERRIDES[kernel] = tune
            row = dict(kernel=kernel, T=T, cmp_dtype=args.cmp_dtype,
                       **({"config": tune} if tune else {"config": "default"}))
            try:
                if kernel == "scores":
                    p = scores()
                    row["max_abs_diff"] = (p - p_ref).abs().max().item()
                    row["same_blocks_fraction"] = (rank(p) == idx_ref).all(-1).float().mean().item()
                    row["ms"] = median_ms(scores, args.reps)
                elif kernel.startswith("cmp_bwd"):
                    row["max_abs_diff"] = max((a - b).abs().max().item() for a, b in zip(cmp_grad(), g_ref))
                    row["ms"] = median_ms(cmp_grad, args.reps)  # forward + backward
                else:
                    o, lse2 = cmp()
                    row["max_abs_diff"] = (o.float() - o_ref.float()).abs().max().item()
                    seen = torch.isfinite(lse)  # -inf where a query sees no token
                    row["lse_same_infinite"] = bool(torch.equal(torch.isfinite(lse2), seen))
                    row["lse_max_abs_diff"] = (lse2[seen] - lse[seen]).abs().max().item()
                    row["ms"] = median_ms(cmp, args.reps)
            except Exception as exc:  # noqa: BLE001 - a configuration that does not compile or fit
                row["error"] = f"{type(exc).__name__}: {exc}"[:300]
            print(json.dumps(row), flush=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    K.LAUNCH_OVERRIDES.clear()


if __name__ == "__main__":
    main()
