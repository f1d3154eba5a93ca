"""Sparse decoding with the block selection fused in: score the blocks (top-k by pooled keys or
Quest page bounds), rank them, attend over the kept ones split-K, merge -- in one or two kernel
launches per decoding step instead of four (score, rank, attend, merge).

At 128k cached tokens a decoding step reads a few MB, which the H200 moves in a few
microseconds; every launch and every dependent round trip through memory costs about as much.
So the step is one kernel, ``_select_attend_kernel``, grid ``(B * Hkv, num_splits)``: program
``(row, s)`` owns split ``s`` of the ``(sequence, KV head)`` pair ``row``. It runs in one of three
modes (``PHASE``):

* ``PHASE = 1`` scores: the program scores the tiles ``s, s + S, s + 2S, ...`` of ``BLOCK_NB``
  blocks of its row (:func:`.select._tile_scores`) into ``Scores [B * Hkv, nBlocks]`` (fp32).
* ``PHASE = 2`` attends: the program loads its row's scores, ranks them
  (:func:`.select._rank_keep`: every program of the row computes the same kept set, so no
  index list goes through memory), takes its share of the kept blocks' chunks, runs the online
  softmax over them (:func:`.kernel._attend_chunk`) and writes a partial output and LSE. The
  program that finishes its row last (an atomic counter in ``Sync``) merges the row's partials
  through their LSE and writes the output. With ``num_splits = 1`` it writes the output
  directly.
* ``PHASE = 3`` does both in one launch: after scoring, the programs of a row wait for each
  other at a barrier (an atomic counter in ``Sync``). That is only safe when every program of
  the grid is resident at once, so this mode is launched cooperatively (the driver refuses a
  grid that cannot be co-resident rather than letting it hang) and is never used by the Triton
  interpreter, which runs programs one after another.

Two launches (``PHASE = 1`` then ``PHASE = 2``) may use programmatic dependent launch
(``USE_GDC``, Hopper and later): the second kernel starts while the first finishes and waits
(``griddepcontrol.wait``) only before it reads the scores.

The scores and the selection are those of :func:`longattn.decode.select_topk_blocks` /
:func:`longattn.decode.select_quest_pages` with ``backend="triton"`` (same helpers, same tie
rule: the lower block index), and the attention is that of
:func:`longattn.decode.sparse_decode` (same chunk loop and merge).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .kernel import (
    _LOG2E,
    MAX_BLOCK_M,
    _attend_chunk,
    _dot_mode,
    _group_rows,
    _merge_rows,
    _next_pow2,
    _ready,
    _sm_count,
    _store_rows,
    choose_num_splits,
    tile_config,
)
from .select import MAX_SELECT_BLOCKS, _n_blocks, _rank_keep, _rank_warps, _tile_scores

FUSED_MODES = ("single", "pdl", "two")
SCORE_TILE = 32  # blocks scored per tile (BLOCK_NB)


@triton.jit
def _select_attend_kernel(
    Q, KM, KMIN, KMAX, K, V, Lens, Scores, Op, Lp, O, L, Sync,
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_mb, stride_mh, stride_mn, stride_md,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_os, stride_ls,
    num_kv_heads, nb_max, top_k, n_sink, n_local, num_splits,
    G: tl.constexpr, TQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_MODE: tl.constexpr,
    SCORE_ROWS: tl.constexpr, BLOCK_NB: tl.constexpr, NB_PAD: tl.constexpr, QUEST: tl.constexpr,
    S_PAD: tl.constexpr, MERGE_ROWS: tl.constexpr, MERGE_D: tl.constexpr,
    PHASE: tl.constexpr, USE_GDC: tl.constexpr, SPLIT: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_pairs = tl.num_programs(0)
    b = (pid // num_kv_heads).to(tl.int64)
    hkv = (pid % num_kv_heads).to(tl.int64)
    nb = _n_blocks(Lens, b, BLOCK_SIZE, nb_max)
    row_scores = Scores + pid.to(tl.int64) * nb_max

    if PHASE != 2:  # score this program's tiles of the row
        if USE_GDC:
            tl.extra.cuda.gdc_launch_dependents()  # the attention kernel may start its prologue now
        for tile in range(pid_s, tl.cdiv(nb, BLOCK_NB), num_splits):
            n, n_ok, s = _tile_scores(
                Q, KM, KMIN, KMAX, b, hkv, tile * BLOCK_NB, nb,
                stride_qb, stride_qh, stride_qt, stride_qd, stride_mb, stride_mh, stride_mn, stride_md,
                G, TQ, HEAD_DIM, SCORE_ROWS, BLOCK_NB, QUEST)
            tl.store(row_scores + n, s, mask=n_ok)
    if PHASE == 3:  # barrier of the row's programs (all co-resident: cooperative launch)
        tl.debug_barrier()  # every thread's score stores precede the release below
        tl.atomic_add(Sync + pid, 1, sem="release")
        arrived = tl.atomic_add(Sync + pid, 0, sem="acquire")
        spins = 0
        while (arrived < num_splits) & (spins < 16777216):  # the bound only guards against a bug
            arrived = tl.atomic_add(Sync + pid, 0, sem="acquire")
            spins += 1
        tl.debug_barrier()
    if PHASE != 1:
        kv_len = tl.load(Lens + b).to(tl.int64)
        rows, row_ok, head, qi, flat = _group_rows(b, hkv, 0, num_kv_heads, G, TQ, BLOCK_M)
        q_pos = kv_len - TQ + qi  # absolute position of each row's query
        d = tl.arange(0, HEAD_DIM)
        q = tl.load(Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :] * stride_qd,
                    mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]
        if USE_GDC:
            tl.extra.cuda.gdc_wait()  # the scoring kernel has finished and its stores are visible
        c = tl.arange(0, NB_PAD)
        # .cg: through L2, not a line of L1 that another program's stores did not update
        sc = tl.load(row_scores + c, mask=c < nb, other=0.0, cache_modifier=".cg")
        kept, count = _rank_keep(sc, c, nb, top_k, n_sink, n_local, NB_PAD)
        slot_of = tl.cumsum(kept.to(tl.int32), axis=0) - 1  # slot of each kept block, ascending

        total = count * CHUNKS  # this split's share of the work list (kept blocks x chunks)
        per = tl.cdiv(total, num_splits)
        u_lo = pid_s * per
        u_hi = tl.minimum(u_lo + per, total)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        k_base = K + b * stride_kb + hkv * stride_kh
        v_base = V + b * stride_vb + hkv * stride_vh
        for u in range(u_lo, u_hi):
            blk = tl.sum(tl.where(kept & (slot_of == u // CHUNKS), c, 0), axis=0).to(tl.int64)
            m_i, l_i, acc = _attend_chunk(
                q, k_base, v_base, blk, u % CHUNKS, kv_len, q_pos, row_ok, m_i, l_i, acc, qk_scale,
                stride_kt, stride_kd, stride_vt, stride_vd, BLOCK_SIZE, HEAD_DIM, BLOCK_N, DOT_MODE)
        if SPLIT:
            _store_rows(acc, m_i, l_i, Op + pid_s * stride_os, Lp + pid_s * stride_ls, flat, row_ok, HEAD_DIM)
            tl.debug_barrier()  # every thread's partial stores precede the release below
            done = tl.atomic_add(Sync + n_pairs + pid, 1, sem="acq_rel")
            if done == num_splits - 1:  # the row's last program: every partial is written
                tl.debug_barrier()
                _merge_rows(Op, Lp, O, L, (b * num_kv_heads * G + hkv * G) * TQ, G * TQ, num_splits,
                            stride_os, stride_ls, HEAD_DIM, S_PAD, MERGE_ROWS, MERGE_D, True)
        else:
            _store_rows(acc, m_i, l_i, O, L, flat, row_ok, HEAD_DIM)


def fused_unsupported_reason(group: int, q_len: int, n_blocks: int) -> str | None:
    """``None`` when the fused kernel can serve this shape (dtype and head dim are checked by
    :func:`longattn.kernels.decode.unsupported_reason`), else why not."""
    if group * q_len > MAX_BLOCK_M:
        return f"the fused decode kernel holds at most {MAX_BLOCK_M} rows (G * Tq) per program, got {group * q_len}"
    if max(16, _next_pow2(n_blocks)) > MAX_SELECT_BLOCKS:
        return f"the fused decode kernel ranks at most {MAX_SELECT_BLOCKS} blocks per row, got {n_blocks}"
    return None


def select_attend_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_size: int,
    top_k: int,
    n_sink: int,
    n_local: int,
    scale: float,
    key_means: Tensor | None = None,
    bounds: tuple[Tensor, Tensor] | None = None,
    num_splits: int | None = None,
    mode: str = "pdl",
) -> tuple[Tensor, Tensor]:
    """Select and attend (inputs already checked by the caller; see
    :func:`longattn.decode.topk_decode`). ``q [B, H, Tq, D]``, caches ``[B, Hkv, Tmax, D]``,
    ``cache_seqlens [B]``; exactly one of ``key_means float32 [B, Hkv, nBlocks, D]`` (top-k) or
    ``bounds = (kmin, kmax)`` in q's dtype (Quest). ``mode``: ``"single"`` (one cooperative
    launch, CUDA only), ``"pdl"`` (two launches, the second a programmatic dependent launch;
    CUDA only) or ``"two"`` (two plain launches). Returns ``out [B, H, Tq, D]`` in q's dtype and
    ``lse float32 [B, H, Tq]``."""
    _ready(q.device)
    if mode not in FUSED_MODES:
        raise ValueError(f"mode must be one of {FUSED_MODES}, got {mode!r}")
    on_gpu = q.device.type == "cuda"
    if mode != "two" and not on_gpu:
        raise ValueError(f"mode={mode!r} needs a CUDA GPU (the interpreter runs programs one at a time); use 'two'")
    B, H, Tq, D = q.shape
    quest = bounds is not None
    meta = bounds[0] if quest else key_means
    Hkv, nb_max = meta.shape[1], meta.shape[2]
    G = H // Hkv
    reason = fused_unsupported_reason(G, Tq, nb_max)
    if reason is not None:
        raise ValueError(reason)
    out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if B == 0:
        return out, lse
    cfg = tile_config(G, Tq, block_size, D, q.dtype)
    pairs = B * Hkv
    if num_splits is None:
        num_splits = choose_num_splits(pairs, 1, min(top_k, nb_max) * cfg["CHUNKS"], _sm_count(q.device))
    split = num_splits > 1
    scores = torch.empty(pairs, nb_max, dtype=torch.float32, device=q.device)
    sync = torch.zeros(2, pairs, dtype=torch.int32, device=q.device)
    if split:
        o_part = torch.empty(num_splits, B, H, Tq, D, dtype=torch.float32, device=q.device)
        l_part = torch.empty(num_splits, B, H, Tq, dtype=torch.float32, device=q.device)
    else:
        o_part, l_part = out, lse  # not written
    kmin, kmax = bounds if quest else (meta, meta)
    nb_pad = max(16, _next_pow2(nb_max))
    merge_rows = _next_pow2(G * Tq)
    s_pad = max(2, _next_pow2(num_splits))
    args = (
        q, meta, kmin, kmax, k_cache, v_cache, cache_seqlens, scores, o_part, l_part, out, lse, sync,
        scale * _LOG2E,
        *q.stride(), *meta.stride(), *k_cache.stride(), *v_cache.stride(),
        o_part.stride(0) if split else 0, l_part.stride(0) if split else 0,
        Hkv, nb_max, top_k, n_sink, n_local, num_splits,
    )
    meta_args = dict(
        G=G, TQ=Tq, BLOCK_SIZE=block_size, CHUNKS=cfg["CHUNKS"], HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
        BLOCK_N=cfg["BLOCK_N"], DOT_MODE=_dot_mode(q.dtype), SCORE_ROWS=max(16, _next_pow2(G * Tq)),
        BLOCK_NB=SCORE_TILE, NB_PAD=nb_pad, QUEST=quest, S_PAD=s_pad, MERGE_ROWS=merge_rows,
        MERGE_D=min(D, max(16, 4096 // (s_pad * merge_rows))), SPLIT=split,
        num_warps=max(cfg["num_warps"], _rank_warps(nb_pad)), num_stages=cfg["num_stages"],
    )
    grid = (pairs, num_splits)
    if mode == "single":
        _select_attend_kernel[grid](*args, **meta_args, PHASE=3, USE_GDC=False, launch_cooperative_grid=True)
    else:
        pdl = mode == "pdl"
        extra = {"launch_pdl": True} if pdl else {}
        _select_attend_kernel[grid](*args, **meta_args, PHASE=1, USE_GDC=pdl)
        _select_attend_kernel[grid](*args, **meta_args, PHASE=2, USE_GDC=pdl, **extra)
    return out, lse


__all__ = ["FUSED_MODES", "fused_unsupported_reason", "select_attend_triton"]
