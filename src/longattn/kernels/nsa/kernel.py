"""Triton kernels of NSA's compressed branch (Native Sparse Attention, Yuan et al., 2025),
forward only.

* ``_cmp_fwd`` -- FlashAttention-style online softmax of the queries over the compressed
  tokens. One program owns ``BLOCK_M`` consecutive queries of all ``G`` query heads of one KV
  head (``ROWS = GP * BLOCK_M`` rows, ``GP`` = ``G`` padded to a power of two), so each
  compressed K/V tile is loaded once per GQA group. Query ``p`` sees compressed token ``j`` iff
  ``j*d + l - 1 <= p``; the loop stops at the last tile the tile's last query can see. Writes
  ``O`` and the natural-log log-sum-exp (``-inf`` and output 0 for a query that sees nothing).
* ``_slc_scores`` -- recomputes the scores tile by tile, turns them into the normalised
  compressed-attention probabilities ``exp(s*scale - lse)``, and maps them onto selection
  blocks with one ``tl.dot`` against a fixed ``[BLOCK_N, NBP]`` 0/1 overlap matrix, summing
  the ``G`` heads of the group. A tile of ``BLOCK_N = NB * (l'/d)`` compressed tokens starts on
  a selection-block boundary, so it feeds its own ``NB`` blocks plus the first ``E =
  ceil((l - d) / l')`` blocks of the next tile (tokens that stick out past the tile's last
  block); that spill is carried in registers and added when the next tile is written. Every
  output element is written exactly once (blocks the tile cannot see get 0).
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _mm(a, b, F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``F32``: fp32 operands, multiplied with ``PREC``
    (``"tf32x3"`` on GPUs: near-fp32 accuracy on tensor cores; ``"ieee"`` in the interpreter).
    ``UPCAST``: the interpreter's dot mishandles 16-bit floats, so there the operands go to
    fp32 first (exact: products of 16-bit floats are exact in fp32)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif F32:
        return tl.dot(a, b, input_precision=PREC)
    else:
        return tl.dot(a, b)


@triton.jit
def _group_rows(pid_m, pid_bk, num_kv_heads, q_len, G: tl.constexpr, BLOCK_M: tl.constexpr,
                ROWS: tl.constexpr):
    """Batch, KV head, per-row query head offset / local query index / validity of program
    ``(pid_m, pid_bk)``: row ``r`` is head ``r // BLOCK_M`` of the group, query
    ``pid_m * BLOCK_M + r % BLOCK_M``."""
    b = pid_bk // num_kv_heads
    kvh = pid_bk % num_kv_heads
    rows = tl.arange(0, ROWS)
    r_head = rows // BLOCK_M
    r_tok = pid_m * BLOCK_M + rows % BLOCK_M
    row_ok = (r_head < G) & (r_tok < q_len)
    return b, kvh, r_head, r_tok, row_ok


@triton.jit
def _visible_count(pid_m, q_len, q_offset, n_cmp, cmp_block, cmp_stride, BLOCK_M: tl.constexpr):
    """Compressed tokens seen by the last query of the tile: ``floor((p - l + 1) / d) + 1``
    clamped to ``[0, nC]`` (only non-negative integer divisions)."""
    p_hi = tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1 + q_offset
    num = tl.maximum(p_hi + 1 - cmp_block, -cmp_stride)
    return tl.minimum((num + cmp_stride) // cmp_stride, n_cmp)


@triton.jit
def _cmp_fwd(
    Q, K, V, O, LSE,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
    q_len, n_cmp, q_offset, num_kv_heads, cmp_block, cmp_stride, sm_scale_log2,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, kvh, r_head, r_tok, row_ok = _group_rows(pid_m, tl.program_id(1), num_kv_heads, q_len, G, BLOCK_M, ROWS)
    heads = kvh * G + r_head
    q_abs = r_tok + q_offset
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + r_tok[:, None] * sqt + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(K.dtype.element_ty)  # bf16/fp16 queries against fp32 compressed keys: exact upcast
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    n_vis = _visible_count(pid_m, q_len, q_offset, n_cmp, cmp_block, cmp_stride, BLOCK_M)
    for n0 in range(0, n_vis, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < n_cmp
        kt = tl.load(k_base + cols[None, :] * skt + dims[:, None], mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        s = _mm(q, kt, F32, PREC, UPCAST) * sm_scale_log2  # [ROWS, BLOCK_N], log2 units
        keep = (cols[None, :] * cmp_stride + cmp_block - 1 <= q_abs[:, None]) & c_ok[None, :] & row_ok[:, None]
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + cols[:, None] * svt + dims[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32, PREC, UPCAST)
        m_i = m_new

    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + heads[:, None] * soh + r_tok[:, None] * sot + dims[None, :],
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + heads * slh + r_tok, lse, mask=row_ok)


@triton.jit
def _slc_scores(
    Q, K, LSE, S,
    sqb, sqh, sqt, skb, skh, skt, slb, slh, ssb, ssh, sst,
    q_len, n_cmp, n_blocks, q_offset, num_kv_heads, cmp_block, cmp_stride, select_block, sm_scale_log2,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr, GP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, NB: tl.constexpr, NBP: tl.constexpr, E: tl.constexpr,
    F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """``S[b, kvh, t, j]``: sum over the group's heads and the compressed tokens overlapping
    selection block ``j`` of ``exp(s*scale - lse)``. ``BLOCK_N = NB * l'/d``; ``NBP`` = ``NB``
    padded to >= 16 (``tl.dot``); ``E`` spill blocks (``E <= NB``)."""
    ROWS: tl.constexpr = GP * BLOCK_M
    pid_m = tl.program_id(0)
    b, kvh, r_head, r_tok, row_ok = _group_rows(pid_m, tl.program_id(1), num_kv_heads, q_len, G, BLOCK_M, ROWS)
    heads = kvh * G + r_head
    q_abs = r_tok + q_offset
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + r_tok[:, None] * sqt + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    q = q.to(K.dtype.element_ty)
    lse = tl.load(LSE + b * slb + heads * slh + r_tok, mask=row_ok, other=float("-inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)  # nothing seen -> p = 0
    k_base = K + b * skb + kvh * skh

    # overlap of the tile's tokens (keys [i*d, i*d + l) from the tile start) with its own
    # blocks (keys [j*l', (j+1)*l')), and which tokens reach past the tile's NB blocks
    tok = tl.arange(0, BLOCK_N)
    blk = tl.arange(0, NBP)
    start = tok * cmp_stride
    w = (start[:, None] < (blk[None, :] + 1) * select_block) & (start[:, None] + cmp_block > blk[None, :] * select_block)
    w = (w & (blk[None, :] < NB)).to(tl.float32)  # [BLOCK_N, NBP]

    # output rows: one per query of the tile (heads summed)
    o_tok = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_ok = o_tok < q_len
    s_base = S + b * ssb + kvh * ssh + o_tok[:, None] * sst
    carry = tl.zeros([BLOCK_M, NBP], tl.float32)  # spill of the previous tile into this one's blocks
    n_vis = _visible_count(pid_m, q_len, q_offset, n_cmp, cmp_block, cmp_stride, BLOCK_M)
    n_tiles = (n_vis + BLOCK_N - 1) // BLOCK_N
    for t in range(0, n_tiles):
        cols = t * BLOCK_N + tok
        c_ok = cols < n_cmp
        kt = tl.load(k_base + cols[None, :] * skt + dims[:, None], mask=c_ok[None, :] & d_ok[:, None], other=0.0)
        s = _mm(q, kt, F32, PREC, UPCAST)
        keep = (cols[None, :] * cmp_stride + cmp_block - 1 <= q_abs[:, None]) & c_ok[None, :] & row_ok[:, None]
        p = tl.where(keep, tl.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)  # [ROWS, BLOCK_N]
        per_blk = _mm(p, w, True, PREC, False)  # [ROWS, NBP] fp32
        scores = tl.sum(tl.reshape(per_blk, [GP, BLOCK_M, NBP]), 0) + carry  # [BLOCK_M, NBP]
        j = t * NB + blk
        tl.store(s_base + j[None, :], scores, mask=o_ok[:, None] & ((blk < NB) & (j < n_blocks))[None, :])
        carry = tl.zeros([BLOCK_M, NBP], tl.float32)
        for e in tl.static_range(E):
            reach = start + cmp_block > (NB + e) * select_block  # [BLOCK_N]
            spill = tl.sum(tl.where(reach[None, :], p, 0.0), 1)  # [ROWS]
            spill = tl.sum(tl.reshape(spill, [GP, BLOCK_M]), 0)  # [BLOCK_M]
            carry = tl.where(blk[None, :] == e, spill[:, None], carry)
    # blocks past what the tile sees: the last spill, then zeros
    for t in range(n_tiles, (n_blocks + NB - 1) // NB):
        j = t * NB + blk
        tl.store(s_base + j[None, :], carry, mask=o_ok[:, None] & ((blk < NB) & (j < n_blocks))[None, :])
        carry = tl.zeros([BLOCK_M, NBP], tl.float32)
