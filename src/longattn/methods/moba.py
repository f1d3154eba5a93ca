"""MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025).

Keys are cut into blocks of ``block_size``; a query's gate for block ``j`` is
``q . mean(K_j)`` (the mean-pooled keys of the block, an MoE router over blocks). Each query
keeps ``top_k`` blocks in all: its own block (always selected, attended causally) plus the
``top_k - 1`` best-gated *past* blocks; future blocks are never selected. Defaults are the
paper's: blocks of 512, top-3.

``gate_block`` sets how many consecutive queries share one gate (their mean query, i.e. the
mean of their token gates, since the gate is linear in ``q``). ``gate_block=1`` is the
paper's per-token routing (the default); larger values trade routing precision for coarser,
kernel-friendlier selections. ``gate_block`` must divide ``block_size`` so each gate group
has one own block.
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
class MoBAConfig:
    block_size: int = 512
    top_k: int = 3
    gate_block: int = 1

    def __post_init__(self) -> None:
        check_positive_int("MoBAConfig", block_size=self.block_size, top_k=self.top_k, gate_block=self.gate_block)
        check_tileable("MoBAConfig", block_size=self.block_size, gate_block=self.gate_block)
        if self.block_size % self.gate_block != 0:
            raise ValueError(
                f"MoBAConfig.gate_block={self.gate_block} must divide block_size={self.block_size}"
            )


def moba_gates(q: Tensor, k: Tensor, config: MoBAConfig) -> Tensor:
    """Gate scores ``q . mean(K_j)`` per gate group and key block, fp32 ``[B, H, nG, nKB]``."""
    return pooled_block_scores(q, k, config.gate_block, config.block_size)


def select_moba(q: Tensor, k: Tensor, causal: bool, config: MoBAConfig) -> BlockSelection:
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    g = config.gate_block
    rows = gate_block_positions(Tq, Tk, g, q.device)  # absolute gate groups
    own_block = rows * g // config.block_size  # [nG]
    scores = moba_gates(q, k, config)
    c = torch.arange(scores.shape[-1], device=q.device)
    own = c[None, :] == own_block[:, None]  # [nG, nKB]
    eligible = c[None, :] < own_block[:, None] if causal else ~own
    idx, keep = topk_block_indices(scores, eligible.expand_as(scores), own.expand_as(scores), config.top_k)
    return index_selection(
        idx, keep, gate_block=g, kv_block=config.block_size, q_len=Tq, kv_len=Tk, num_heads=H, causal=causal
    )


register_selection_method(
    name="moba",
    family="sparse/dynamic",
    paper="MoBA: Mixture of Block Attention for Long-Context LLMs (Lu et al., 2025)",
    summary="gate q . mean-pooled key block; own block + top-(k-1) past blocks",
    config_cls=MoBAConfig,
    selector=select_moba,
    needs_finite=True,
)
