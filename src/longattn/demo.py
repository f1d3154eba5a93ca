"""``longattn demo``: every method side by side on one set of random inputs."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from .api import attention
from .registry import get_method, list_methods


def demo_configs(seq_len: int) -> dict[str, dict[str, Any]]:
    """Configs that keep roughly an eighth to a quarter of the causal pairs at ``seq_len``, so
    the table compares sparse methods at a similar budget (the paper defaults target 32k+)."""
    block = 64 if seq_len <= 4096 else 128
    budget = max(block, seq_len // 8)
    return {
        "full": {},
        "window": {"window": budget},
        "sink": {"sink": 4, "window": budget - 4},
        "bigbird": {"block_size": block, "num_random_blocks": max(1, budget // block - 5)},
        "topk": {"block_size": block, "top_k": max(1, budget // block)},
        "moba": {"block_size": 2 * block, "top_k": max(2, budget // (2 * block))},
        "nsa": {"num_selected": max(3, budget // 128), "window": max(64, budget // 4)},
    }


def structured_inputs(
    batch: int, heads: int, kv_heads: int, seq_len: int, head_dim: int, device: str, dtype: torch.dtype, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random inputs with the locality of real attention: keys follow an AR(1) walk along
    the sequence and queries are noisy copies of the key at their position, so attention
    is peaked near the diagonal with a long tail (i.i.d. Gaussian inputs give near-uniform
    attention, where every sparse method looks equally bad)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    steps = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g)
    k = torch.empty_like(steps)
    k[:, :, 0] = steps[:, :, 0]
    rho = 0.98
    for t in range(1, seq_len):  # AR(1): k_t = rho k_{t-1} + sqrt(1 - rho^2) eps_t
        k[:, :, t] = rho * k[:, :, t - 1] + (1 - rho * rho) ** 0.5 * steps[:, :, t]
    group = heads // kv_heads
    q = k.repeat_interleave(group, dim=1) * 1.5 + torch.randn(batch, heads, seq_len, head_dim, generator=g)
    v = torch.randn(batch, kv_heads, seq_len, head_dim, generator=g)
    return (t.to(device=device, dtype=dtype) for t in (q, k, v))  # type: ignore[return-value]


def _time(fn, device: str, repeats: int = 3) -> float:
    fn()  # warm-up (and compilation on GPU)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def method_density(name: str, q, k, config: dict[str, Any]) -> float | None:
    spec = get_method(name)
    cfg = spec.make_config(**config)
    if spec.density is not None:
        return spec.density(q, k, True, cfg)
    return None


def run_demo(
    *,
    seq_len: int = 2048,
    heads: int = 8,
    kv_heads: int = 2,
    head_dim: int = 64,
    device: str | None = None,
    dtype: str = "float32",
    seed: int = 0,
    console: Console | None = None,
) -> list[dict[str, Any]]:
    console = console or Console()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    q, k, v = structured_inputs(1, heads, kv_heads, seq_len, head_dim, device, dt, seed)
    full = attention(q, k, v, method="full", backend="reference").float()
    configs = demo_configs(seq_len)
    rows = []
    for name in list_methods():
        config = configs.get(name, {})
        out = attention(q, k, v, method=name, **config)
        rel = ((out.float() - full).norm() / full.norm()).item()
        density = method_density(name, q, k, config)
        ms = _time(lambda: attention(q, k, v, method=name, **config), device)
        rows.append({"method": name, "config": config, "rel_error": rel, "density": density, "ms": ms})
    table = Table(
        title=(
            f"longattn demo: B=1 H={heads} Hkv={kv_heads} T={seq_len} D={head_dim} {dtype} causal, "
            f"{device}, AR(1)-structured random inputs, error vs full attention (fp32 reference)"
        )
    )
    for col in ("method", "config", "rel. error", "density", "ms (auto backend)"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["method"],
            ", ".join(f"{a}={b}" for a, b in r["config"].items()) or "-",
            f"{r['rel_error']:.2e}",
            "-" if r["density"] is None else f"{r['density']:.3f}",
            f"{r['ms']:.1f}",
        )
    console.print(table)
    if device == "cpu":
        console.print(
            "On the CPU the sparse methods run dense SDPA under their token mask (NSA: the dense "
            "reference; FlexAttention has no fused CPU kernel), so these times say nothing about "
            "speed: GPU numbers are in docs/benchmarks.md."
        )
    return rows
