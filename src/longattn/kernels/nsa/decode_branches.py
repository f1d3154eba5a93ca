"""NSA decoding kernels: the selected and window branches and the gated sum of one step, in two
launches (Native Sparse Attention, Yuan et al., 2025; used by
:func:`longattn.decode_nsa.nsa_decode` for ``backend="triton"``).

After the compressed branch and the ranking (:mod:`longattn.kernels.nsa.decode`,
:func:`longattn.kernels.nsa.select_blocks`) a decoding step still has two attention branches
over the cache and a gated sum. Run as :func:`longattn.decode.sparse_decode` calls (the
reference path), the window branch needs its keys gathered into a buffer first -- the
block-indexed kernel has no per-query lower bound -- and the step costs about twenty launches.
Here:

* ``_branches_split`` -- grid ``(B * Hkv, S_slc + S_win, Tq * row_tiles)``. A program owns the
  ``G`` query heads of one query row ``t`` of one ``(sequence, KV head)`` (padded to at least 16
  rows for ``tl.dot``; the selection is per query row, so rows of different ``t`` never share a
  program) and one split:

  - splits ``s < S_slc`` take a contiguous share of the row's selected blocks cut into
    ``BLOCK_N``-key chunks (keys after the query masked), read in place from the cache;
  - splits ``s >= S_slc`` take a share of the row's window, the keys ``max(0, p - window + 1)
    .. p`` in ``BLOCK_N``-key chunks, also read in place.

  Online softmax in fp32 (base 2); each split writes its normalised partial output and base-2
  LSE (``-inf`` where it read nothing, output 0). A masked key is never loaded.
* ``_branches_combine`` -- one program per output row merges the ``S_slc`` selected and the
  ``S_win`` window partials through their LSE, rounds each branch to the output dtype (as the
  reference's per-branch outputs are), and writes ``g_c * o_cmp + g_s * o_slc + g_w * o_win``
  accumulated in fp32.

Reads per ``(sequence, KV head)`` and query row: the selected blocks and the window, no more
(a query's window may overlap its selected blocks; both branches read those keys, as the
method's two softmaxes need). Writes: the partial rows (``D`` fp32 per split and row) and the
output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..decode.kernel import _dot_mode, _ready, _sm_count, attend_chunk, choose_num_splits, tile_config
from ..launch import fast
from .decode import _buffer

_LOG2E = 1.4426950408889634


@triton.jit
def _branches_split(
    Q, K, V, Lens, Idx, Cnt, OP, LP,
    qk_scale,  # scale * log2(e)
    sqb, sqh, sqt, skb, skh, skt, skd, svb, svh, svt, svd,
    sib, sih, sit, sik, scb, sch, sct,
    split_stride_o, split_stride_l,  # elements between splits in OP and LP
    num_kv_heads, s_slc, window, row_tiles,
    G: tl.constexpr, TQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
):
    """One split of one ``(sequence, KV head, query row)``: partial output ``OP[s, b, h, t]``
    (normalised, fp32) and base-2 LSE ``LP[s, b, h, t]`` of the selected branch (``s < s_slc``)
    or of the window branch. ``OP``/``LP`` are contiguous ``[S, B, H, Tq(, D)]``."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_tm = tl.program_id(2)
    num_splits = tl.num_programs(1)
    b = (pid_bk // num_kv_heads).to(tl.int64)
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    t = pid_tm // row_tiles
    kv_len = tl.load(Lens + b).to(tl.int64)
    q_pos = kv_len - TQ + t  # the query's absolute position

    g = (pid_tm % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = g < G
    head = kvh * G + g
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + head[:, None] * sqh + t * sqt + d[None, :], mask=row_ok[:, None], other=0.0)

    # the split's share of its branch's work list
    is_win = pid_s >= s_slc
    count = tl.load(Cnt + b * scb + kvh * sch + t * sct, mask=pid_s < s_slc, other=0).to(tl.int64)
    lo = tl.maximum(q_pos - window + 1, 0)  # first window key
    total = tl.where(is_win, (q_pos - lo + BLOCK_N) // BLOCK_N, count * CHUNKS).to(tl.int32)
    share = tl.where(is_win, num_splits - s_slc, s_slc)
    split = tl.where(is_win, pid_s - s_slc, pid_s)
    per = (total + share - 1) // share
    u_lo = split * per
    u_hi = tl.minimum(u_lo + per, total)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    if is_win:  # contiguous keys lo..q_pos
        for u in range(u_lo, u_hi):
            pos = lo + u * BLOCK_N + n  # key positions [BLOCK_N]
            key_ok = pos <= q_pos
            m_i, l_i, acc = attend_chunk(q, k_base, v_base, pos, key_ok, key_ok[None, :] & row_ok[:, None], m_i, l_i,
                                         acc, qk_scale, skt, skd, svt, svd, d, DOT_MODE)
    else:  # the selected blocks, in slot order, keys up to the query
        i_base = Idx + b * sib + kvh * sih + t * sit
        for u in range(u_lo, u_hi):
            blk = tl.load(i_base + (u // CHUNKS) * sik).to(tl.int64)
            within = (u % CHUNKS) * BLOCK_N + n
            pos = blk * BLOCK_SIZE + within
            key_ok = (within < BLOCK_SIZE) & (pos <= q_pos)  # never past the query, so never past kv_len
            m_i, l_i, acc = attend_chunk(q, k_base, v_base, pos, key_ok, key_ok[None, :] & row_ok[:, None], m_i, l_i,
                                         acc, qk_scale, skt, skd, svt, svd, d, DOT_MODE)

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    flat = (b * num_kv_heads * G + head) * TQ + t  # row of [B, H, Tq]
    sp = pid_s.to(tl.int64)
    tl.store(OP + sp * split_stride_o + flat[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None])
    tl.store(LP + sp * split_stride_l + flat, lse2, mask=row_ok)


@triton.jit
def _branches_combine(
    OP, LP, OC, O, s_slc, num_splits, split_stride_o, split_stride_l,
    g_cmp, g_slc, g_win,
    HEAD_DIM: tl.constexpr, S_PAD: tl.constexpr,
):
    """Row ``r`` of ``[B, H, Tq]``: the selected splits ``[0, s_slc)`` and the window splits
    ``[s_slc, num_splits)`` each merged through their base-2 LSE and rounded to ``O``'s dtype,
    gated and summed with the compressed output ``OC`` (same dtype) in fp32. All partials of the
    row are loaded at once."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    s_ok = sp < num_splits
    slc = sp < s_slc
    sp = sp.to(tl.int64)
    d = tl.arange(0, HEAD_DIM)
    lse_s = tl.load(LP + sp * split_stride_l + r, mask=s_ok, other=float("-inf"))  # [S_PAD]
    m_slc = tl.max(tl.where(slc, lse_s, float("-inf")), 0)
    m_win = tl.max(tl.where(slc, float("-inf"), lse_s), 0)
    m_slc = tl.where(m_slc == float("-inf"), 0.0, m_slc)
    m_win = tl.where(m_win == float("-inf"), 0.0, m_win)
    w = tl.exp2(lse_s - tl.where(slc, m_slc, m_win))  # 0 for a split that read nothing (its row is 0)
    tot_slc = tl.sum(tl.where(slc, w, 0.0), 0)
    tot_win = tl.sum(tl.where(slc, 0.0, w), 0)
    o_s = tl.load(OP + sp[:, None] * split_stride_o + r * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    wo = w[:, None] * o_s
    o_slc = tl.sum(tl.where(slc[:, None], wo, 0.0), 0) / tl.where(tot_slc > 0.0, tot_slc, 1.0)
    o_win = tl.sum(tl.where(slc[:, None], 0.0, wo), 0) / tl.where(tot_win > 0.0, tot_win, 1.0)
    o_cmp = tl.load(OC + r * HEAD_DIM + d).to(tl.float32)
    dt = O.dtype.element_ty
    out = g_cmp * o_cmp + g_slc * o_slc.to(dt).to(tl.float32) + g_win * o_win.to(dt).to(tl.float32)
    tl.store(O + r * HEAD_DIM + d, out.to(dt))


def branches_tile_config(group: int, select_block: int, head_dim: int, dtype: torch.dtype) -> dict[str, int]:
    """Tiles of ``_branches_split``: :func:`longattn.kernels.decode.tile_config` for one query row
    of ``group`` heads. At 16 bf16 rows x 64 keys and D = 128 that is 4 warps, whose ptxas (Triton
    3.6, sm_90a) spills 40 bytes; 8 warps spill nothing but took longer on the H200 (B = 16, 64k
    keys, CUDA graphs, 2026-11-30: 50.9 against 40.6 us; B = 1: 13.1 against 12.6 us)."""
    return tile_config(group, 1, select_block, head_dim, dtype, pack_slots=False)


def branch_splits(total: int, units_slc: int, units_win: int) -> tuple[int, int]:
    """``(S_slc, S_win)``: ``total`` splits shared in proportion to each branch's work units
    (chunks of keys), at least one each."""
    s_slc = min(max(1, round(total * units_slc / (units_slc + units_win))), max(1, total - 1))
    return s_slc, max(1, total - s_slc)


def nsa_decode_branches(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_indices: Tensor,
    block_counts: Tensor,
    o_cmp: Tensor,
    *,
    select_block: int,
    window: int,
    gates: Sequence[float],
    scale: float,
    num_splits: tuple[int, int] | None = None,
) -> Tensor:
    """NSA's selected and window branches of a decoding step and the gated sum with the
    compressed branch (Native Sparse Attention, Yuan et al., 2025), on inputs already checked
    by :func:`longattn.decode_nsa.nsa_decode`.

    Args:
        q: ``[B, H, Tq, D]`` (float16/bfloat16/float32, D a power of two in [16, 256]); query
            ``t`` of sequence ``b`` sits at ``p = cache_seqlens[b] - Tq + t``.
        k_cache, v_cache: ``[B, Hkv, Tmax, D]`` in q's dtype (any strides; read in place).
        cache_seqlens: ``int32/int64 [B]`` in ``[Tq, Tmax]`` (not checked: no host sync).
        block_indices: ``int32 [B, Hkv, Tq, K]``, each row's selected blocks of ``select_block``
            keys; ``block_counts int32 [B, Hkv, Tq]``: how many of them are used.
        o_cmp: ``[B, H, Tq, D]`` in q's dtype, the compressed branch's output.
        select_block, window: the selection block and the sliding window, in keys.
        gates: three constants ``(g_cmp, g_slc, g_win)``.
        scale: score scale.
        num_splits: ``(S_slc, S_win)`` programs per ``(sequence, KV head, query row)`` for each
            branch; ``None``: :func:`longattn.kernels.decode.choose_num_splits` shared by
            :func:`branch_splits`. For tests and tuning.

    Returns ``[B, H, Tq, D]`` in q's dtype: ``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``
    accumulated in fp32, each branch in q's dtype first. No autograd, no host sync."""
    B, H, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    G = H // Hkv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if B == 0:
        return out
    _ready(q.device)
    cfg = branches_tile_config(G, select_block, D, q.dtype)
    # a branch's chunks: K blocks of CHUNKS chunks; the window's min(window, Tmax) keys
    units_slc = block_indices.shape[-1] * cfg["CHUNKS"]
    units_win = -(-min(window, k_cache.shape[2]) // cfg["BLOCK_N"])
    if num_splits is not None and (
            not isinstance(num_splits, tuple) or len(num_splits) != 2
            or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in num_splits)):
        raise ValueError(f"num_splits must be None or a pair of ints >= 1 (selected, window), got {num_splits!r}")
    if num_splits is None:
        total = choose_num_splits(B * Hkv, Tq * cfg["row_tiles"], units_slc + units_win, _sm_count(q.device))
        num_splits = branch_splits(max(2, total), units_slc, units_win)
    s_slc, s_win = num_splits
    S = s_slc + s_win
    o_part = _buffer((S, B, H, Tq, D), q.device)
    lse_part = _buffer((S, B, H, Tq), q.device)
    lens = cache_seqlens.contiguous()
    q_, o_cmp = q.contiguous(), o_cmp.contiguous()
    fast(_branches_split)[(B * Hkv, S, Tq * cfg["row_tiles"])](
        q_, k_cache, v_cache, lens, block_indices, block_counts, o_part, lse_part,
        float(scale) * _LOG2E,
        *q_.stride()[:3], *k_cache.stride(), *v_cache.stride(),
        *block_indices.stride(), *block_counts.stride(),
        o_part.stride(0), lse_part.stride(0),
        Hkv, s_slc, window, cfg["row_tiles"],
        G=G, TQ=Tq, BLOCK_SIZE=select_block, CHUNKS=cfg["CHUNKS"], HEAD_DIM=D,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_MODE=_dot_mode(q.dtype),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    g_cmp, g_slc, g_win = (float(x) for x in gates)
    fast(_branches_combine)[(B * H * Tq,)](
        o_part, lse_part, o_cmp, out, s_slc, S, o_part.stride(0), lse_part.stride(0),
        g_cmp, g_slc, g_win,
        HEAD_DIM=D, S_PAD=max(2, triton.next_power_of_2(S)), num_warps=4 if S * D <= 32 * 128 else 8,
    )
    return out


__all__ = ["branch_splits", "branches_tile_config", "nsa_decode_branches"]
