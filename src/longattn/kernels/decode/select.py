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
   the group's heads and queries (two fp32 ``tl.dot`` per tile). The many programs read the
   summaries (MBs at 128k tokens) in parallel.
2. ``_rank_kernel``, grid ``(B * Hkv,)``: loads one row of scores (``NB_PAD`` wide, in
   registers) and ranks it: forced blocks (the first ``n_sink`` and the last ``n_local``
   blocks holding valid keys) first, then eligible blocks by score, NaN scores last among the
   eligible. The row is mapped to order-preserving int32 keys; a 32-step bisection over the
   int32 range finds the threshold key ``t`` (the largest with ``count(key >= t) >= count``),
   and the kernel keeps every key above ``t`` plus the lowest-index keys equal to ``t`` until
   ``count = min(top_k, blocks)`` are kept (ties go to the lower block index). ``O(32 * NB_PAD)``
   work, independent of ``top_k``. The kept blocks are written in ascending order (``tl.cumsum``
   of the kept flags gives each kept block its slot); unused slots 0.

The number of blocks of a sequence is ``clamp(ceil(len / block), 1, nBlocks)``, as the reference
clamps the lengths to ``[1, Tmax]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel import _next_pow2, _ready

MAX_SELECT_BLOCKS = 8192  # NB_PAD limit: one row of scores lives in registers during ranking


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
        if QUEST:  # in fp32: exact products and the interpreter compares fp32 correctly
            q32 = q.to(tl.float32)
            q_pos = tl.maximum(q32, 0.0)
            q_neg = tl.minimum(q32, 0.0)
            kmin = tl.load(KMIN + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_NB, D]
            kmax = tl.load(KMAX + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            bound = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee") + tl.dot(
                q_neg, tl.trans(kmin), input_precision="ieee")
            s = tl.sum(bound, axis=0)  # [BLOCK_NB]; padded rows of q are 0
        else:
            q_sum = tl.sum(q.to(tl.float32), axis=0)  # [D]
            km = tl.load(KM + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(km * q_sum[None, :], axis=1)
        tl.store(Scratch + pid.to(tl.int64) * stride_sr + n, s, mask=n_ok)


@triton.jit
def _rank_kernel(
    Scratch, Lens, Idx, Cnt,
    stride_sr, stride_ib, stride_ih, stride_ik,
    num_kv_heads, nb_max, block_size, top_k, n_sink, n_local, width,
    NB_PAD: tl.constexpr, W_PAD: tl.constexpr,
):
    """Keep ``count = min(top_k, nb)`` blocks of row ``pid`` of ``Scratch`` (forced first, then
    by score, ties to the lower index, NaN last among the eligible); write their indices
    ascending to ``Idx[b, hkv, :count]``, 0 to ``Idx[b, hkv, count:width]`` and ``count`` to
    ``Cnt[b, hkv]``."""
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    hkv = (pid % num_kv_heads).to(tl.int64)
    nb = _n_blocks(Lens, b, block_size, nb_max)

    c = tl.arange(0, NB_PAD)
    eligible = c < nb
    s = tl.load(Scratch + pid.to(tl.int64) * stride_sr + c, mask=eligible, other=0.0)
    forced = eligible & ((c < n_sink) | (c >= nb - n_local))
    s = tl.where(s == s, s, -3.0e38)  # NaN: eligible, but below every number
    s = tl.minimum(tl.maximum(s, -3.0e38), 3.0e38)  # +-inf scores rank like the largest numbers
    s = tl.where(s == 0.0, 0.0, s)  # -0 ties with +0 (their keys below would differ)
    ranked = tl.where(forced, float("inf"), tl.where(eligible, s, float("-inf")))  # no NaN left
    # order-preserving int32 keys: non-negative floats keep their bits, negative ones flip the
    # low 31 bits (so a larger magnitude gives a smaller key)
    bits = ranked.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    count = tl.minimum(nb, top_k)  # >= 1: nb >= 1 and top_k >= 1

    # threshold t: the largest int with count(key >= t) >= count. Invariant: count(key >= lo)
    # >= count > count(key >= hi); 32 halvings of [-2^31, 2^31] leave hi = lo + 1. lo, hi, mid
    # are int64 (hi = 2^31 does not fit int32); mid and lo always lie in the int32 range, so the
    # row-wide comparisons are in int32.
    lo = tl.full([], -2147483648, tl.int64)
    hi = tl.full([], 2147483648, tl.int64)
    for _ in range(0, 32):
        mid = lo + ((hi - lo) >> 1)
        n_ge = tl.sum((key >= mid.to(tl.int32)).to(tl.int32), axis=0)
        ok = n_ge >= count
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid)
    thr = lo.to(tl.int32)
    above = key > thr  # all kept: fewer than count of them
    tie = key == thr  # the lowest-index ties fill the rest
    n_above = tl.sum(above.to(tl.int32), axis=0)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=0)  # 1 for the lowest-index tie
    kept = above | (tie & (tie_rank <= count - n_above))

    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    i_base = Idx + b * stride_ib + hkv * stride_ih
    tl.store(i_base + slot * stride_ik, c.to(tl.int32), mask=kept)
    w = tl.arange(0, W_PAD)
    tl.store(i_base + w * stride_ik, tl.zeros([W_PAD], dtype=tl.int32), mask=(w >= count) & (w < width))
    tl.store(Cnt + pid, count.to(tl.int32))


def _rank_warps(nb_pad: int) -> int:
    """Warps of the ranking kernel: enough threads that an ``nb_pad``-wide row of keys (and the
    few row-wide temporaries) stays in registers."""
    return 4 if nb_pad <= 1024 else 8 if nb_pad <= 4096 else 16


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
    ``block_counts int32 [B, Hkv]`` as :func:`longattn.decode.select_topk_blocks` /
    :func:`longattn.decode.select_quest_pages` define them. Uses an fp32 scratch buffer
    ``[B * Hkv, nBlocks]`` for the scores."""
    _ready(q.device)
    B, H, Tq, D = q.shape
    quest = bounds is not None
    meta = bounds[0] if quest else key_means
    Hkv, nb_max = meta.shape[1], meta.shape[2]
    nb_pad = max(16, _next_pow2(nb_max))
    if nb_pad > MAX_SELECT_BLOCKS:
        raise ValueError(f"the selection kernel ranks at most {MAX_SELECT_BLOCKS} blocks per row, got {nb_max}")
    idx = torch.empty(B, Hkv, width, dtype=torch.int32, device=q.device)
    cnt = torch.empty(B, Hkv, dtype=torch.int32, device=q.device)
    if B == 0 or width == 0 or nb_max == 0:
        return idx, cnt.zero_()
    scratch = torch.empty(B * Hkv, nb_max, dtype=torch.float32, device=q.device)
    rows = max(16, _next_pow2((H // Hkv) * Tq))
    kmin, kmax = bounds if quest else (meta, meta)
    block_nb = 32
    _score_kernel[(B * Hkv, triton.cdiv(nb_max, block_nb))](
        q, meta, kmin, kmax, cache_seqlens, scratch,
        *q.stride(), *meta.stride(), scratch.stride(0),
        Hkv, nb_max, block_size,
        G=H // Hkv, TQ=Tq, HEAD_DIM=D, ROWS=rows, BLOCK_NB=block_nb, QUEST=quest,
        num_warps=4,
    )
    _rank_kernel[(B * Hkv,)](
        scratch, cache_seqlens, idx, cnt,
        scratch.stride(0), *idx.stride(),
        Hkv, nb_max, block_size, top_k, n_sink, n_local, width,
        NB_PAD=nb_pad, W_PAD=max(16, _next_pow2(width)),
        num_warps=_rank_warps(nb_pad),
    )
    return idx, cnt


__all__ = ["MAX_SELECT_BLOCKS", "select_blocks_triton"]
