"""Triton backward kernels of NSA's compressed branch (Native Sparse Attention, Yuan et al., 2025).

The compressed branch is softmax attention of every query over the compressed tokens it can see
(query ``p`` sees token ``j`` iff ``j*d + l - 1 <= p``); its forward kernel ``_cmp_fwd``
(:mod:`.kernel`) saves the natural-log log-sum-exp ``lse``. With ``P = exp(S*scale - lse)``,
``delta = rowsum(dO * O)`` (computed outside, laid out as ``lse``), the gradients are the FlashAttention-2 ones::

    dV = P^T dO        dP = dO V^T        dS = P * (dP - delta)
    dQ = scale * dS K  dK = scale * dS^T Q

* ``_cmp_bwd_dq`` -- query-major, the same tiling as the forward: one program owns ``BLOCK_M``
  queries of all ``G`` query heads of one KV head and walks the compressed tokens the tile's
  last query can see.
* ``_cmp_bwd_dkdv`` -- key-major: one program owns ``BLOCK_N`` compressed tokens of one KV head
  and walks the query tiles from the first one that can see the tile's first token to the end,
  all ``G`` heads of the group as rows of one tile, so ``dK``/``dV`` are summed over the group
  in registers (no atomics). It works on transposed tiles (``S^T = K Q^T``, then ``dV += P^T
  dO``, ``dS^T``, ``dK += dS^T Q``), as FlashAttention-2's backward does.

A query that sees nothing (``lse = -inf``) has ``P = 0`` and contributes nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..online_softmax import backward_row_stats
from .kernel import _group_rows, _group_tile, _mm, _visible_count


@triton.jit
def _cmp_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, sgb, sgh, sgt, slb, slh,
    q_len, n_cmp, q_offset, num_kv_heads, cmp_block, cmp_stride, sm_scale_log2, sm_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b, kvh, heads, r_tok, row_ok, q_abs, dims, d_ok, q = _group_tile(
        Q, pid_m, tl.program_id(1), num_kv_heads, q_len, q_offset, sqb, sqh, sqt, G, BLOCK_M, ROWS, HEAD_DIM, D)
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = q.to(K.dtype.element_ty)  # 16-bit queries against fp32 compressed keys: exact upcast
    do = tl.load(DO + b * sob + heads[:, None] * soh + r_tok[:, None] * sot + dims[None, :], mask=tile_ok, other=0.0)
    do = do.to(V.dtype.element_ty)
    lse2, delta = backward_row_stats(LSE, DELTA, b * slb + heads * slh + r_tok, row_ok)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    n_vis = _visible_count(pid_m, q_len, q_offset, n_cmp, cmp_block, cmp_stride, BLOCK_M)
    for n0 in range(0, n_vis, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        c_ok = cols < n_cmp
        kv_ok = c_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * skt + dims[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, HEAD_DIM]
        v = tl.load(v_base + cols[:, None] * svt + dims[None, :], mask=kv_ok, other=0.0)
        s = _mm(q, tl.trans(k), F32, PREC, UPCAST) * sm_scale_log2  # [ROWS, BLOCK_N]
        keep = (cols[None, :] * cmp_stride + cmp_block - 1 <= q_abs[:, None]) & c_ok[None, :] & row_ok[:, None]
        p = tl.where(keep, tl.exp2(s - lse2[:, None]), 0.0)
        dp = _mm(do, tl.trans(v), F32, PREC, UPCAST)  # [ROWS, BLOCK_N]
        ds = p * (dp - delta[:, None])
        dq += _mm(ds.to(k.dtype), k, F32, PREC, UPCAST)
    tl.store(DQ + b * sgb + heads[:, None] * sgh + r_tok[:, None] * sgt + dims[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _cmp_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, slb, slh,
    q_len, n_cmp, q_offset, num_kv_heads, cmp_block, cmp_stride, sm_scale_log2, sm_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, G: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, F32: tl.constexpr, PREC: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Program ``(n, b * Hkv + kvh)``: compressed tokens ``[n * BLOCK_N, (n + 1) * BLOCK_N)``."""
    pid_n = tl.program_id(0)
    pid_bk = tl.program_id(1)
    b = (pid_bk // num_kv_heads).to(tl.int64)
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_ok = cols < n_cmp
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    kv_ok = c_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + kvh * skh + cols[:, None] * skt + dims[None, :], mask=kv_ok, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + cols[:, None] * svt + dims[None, :], mask=kv_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)

    # the first query that sees the tile's first token sits at p = n0*d + l - 1
    first = tl.maximum(pid_n * BLOCK_N * cmp_stride + cmp_block - 1 - q_offset, 0)
    for m in range(first // BLOCK_M, (q_len + BLOCK_M - 1) // BLOCK_M):
        # transposed: [BLOCK_N, ROWS] scores, so P^T and dS^T come out of their matmuls already
        # in the layout of the next matmul's left operand (no register transposes through
        # shared memory); the query tile is loaded transposed instead
        _, _, r_head, r_tok, row_ok = _group_rows(m, pid_bk, num_kv_heads, q_len, G, BLOCK_M, ROWS)
        heads = kvh * G + r_head
        q_abs = r_tok + q_offset
        qt = tl.load(Q + b * sqb + heads[None, :] * sqh + r_tok[None, :] * sqt + dims[:, None],
                     mask=d_ok[:, None] & row_ok[None, :], other=0.0).to(K.dtype.element_ty)  # [HEAD_DIM, ROWS]
        do = tl.load(DO + b * sob + heads[:, None] * soh + r_tok[:, None] * sot + dims[None, :],
                     mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(V.dtype.element_ty)  # [ROWS, HEAD_DIM]
        lse2, delta = backward_row_stats(LSE, DELTA, b * slb + heads * slh + r_tok, row_ok)
        st = _mm(k, qt, F32, PREC, UPCAST) * sm_scale_log2  # [BLOCK_N, ROWS]
        keep = (cols[:, None] * cmp_stride + cmp_block - 1 <= q_abs[None, :]) & c_ok[:, None] & row_ok[None, :]
        pt = tl.where(keep, tl.exp2(st - lse2[None, :]), 0.0)
        dv += _mm(pt.to(v.dtype), do, F32, PREC, UPCAST)  # [BLOCK_N, HEAD_DIM]
        dpt = _mm(v, tl.trans(do), F32, PREC, UPCAST)  # [BLOCK_N, ROWS]
        dst = pt * (dpt - delta[None, :])
        dk += _mm(dst.to(k.dtype), tl.trans(qt), F32, PREC, UPCAST)
    tl.store(DK + b * sdkb + kvh * sdkh + cols[:, None] * sdkt + dims[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + b * sdvb + kvh * sdvh + cols[:, None] * sdvt + dims[None, :],
             dv.to(DV.dtype.element_ty), mask=kv_ok)
