"""Block selection for sparse decoding in two kernels (top-k by pooled keys, Quest page bounds).

The PyTorch selectors in :mod:`longattn.decode` are the specification; they take about 25 small
kernels per decoding step (scores, masks, ``topk``, a sort, casts), which costs more than the
sparse attention they feed at 128k tokens. Here the selection of every ``(sequence, KV head)``
takes two kernels:

1. ``_score_kernel``, grid ``(B * Hkv, cdiv(nBlocks, BLOCK_NB))``: each program scores one tile
   of ``BLOCK_NB`` key blocks of one ``(sequence, KV head)`` and writes the fp32 scores to that
   row of a scratch buffer ``[B * Hkv, nBlocks]`` (blocks past the sequence's length are not
   written). Top-k mode: ``(sum over the group's heads and queries of q) . mean key of the
   block``; Quest mode: the page upper bound ``relu(q) . kmax + min(q, 0) . kmin`` summed over
   the group's heads and queries. Both are linear in q, so the rows' q (top-k) or ``relu(q)``
   and ``min(q, 0)`` (Quest) are summed first and each block costs one fp32 multiply-add per
   coordinate of each summary: the kernel only streams the summaries (MBs per sequence at 128k
   tokens), many programs in parallel. (Quest's bound as two fp32 ``tl.dot`` per tile of rows
   ran at about 0.2 TB/s on an H200: 158 us at 128k, B = 1.)
2. :func:`longattn.kernels.nsa.rank_blocks` (the ranking kernel of NSA and of the block top-k
   prefill), one row per ``(sequence, KV head)`` at the position of the sequence's last key:
   forced blocks (the first ``n_sink`` and the last ``n_local`` blocks holding valid keys)
   first, then the eligible blocks by score, ties to the lower block index, NaN ranked as the
   lowest float (as the reference selectors' ``nan_to_num``); ``count = min(top_k, blocks)``
   kept, written in ascending order, unused slots 0.

The number of blocks of a sequence is ``clamp(ceil(len / block), 1, nBlocks)``: both kernels
clamp the lengths to ``[1, Tmax]`` as the reference does (:func:`longattn.decode.sparse_decode`
rejects lengths outside ``[Tq, Tmax]``; the selectors do not check them, to stay free of host
syncs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import fast
from ..nsa import MAX_SELECT_BLOCKS, rank_blocks
from .kernel import _next_pow2, _ready


# (blocks per scoring program, warps). Swept on an H200 at 128k tokens (benchmarks/decode_profile.py
# --score-tiles, 2026-12-01): 2 warps over 32 blocks keep the most loads in flight per thread; the
# score kernel at B = 16 took 25.5 us (top-k means) and 139 us (Quest bounds) against 29.9 and 329 us
# at 4 warps, about 3.9 TB/s for Quest's bounds; the selection is the same bit for bit.
SCORE_TILE = (32, 2)
# Larger tiles (many query rows, D = 256) take more warps: a program holds its q rows and one or
# two [BLOCK_NB, D] summary tiles in fp32; about 5120 of those elements per warp (160 per thread)
# compile without spills for sm_90 (tests/test_decode_compile.py; 64 rows at D = 256 on 2 warps
# spilled 25 KB).
SCORE_ELEMENTS_PER_WARP = 5120


def score_warps(rows: int, head_dim: int, quest: bool, block_nb: int, base: int) -> int:
    """Warps of a scoring program: ``base`` (the measured tile), or more when its fp32 operands
    (``rows x head_dim`` queries, one or two ``block_nb x head_dim`` summaries) need them."""
    elements = rows * head_dim + (2 if quest else 1) * block_nb * head_dim
    return min(8, max(base, _next_pow2(-(-elements // SCORE_ELEMENTS_PER_WARP))))


@triton.jit
def _n_blocks(Lens, b, block_size, nb_max):
    """Blocks holding valid keys of sequence ``b``: ``clamp(ceil(len / block), 1, nb_max)``."""
    kv_len = tl.load(Lens + b).to(tl.int32)
    nb = (kv_len + block_size - 1) // block_size
    return tl.minimum(tl.maximum(nb, 1), nb_max)


@triton.jit
def _score_kernel(
    Q, KM, KMIN, KMAX, Lens, Scratch,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_mb, stride_mh, stride_mn, stride_md,
    stride_sr,
    num_kv_heads, nb_max, block_size,
    G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_NB: tl.constexpr, QUEST: tl.constexpr,
):
    """Scores of blocks ``[tile * BLOCK_NB, (tile + 1) * BLOCK_NB)`` of row ``pid = b * Hkv +
    hkv`` into ``Scratch[pid, :]`` (fp32; only blocks below the sequence's block count)."""
    pid = tl.program_id(0)
    tile = tl.program_id(1)
    b = (pid // num_kv_heads).to(tl.int64)
    hkv = (pid % num_kv_heads).to(tl.int64)
    nb = _n_blocks(Lens, b, block_size, nb_max)
    start = tile * BLOCK_NB
    if start < nb:
        rows = tl.arange(0, ROWS)
        row_ok = rows < G * TQ
        head = hkv * G + rows // TQ
        t = rows % TQ
        d = tl.arange(0, HEAD_DIM)
        q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [ROWS, D], q's dtype

        n = start + tl.arange(0, BLOCK_NB)
        n_ok = n < nb  # blocks past this sequence's length are never ranked
        m_off = b * stride_mb + hkv * stride_mh + n[:, None].to(tl.int64) * stride_mn + d[None, :] * stride_md
        if QUEST:  # sum over rows r of (relu(q_r) . kmax + min(q_r, 0) . kmin), in fp32
            q32 = q.to(tl.float32)  # padded rows are 0
            # relu(q) and min(q, 0) written with where so that a NaN in q stays NaN (as in the
            # reference's clamp; the GPU's max/min would return the other operand)
            q_pos = tl.sum(tl.where(q32 < 0.0, 0.0, q32), axis=0)  # [D]
            q_neg = tl.sum(tl.where(q32 > 0.0, 0.0, q32), axis=0)
            kmin = tl.load(KMIN + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_NB, D]
            kmax = tl.load(KMAX + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(kmax * q_pos[None, :] + kmin * q_neg[None, :], axis=1)  # [BLOCK_NB]
        else:
            q_sum = tl.sum(q.to(tl.float32), axis=0)  # [D]
            km = tl.load(KM + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(km * q_sum[None, :], axis=1)
        tl.store(Scratch + pid.to(tl.int64) * stride_sr + n, s, mask=n_ok)


def select_blocks_triton(
    q: Tensor,
    cache_seqlens: Tensor,
    *,
    block_size: int,
    top_k: int,
    width: int,
    n_sink: int,
    n_local: int,
    key_means: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the scoring and ranking kernels (inputs already checked by the caller).

    ``q [B, H, Tq, D]``; ``cache_seqlens [B]``; exactly one of ``key_means float
    [B, Hkv, nBlocks, D]`` (top-k mode) or ``bounds = (kmin, kmax)``, each ``[B, Hkv, nPages, D]``
    in q's dtype (Quest mode). Returns ``block_indices int32 [B, Hkv, width]`` and
    ``block_counts int32 [B, Hkv]`` (views of the ranking kernel's ``[B, Hkv, 1, ..]`` outputs)
    as :func:`longattn.decode.select_topk_blocks` / :func:`longattn.decode.select_quest_pages`
    define them. Uses an fp32 scratch buffer ``[B * Hkv, nBlocks]`` for the scores."""
    _ready(q.device)
    B, H, Tq, D = q.shape
    quest = bounds is not None
    meta = bounds[0] if quest else key_means
    Hkv, nb_max = meta.shape[1], meta.shape[2]
    nb_pad = max(16, _next_pow2(nb_max))
    if nb_pad > MAX_SELECT_BLOCKS:
        raise ValueError(f"the selection kernel ranks at most {MAX_SELECT_BLOCKS} blocks per row, got {nb_max}")
    if width != min(top_k, nb_max):
        raise ValueError(f"width must be min(top_k, nBlocks) = {min(top_k, nb_max)} (the ranking kernel's), got {width}")
    if B == 0 or width == 0 or nb_max == 0:
        return (torch.zeros(B, Hkv, width, dtype=torch.int32, device=q.device),
                torch.zeros(B, Hkv, dtype=torch.int32, device=q.device))
    cache_seqlens = cache_seqlens.contiguous()  # the kernels read Lens[b] at unit stride
    scratch = torch.empty(B * Hkv, nb_max, dtype=torch.float32, device=q.device)
    rows = max(16, _next_pow2((H // Hkv) * Tq))
    kmin, kmax = bounds if quest else (meta, meta)
    block_nb, warps = SCORE_TILE
    warps = score_warps(rows, D, quest, block_nb, warps)
    fast(_score_kernel)[(B * Hkv, triton.cdiv(nb_max, block_nb))](
        q, meta, kmin, kmax, cache_seqlens, scratch,
        *q.stride(), *meta.stride(), scratch.stride(0),
        Hkv, nb_max, block_size,
        G=H // Hkv, TQ=Tq, HEAD_DIM=D, ROWS=rows, BLOCK_NB=block_nb, QUEST=quest,
        num_warps=warps,
    )
    # one row per (sequence, KV head), at the position of the sequence's last key
    kept, counts, _ = rank_blocks(
        scratch.view(B, Hkv, 1, nb_max), first_position=-1, row_stride=1, block=block_size, top_k=top_k,
        num_init_blocks=n_sink, num_local_blocks=n_local, causal=True, kv_lens=cache_seqlens)
    return kept[:, :, 0], counts[:, :, 0]


__all__ = ["MAX_SELECT_BLOCKS", "select_blocks_triton"]
