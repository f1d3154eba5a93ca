"""Block top-k attention by pooled scores -- the generic selection rule that MoBA, NSA and
Quest-style methods refine.

Queries and keys are cut into blocks of ``block_size`` (query blocks aligned to absolute
positions). A query block scores each key block by ``mean(q_block) . mean(k_block)`` (fp32)
and keeps its ``top_k`` best, always including its own (diagonal) block; causal selections
only consider blocks that start at or before the block's last query. With
``top_k * block_size >= T`` every block is kept and the result is full attention.
``shared_kv_heads=True`` sums the scores over the query heads of a GQA group so the group
shares one selection (each selected K/V block is then read once per group).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register_selection_method
from ..selection import BlockSelection
from ._common import (
    check_positive_int,
    check_tileable,
    gate_block_positions,
    index_selection,
    pooled_block_scores,
    topk_block_indices,
)


@dataclass(frozen=True)
class TopKConfig:
    """Defaults: 16 blocks of 128 tokens (2,048 keys per query)."""

    block_size: int = 128
    top_k: int = 16
    shared_kv_heads: bool = False

    def __post_init__(self) -> None:
        check_positive_int("TopKConfig", block_size=self.block_size, top_k=self.top_k)
        check_tileable("TopKConfig", block_size=self.block_size)
        if not isinstance(self.shared_kv_heads, bool):
            raise ValueError(f"TopKConfig.shared_kv_heads must be a bool, got {self.shared_kv_heads!r}")


def select_topk(q: Tensor, k: Tensor, causal: bool, config: TopKConfig) -> BlockSelection:
    B, H, Tq, _ = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    bs = config.block_size
    rows = gate_block_positions(Tq, Tk, bs, q.device)  # [nG] absolute query blocks
    scores = pooled_block_scores(q, k, bs, bs)  # [B, H, nG, nKB]
    if config.shared_kv_heads:
        scores = scores.view(B, Hkv, H // Hkv, *scores.shape[2:]).sum(2)  # [B, Hkv, nG, nKB]
    c = torch.arange(scores.shape[-1], device=q.device)
    own = c[None, :] == rows[:, None]  # [nG, nKB]
    eligible = c[None, :] <= rows[:, None] if causal else torch.ones_like(own)
    idx, keep = topk_block_indices(scores, eligible.expand_as(scores), own.expand_as(scores), config.top_k)
    return index_selection(idx, keep, gate_block=bs, kv_block=bs, q_len=Tq, kv_len=Tk, num_heads=H, causal=causal)


register_selection_method(
    name="topk",
    family="sparse/dynamic",
    paper="block top-k by pooled scores (the rule shared by MoBA, NSA, Quest)",
    summary="per query block, the top_k key blocks by mean(q).mean(k), own block included",
    config_cls=TopKConfig,
    selector=select_topk,
    needs_finite=True,
)
