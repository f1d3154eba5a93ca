"""Time each phase of NSA's forward (inference, backend "triton") on the GPU.

Phases: compression (mean pooling), compressed branch kernel (output + LSE), selection-score
kernel, top-k selection (PyTorch, and the ranking kernel the inference path uses), selected
branch (block-sparse kernel over the per-token selection), window branch, gated sum; the whole
``longattn.attention(method="nsa")`` call; and one decoding step (``longattn.decode_nsa``)
against SDPA decoding over the same keys.
Median of CUDA-event timings; one JSON object to ``--out`` and a table on stdout.

    python3 benchmarks/nsa_phases.py --T 65536 --out $OUT/nsa_phases.json
"""

from __future__ import annotations

import argparse
import json

import torch
from _timing import median_ms


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default="nsa_phases.json")
    args = ap.parse_args()

    import longattn
    from longattn.kernels.nsa import compressed_attention, select_blocks, selection_scores
    from longattn.methods import nsa as m

    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, D, T = 1, 32, 128, args.T
    q = torch.randn(B, H, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, args.hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, args.hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    cfg = longattn.get_method("nsa").make_config()
    scale = D ** -0.5
    l, d = cfg.compress_block, cfg.compress_stride
    res: dict[str, float] = {}
    with torch.no_grad():
        k_cmp, v_cmp = m.nsa_compress(k, v, cfg)
        res["compress"] = median_ms(lambda: m.nsa_compress(k, v, cfg), args.reps)
        o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=T, compress_block=l, compress_stride=d, scale=scale)
        res["compressed_branch_kernel"] = median_ms(lambda: compressed_attention(
            q, k_cmp, v_cmp, kv_len=T, compress_block=l, compress_stride=d, scale=scale), args.reps)
        p = selection_scores(q, k_cmp, lse, kv_len=T, compress_block=l, compress_stride=d,
                             select_block=cfg.select_block, scale=scale)
        res["selection_scores_kernel"] = median_ms(lambda: selection_scores(
            q, k_cmp, lse, kv_len=T, compress_block=l, compress_stride=d, select_block=cfg.select_block,
            scale=scale), args.reps)
        sel = m.select_from_scores(p, cfg, kv_len=T, num_heads=H)
        res["topk_selection_host"] = median_ms(lambda: m.select_from_scores(p, cfg, kv_len=T, num_heads=H), args.reps)
        res["topk_selection_kernel"] = median_ms(lambda: select_blocks(
            p, kv_len=T, select_block=cfg.select_block, num_selected=cfg.num_selected,
            num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks), args.reps)
        res["selected_branch"] = median_ms(lambda: m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton"),
                                     args.reps)
        res["window_branch"] = median_ms(lambda: m.nsa_window_branch(q, k, v, cfg, scale=scale, backend="triton"),
                                   args.reps)
        o_slc = m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton")
        o_win = m.nsa_window_branch(q, k, v, cfg, scale=scale, backend="triton")
        res["combine"] = median_ms(lambda: m.nsa_combine(o_cmp, o_slc, o_win, cfg.gates), args.reps)
        res["whole_call"] = median_ms(lambda: longattn.attention(q, k, v, method="nsa", backend="triton"), args.reps)
        res["sdpa_cudnn_dense"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True), args.reps)
        # one decoding step over the same T keys (compressed tokens kept by the cache, as a
        # serving loop would), against SDPA decoding over all of them
        from longattn.decode_nsa import nsa_decode, nsa_decode_compress

        q1 = q[:, :, -1:].contiguous()
        lens = torch.full((B,), T, dtype=torch.int32, device=dev)
        kc, vc = nsa_decode_compress(k, v, lens, cfg)
        res["decode_step_nsa"] = median_ms(lambda: nsa_decode(q1, k, v, lens, config=cfg, k_cmp=kc, v_cmp=vc,
                                                              backend="triton"), args.reps)
        res["decode_step_sdpa_dense"] = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(
            q1, k, v, enable_gqa=True), args.reps)
    rec = {"T": T, "H": H, "Hkv": args.hkv, "D": D, "dtype": "bfloat16", "config": str(cfg),
           "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "median_ms": res}
    with open(args.out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(f"NSA forward phases, T={T} H={H} Hkv={args.hkv} D={D} bf16 ({rec['gpu']})")
    for name, ms in res.items():
        print(f"  {name:28s} {ms:9.3f} ms")


if __name__ == "__main__":
    main()
