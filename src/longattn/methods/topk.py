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

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register_selection_method
from ..selection import BlockSelection, _ceil_div
from ._common import (
    check_positive_int,
    check_tileable,
    gate_block_positions,
    index_selection,
    indexed_selection,
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
    """Block top-k selection of ``q [B, H, Tq, D]`` over ``k [B, Hkv, Tk, D]``. On a GPU with
    Triton (and query blocks aligned to key blocks) the ranking runs in one kernel
    (:func:`select_topk_ranked`); elsewhere in PyTorch (:func:`select_topk_reference`, the
    specification). Both give the same selection, bit for bit. If the kernel fails to run (a
    GPU Triton cannot compile for), the reference serves, with a RuntimeWarning; running out of
    memory is raised."""
    if _kernel_device(q) and ranking_kernel_unsupported_reason(q, k, config) is None:
        try:
            return _ranked_selection(q, k, causal, config)
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as err:  # noqa: BLE001 - any kernel failure: the specification serves
            warnings.warn(f"the top-k ranking kernel failed ({type(err).__name__}: {err}); "
                          "selecting with the PyTorch reference", RuntimeWarning, stacklevel=2)
    return select_topk_reference(q, k, causal, config)


def _kernel_device(q: Tensor) -> bool:
    """Whether :func:`select_topk` tries the ranking kernel for ``q``: on CUDA only (on CPU the
    Triton interpreter would be far slower than PyTorch)."""
    return q.is_cuda


def _scores(q: Tensor, k: Tensor, config: TopKConfig) -> Tensor:
    """Pooled block scores ``[B, H or Hkv (shared), nG, nKB]`` (fp32)."""
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    scores = pooled_block_scores(q, k, config.block_size, config.block_size)  # [B, H, nG, nKB]
    if config.shared_kv_heads:
        scores = scores.view(B, Hkv, H // Hkv, *scores.shape[2:]).sum(2)  # [B, Hkv, nG, nKB]
    return scores


def select_topk_reference(q: Tensor, k: Tensor, causal: bool, config: TopKConfig) -> BlockSelection:
    """The PyTorch specification of :func:`select_topk`: scores, ``topk_block_indices``
    (ties to the lower block index) and :func:`index_selection`."""
    B, H, Tq, _ = q.shape
    Tk = k.shape[2]
    bs = config.block_size
    rows = gate_block_positions(Tq, Tk, bs, q.device)  # [nG] absolute query blocks
    scores = _scores(q, k, config)
    c = torch.arange(scores.shape[-1], device=q.device)
    own = c[None, :] == rows[:, None]  # [nG, nKB]
    eligible = c[None, :] <= rows[:, None] if causal else torch.ones_like(own)
    idx, keep = topk_block_indices(scores, eligible.expand_as(scores), own.expand_as(scores), config.top_k)
    return index_selection(idx, keep, gate_block=bs, kv_block=bs, q_len=Tq, kv_len=Tk, num_heads=H, causal=causal)


def ranking_kernel_unsupported_reason(q: Tensor, k: Tensor, config: TopKConfig) -> str | None:
    """``None`` when :func:`select_topk_ranked` can run on these inputs, else why not."""
    from ..kernels import triton_unavailable_reason
    from ..kernels.nsa import MAX_SELECT_BLOCKS

    reason = triton_unavailable_reason(q.device)
    if reason:
        return reason
    Tq, Tk = q.shape[2], k.shape[2]
    if (Tk - Tq) % config.block_size:
        return (f"the {Tq} queries end with the {Tk} keys, so their blocks do not line up with the "
                f"key blocks of {config.block_size} (each query would need its own row)")
    if _ceil_div(Tk, config.block_size) > MAX_SELECT_BLOCKS:
        return f"the ranking kernel ranks at most {MAX_SELECT_BLOCKS} key blocks per row"
    return None


def select_topk_ranked(q: Tensor, k: Tensor, causal: bool, config: TopKConfig) -> BlockSelection:
    """:func:`select_topk` with the ranking, the index order and the block kinds in one Triton
    kernel (:func:`longattn.kernels.nsa.rank_blocks`, a row per query block whose first query
    sits at ``row * block_size + Tk - Tq``) instead of some twenty PyTorch operations; the
    scores are the reference's. Raises ``ValueError`` where the kernel cannot run
    (:func:`ranking_kernel_unsupported_reason`)."""
    reason = ranking_kernel_unsupported_reason(q, k, config)
    if reason:
        raise ValueError(f"select_topk_ranked cannot run: {reason}")
    return _ranked_selection(q, k, causal, config)


def _ranked_selection(q: Tensor, k: Tensor, causal: bool, config: TopKConfig) -> BlockSelection:
    """:func:`select_topk_ranked` on inputs already checked."""
    from ..kernels.nsa import rank_blocks

    H, Tq = q.shape[1], q.shape[2]
    Tk = k.shape[2]
    bs = config.block_size
    idx, cnt, full = rank_blocks(_scores(q, k, config), first_position=Tk - Tq, row_stride=bs, block=bs,
                                 top_k=config.top_k, num_init_blocks=0, num_local_blocks=1, causal=causal)
    return indexed_selection(cnt, idx, full, q_block=bs, kv_block=bs, q_len=Tq, kv_len=Tk, num_heads=H,
                             causal=causal)


register_selection_method(
    name="topk",
    family="sparse/dynamic",
    paper="block top-k by pooled scores (the rule shared by MoBA, NSA, Quest)",
    summary="per query block, the top_k key blocks by mean(q).mean(k), own block included",
    config_cls=TopKConfig,
    selector=select_topk,
    needs_finite=True,
)
