"""Random inputs the GPU benchmark scripts share."""

from __future__ import annotations

import torch


def prefill_qkv(T: int, H: int = 32, Hkv: int = 8, D: int = 128, *, seed: int = 0, device: str = "cuda",
                dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gaussian ``q [1, H, T, D]``, ``k, v [1, Hkv, T, D]`` from one generator seeded ``seed``."""
    g = torch.Generator(device=device).manual_seed(seed)
    q = torch.randn(1, H, T, D, device=device, dtype=dtype, generator=g)
    k = torch.randn(1, Hkv, T, D, device=device, dtype=dtype, generator=g)
    v = torch.randn(1, Hkv, T, D, device=device, dtype=dtype, generator=g)
    return q, k, v


def nsa_selected_inputs(T: int = 65536, H: int = 32, Hkv: int = 8, D: int = 128, *, device: str = "cuda"):
    """``(q, k, v, sel, scale)``: :func:`prefill_qkv` and NSA's per-token selection over them
    (paper defaults, bf16 compressed tokens), from the Triton kernels of the compressed branch,
    the selection scores and the ranking -- the input of NSA's selected branch."""
    from longattn.kernels.nsa import compressed_attention, selection_scores
    from longattn.methods import nsa as m

    q, k, v = prefill_qkv(T, H, Hkv, D, device=device)
    cfg = m.NSAConfig(compressed_dtype="input")
    scale = D ** -0.5
    with torch.no_grad():
        kc, vc = m.nsa_compress(k, v, cfg)
        kw = dict(kv_len=T, compress_block=cfg.compress_block, compress_stride=cfg.compress_stride, scale=scale)
        _, lse = compressed_attention(q, kc, vc, **kw)
        p = selection_scores(q, kc, lse, select_block=cfg.select_block, **kw)
        sel = m.select_from_scores(p, cfg, kv_len=T, num_heads=H)
    return q, k, v, sel, scale
