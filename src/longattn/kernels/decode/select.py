"""One-kernel block selection for sparse decoding (top-k by pooled keys, Quest page bounds).

The PyTorch selectors in :mod:`longattn.decode` are the specification; they take about 25 small
kernels per decoding step (scores, masks, ``topk``, a sort, casts), which costs more than the
sparse attention they feed at 128k tokens. ``_select_kernel`` does the whole selection of one
``(sequence, KV head)`` in one program:

1. score every key block: top-k mode, ``(sum over the group's heads and queries of q) . mean
   key of the block``; Quest mode, the page upper bound ``relu(q) . kmax + min(q, 0) . kmin``
   summed over the group's heads and queries (two fp32 ``tl.dot`` per page tile);
2. rank: forced blocks (the first ``n_sink`` and the last ``n_local`` blocks holding valid
   keys) first, then eligible blocks by score, NaN scores last among the eligible;
3. keep ``min(top_k, blocks)`` by repeated arg-max (ties: the lower block index), and write
   them in ascending order (``tl.cumsum`` of the kept flags gives each kept block its slot),
   unused slots 0.

Scores are fp32. The scores of step 1 go through a scratch row in global memory (written and
read back by the same program) because a whole row of up to ``NB_PAD`` scores is needed for
the ranking but is computed tile by tile.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel import _next_pow2, _ready

MAX_SELECT_BLOCKS = 8192  # NB_PAD limit: one row of scores lives in registers during ranking


@triton.jit
def _select_kernel(
    Q, KM, KMIN, KMAX, Lens, Idx, Cnt, Scratch,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_mb, stride_mh, stride_mn, stride_md,
    stride_ib, stride_ih, stride_ik,
    num_kv_heads, nb_max, block_size, top_k, n_sink, n_local, width,
    G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr,
    BLOCK_NB: tl.constexpr, NB_PAD: tl.constexpr, W_PAD: tl.constexpr,
    QUEST: tl.constexpr,
):
    pid = tl.program_id(0)
    b = (pid // num_kv_heads).to(tl.int64)
    hkv = (pid % num_kv_heads).to(tl.int64)
    kv_len = tl.load(Lens + b).to(tl.int32)
    nb = (kv_len + block_size - 1) // block_size

    rows = tl.arange(0, ROWS)
    row_ok = rows < G * TQ
    head = hkv * G + rows // TQ
    t = rows % TQ
    d = tl.arange(0, HEAD_DIM)
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + t[:, None] * stride_qt + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [ROWS, D], q's dtype
    if QUEST:  # in fp32: exact products and the interpreter compares fp32 correctly
        q32 = q.to(tl.float32)
        q_pos = tl.maximum(q32, 0.0)
        q_neg = tl.minimum(q32, 0.0)
    else:
        q_sum = tl.sum(q.to(tl.float32), axis=0)  # [D]

    scratch = Scratch + pid.to(tl.int64) * NB_PAD
    m_base = b * stride_mb + hkv * stride_mh
    for start in range(0, nb_max, BLOCK_NB):
        n = start + tl.arange(0, BLOCK_NB)
        n_ok = n < nb  # blocks past this sequence's length are never ranked
        m_off = m_base + n[:, None] * stride_mn + d[None, :] * stride_md
        if QUEST:
            kmin = tl.load(KMIN + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)  # [BLOCK_NB, D]
            kmax = tl.load(KMAX + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            bound = tl.dot(q_pos, tl.trans(kmax), input_precision="ieee") + tl.dot(
                q_neg, tl.trans(kmin), input_precision="ieee")
            s = tl.sum(bound, axis=0)  # [BLOCK_NB]; padded rows of q are 0
        else:
            km = tl.load(KM + m_off, mask=n_ok[:, None], other=0.0).to(tl.float32)
            s = tl.sum(km * q_sum[None, :], axis=1)
        tl.store(scratch + n, s, mask=n_ok)
    tl.debug_barrier()  # the whole row of scores, written by every thread, is read below

    c = tl.arange(0, NB_PAD)
    s = tl.load(scratch + c, mask=c < nb, other=0.0)
    eligible = c < nb
    forced = eligible & ((c < n_sink) | (c >= nb - n_local))
    s = tl.where(s == s, s, -3.0e38)  # NaN: eligible, but below every number
    s = tl.minimum(tl.maximum(s, -3.0e38), 3.0e38)  # +-inf scores rank like the largest numbers
    ranked = tl.where(forced, float("inf"), tl.where(eligible, s, float("-inf")))
    count = tl.minimum(nb, top_k)
    kept = c < 0
    for _ in range(0, count):
        j = tl.argmax(ranked, axis=0, tie_break_left=True)
        hit = c == j
        kept = kept | hit
        ranked = tl.where(hit, float("-inf"), ranked)
    slot = tl.cumsum(kept.to(tl.int32), axis=0) - 1
    i_base = Idx + b * stride_ib + hkv * stride_ih
    tl.store(i_base + slot * stride_ik, c.to(tl.int32), mask=kept)
    w = tl.arange(0, W_PAD)
    tl.store(i_base + w * stride_ik, tl.zeros([W_PAD], dtype=tl.int32), mask=(w >= count) & (w < width))
    tl.store(Cnt + pid, count.to(tl.int32))


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
    """Launch the selection kernel (inputs already checked by the caller).

    ``q [B, H, Tq, D]``; ``cache_seqlens [B]``; exactly one of ``key_means float
    [B, Hkv, nBlocks, D]`` (top-k mode) or ``bounds = (kmin, kmax)``, each ``[B, Hkv, nPages, D]``
    in q's dtype (Quest mode). Returns ``block_indices int32 [B, Hkv, width]`` and
    ``block_counts int32 [B, Hkv]`` as :func:`longattn.decode.select_topk_blocks` /
    :func:`longattn.decode.select_quest_pages` define them."""
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
    if B == 0 or width == 0:
        return idx, cnt.zero_()
    scratch = torch.empty(B * Hkv, nb_pad, dtype=torch.float32, device=q.device)
    rows = max(16, _next_pow2((H // Hkv) * Tq))
    kmin, kmax = bounds if quest else (meta, meta)
    _select_kernel[(B * Hkv,)](
        q, meta, kmin, kmax, cache_seqlens, idx, cnt, scratch,
        *q.stride(), *meta.stride(), *idx.stride(),
        Hkv, nb_max, block_size, top_k, n_sink, n_local, width,
        G=H // Hkv, TQ=Tq, HEAD_DIM=D, ROWS=rows,
        BLOCK_NB=32 if quest else 64, NB_PAD=nb_pad, W_PAD=max(16, _next_pow2(width)),
        QUEST=quest,
        num_warps=4,
    )
    return idx, cnt


__all__ = ["MAX_SELECT_BLOCKS", "select_blocks_triton"]
