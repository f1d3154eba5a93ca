"""Per-token selections on the GPU: key-major against query-major kernels, with dense in the same run.

A per-token selection (``q_block = 1``) is what MoBA's paper gate (block 512, top-3) and NSA's
selected branch (blocks of 64, 16 per token, one selection per GQA group) produce. The
block-sparse kernels run it either query-major (one program row per token and head group,
every token loading its own blocks: ``KEY_MAJOR_PER_TOKEN = False``) or key-major (each selected
block loaded once per tile of the tokens that chose it, per-block results merged through their
LSEs; dQ the same way, its per-block shares summed). This times both, forward and forward + backward,
on the same selection, with SDPA cuDNN / FlashAttention dense causal in the same process, and
checks that the two orders agree. One JSON line per case to ``--out``; a table on stdout.

    python3 benchmarks/per_token_order.py --T 65536 --cases nsa,moba --out $OUT/per_token_order.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
from _timing import median_ms


def _selection(case: str, q, k, v, T: int):
    import longattn
    from longattn.methods import moba, nsa

    if case == "moba":
        cfg = longattn.get_method("moba").make_config()  # paper defaults: block 512, top-3, per-token gate
        return moba.select_moba(q, k, True, cfg)
    cfg = longattn.get_method("nsa").make_config()
    k_cmp, v_cmp = nsa.nsa_compress(k, v, cfg)
    _, sel = nsa._kernel_compressed(q, k_cmp, v_cmp, cfg, kv_len=T, scale=q.shape[-1] ** -0.5)
    return sel


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--cases", default="nsa,moba")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-query-major-above", type=float, default=400.0,
                    help="skip the query-major backward when its forward took more ms than this")
    ap.add_argument("--out", default="per_token_order.jsonl")
    args = ap.parse_args()

    import longattn.kernels.block_sparse as bs
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    B, H, D, T = 1, 32, 128, args.T
    g = torch.Generator(device=dev).manual_seed(0)
    q, k, v = (torch.randn(B, h, T, D, device=dev, dtype=torch.bfloat16, generator=g).requires_grad_()
               for h in (H, args.hkv, args.hkv))
    do = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    # LONGATTN_COMMIT: the device machine's copy of the tree may carry stale git metadata
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "commit": os.environ.get("LONGATTN_COMMIT", "unknown")}
    rows = []

    def record(**kw):
        rec = dict(T=T, H=H, Hkv=args.hkv, D=D, dtype="bf16", **kw, **env)
        rows.append(rec)
        with open(args.out, "a") as f:
            f.write(json.dumps(rec) + "\n")
        print(json.dumps(rec), flush=True)

    def fwd_bwd(fn):
        def run():
            out = fn()
            torch.autograd.grad(out, (q, k, v), do)
        return run

    ke, ve = (t.detach().repeat_interleave(H // args.hkv, 1).requires_grad_() for t in (k, v))
    for name, be in (("sdpa-cudnn", SDPBackend.CUDNN_ATTENTION), ("sdpa-flash", SDPBackend.FLASH_ATTENTION)):
        def dense(be=be):
            with sdpa_kernel(be):
                return torch.nn.functional.scaled_dot_product_attention(q, ke, ve, is_causal=True)
        f = median_ms(lambda: dense().sum(), args.reps)
        fb = median_ms(lambda: torch.autograd.grad(dense(), (q, ke, ve), do), args.reps)
        record(case="full", order=name, fwd_ms=f, fwd_bwd_ms=fb)

    for case in args.cases.split(","):
        with torch.no_grad():
            sel = _selection(case, q.detach(), k.detach(), v.detach(), T)
        pairs = int(sel.kv_num_blocks.sum()) * sel.kv_block * (H // sel.kv_num_blocks.shape[1])
        outs = {}
        for order, flag in (("key-major", True), ("query-major", False)):
            bs.KEY_MAJOR_PER_TOKEN = flag
            attn = lambda: bs.block_sparse_attention(q, k, v, sel, D ** -0.5)[0]
            with torch.no_grad():
                outs[order] = attn()
            f = median_ms(lambda: attn().sum(), args.reps if flag else 2)
            fb = None
            if flag or f < args.skip_query_major_above:
                fb = median_ms(fwd_bwd(attn), args.reps if flag else 2)
            record(case=case, order=order, fwd_ms=f, fwd_bwd_ms=fb, kv_block=sel.kv_block,
                   selected_pairs_upper=pairs)
        bs.KEY_MAJOR_PER_TOKEN = True
        diff = (outs["key-major"].float() - outs["query-major"].float()).abs().max().item()
        record(case=case, order="agreement", max_abs_diff=diff)

    print(f"\n{'case':6} {'order':12} {'fwd ms':>9} {'fwd+bwd ms':>11}")
    for r in rows:
        if "fwd_ms" in r:
            fb = f"{r['fwd_bwd_ms']:.2f}" if r.get("fwd_bwd_ms") is not None else "-"
            print(f"{r['case']:6} {r['order']:12} {r['fwd_ms']:9.2f} {fb:>11}")


if __name__ == "__main__":
    main()
