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
