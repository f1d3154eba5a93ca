"""NSA decoding kernels: the compressed branch and the selection-block scores of a few queries
per sequence over a KV cache whose length differs per sequence (Native Sparse Attention, Yuan
et al., 2025; used by :func:`longattn.decode_nsa.nsa_decode` for ``backend="triton"``).

A decoding step has ``Tq <= 16`` queries per sequence and ``nC`` compressed tokens (thousands at
long contexts) per ``(sequence, KV head)``: the prefill kernels of :mod:`longattn.kernels.nsa`
(one program per query tile) would run ``B * Hkv`` programs, far too few for a GPU. Here the
compressed tokens are split (split-K, as in :mod:`longattn.kernels.decode`):

* ``_cmp_decode_split`` -- grid ``(B * Hkv, num_splits, row_tiles)``. A program owns the ``G =
  H // Hkv`` query heads x ``Tq`` query rows of one ``(sequence, KV head)`` (``r = g * Tq +
  t``, padded to >= 16 rows for ``tl.dot``; more than 16 (fp32 tokens) or 32 rows take more
  row tiles) and a contiguous share of the ``BLOCK_N``-token tiles of the compressed tokens the
  sequence's last query can see (computed from ``cache_seqlens[b]`` on the device: no host
  sync, and a short sequence uses few tiles). Online softmax (base 2, fp32) gives the split's
  partial output and LSE -- a flash-decoding loop -- and each tile's raw scores (log2 units,
  ``-inf`` where a row cannot see the token) are stored in ``[B, H, Tq, nC]`` fp32, every
  visible token by exactly one split.
* ``_cmp_decode_merge`` -- grid ``(B * Hkv, G * Tq + chunks)``. The first ``G * Tq`` programs
  of a ``(sequence, KV head)`` merge one row's split partials through their LSE (output in
  q's dtype, natural-log LSE); the others each take a chunk of selection blocks, recompute the
  rows' merged base-2 LSE and write ``p_slc[b, kvh, t, j] = sum_g sum_i exp2(s[b, h, t, i] -
  lse2[b, h, t])`` over the visible tokens ``i`` in ``[j*R - E, (j+1)*R)`` that overlap block
  ``j`` (``R = select_block / compress_stride`` start in it, ``E = compress_block /
  compress_stride - 1`` reach into it from before; 0 for blocks no visible token reaches).

The previous split kernel mapped each tile's probabilities onto its blocks itself (a dot with a
0/1 overlap matrix, block sums and maxima stored per tile, spill tokens loaded twice); storing
the raw scores instead keeps the loop a plain flash-decoding loop.

Query ``t`` of sequence ``b`` sits at ``p = cache_seqlens[b] - Tq + t`` and sees compressed
token ``i`` iff ``i * compress_stride + compress_block - 1 <= p`` (so only tokens wholly inside
the valid prefix are read: tokens past a sequence's end may hold anything). A row that sees
nothing gets output 0, LSE ``-inf`` and scores 0.

The per-row top-k over ``p_slc`` is :func:`longattn.kernels.nsa.select_blocks` with its
``kv_lens`` argument (per-sequence positions).

Cost (bytes set the floor: a few query rows per KV head, so the dots are small): the visible
compressed keys and values once per ``(sequence, KV head)`` and row tile; per split a partial
output row ``D`` fp32 per query row; the raw scores ``B x H x Tq x nC`` fp32, written once and
read once by the merge. At 64k keys with the paper's config (``nC = 4095``, fp32 tokens, ``Hkv =
8``, D = 128, ``Tq = 1``): 33.5 MB of compressed K/V (16.8 MB as bf16), about 7 us at the
H200's 4.8 TB/s; 0.5 MB of scores; the partial rows about 0.5 MB.

Precision: fp32 compressed keys (the mean compression's output) against 16-bit queries upcast
the queries (exact); 16-bit keys in q's dtype use the native 16-bit dot (fp32 accumulation).
fp32 products use ``tf32x3`` on GPUs (near-fp32 on tensor cores) and IEEE fp32 in the
interpreter. ``P @ V`` takes P in the values' dtype: fp32 for fp32 tokens, rounded to the
16-bit dtype for 16-bit tokens (as flash attention does; the output is 16-bit then). The
block scores are sums of fp32 ``exp2`` values and equal the PyTorch path's
(:func:`longattn.decode_nsa.nsa_decode` with ``backend="reference"``) up to fp32 rounding, so
both pick the same blocks except between scores that differ by about 1e-6 relative; exact ties
(rows that see nothing, equal probabilities over equal counts of tokens) stay exact ties, broken
toward the lower index.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...selection import _ceil_div
from .. import interpreting, triton_unavailable_reason
from ..decode import choose_num_splits
from ..decode.kernel import _sm_count
from ..launch import fast
from . import _pow2_at_least
from ..online_softmax import online_softmax_step
from .kernel import _mm

MAX_DECODE_QUERIES = 16
SUPPORTED_QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP32_DOT_PRECISION = "tf32x3"  # fp32 operands on GPUs; the interpreter uses IEEE fp32
# Split-kernel tiles, (fp32 compressed tokens?) -> max rows per program (G * Tq padded to a power
# of two >= 16; more rows take more row tiles, grid axis 2) and compressed tokens per tile at
# D <= 128 (halved at D = 256; 16-bit tokens with 32+ rows take half). With the ptxas of Triton
# 3.6 for sm_90a none spills (4 warps at D <= 128, 8 at D = 256; fp32 D = 256 with one pipeline
# stage): tests/test_nsa_decode_kernel.py compiles them for sm_90.
MAX_ROWS = {True: 16, False: 32}
BASE_BLOCK_N = {True: 32, False: 64}
MERGE_ELEMENTS = 8192  # rows x blocks x overlapped tokens of one score-merge program
MAX_GRID_Y = 65535  # CUDA's limit on grid axis 1 (the merge's rows + block chunks)

# Tests set this to fill every buffer the kernels write (outputs and the split workspace) with
# NaN before launching: an element left unwritten, or read before it is written, shows up as NaN.
POISON_BUFFERS = False


def _block_n(head_dim: int, fp32: bool, block_m: int) -> int:
    """Compressed tokens per tile: :data:`BASE_BLOCK_N` (halved for D = 256 and for 16-bit
    tiles of more than 16 rows)."""
    base = BASE_BLOCK_N[fp32]
    if head_dim > 128:
        base //= 2
    if not fp32 and block_m > 16:
        base //= 2
    return max(16, base)


def _geometry(compress_block: int, compress_stride: int, select_block: int) -> tuple[int, int]:
    """``(R, E)``: compressed tokens starting in one selection block, and tokens starting in
    earlier blocks that reach into it. Block ``j`` overlaps tokens ``[j*R - E, (j+1)*R)``."""
    return select_block // compress_stride, compress_block // compress_stride - 1


def decode_tile_config(
    group: int, q_len: int, head_dim: int, *, fp32: bool, compress_block: int, compress_stride: int,
    select_block: int, block_n: int | None = None,
) -> dict[str, int]:
    """Compile-time tile sizes of the split kernel for one call shape (``fp32``: the compressed
    tokens are fp32, else 16-bit in q's dtype), and the block geometry the score merge uses.

    ``BLOCK_M``: rows per program (``G * Tq`` padded to a power of two in [16, MAX_ROWS]; more
    rows take more row tiles, grid axis 2, each re-reading the tokens). ``BLOCK_N``: compressed
    tokens per tile (:func:`_block_n`, or ``block_n``). ``R``, ``E``: :func:`_geometry`;
    ``REP``: ``R + E`` (the tokens one block overlaps) padded to a power of two. 4 warps at
    ``D <= 128``: at B = 16 and 64k keys (H200, 2026-11-30, the previous kernel with the same
    tiles) 8 warps took 1.5-2x as long."""
    R, E = _geometry(compress_block, compress_stride, select_block)
    rows = group * q_len
    block_m = min(MAX_ROWS[fp32], max(16, _pow2_at_least(rows)))
    if block_n is None:
        block_n = _block_n(head_dim, fp32, block_m)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "R": R,
        "E": E,
        "REP": _pow2_at_least(R + E),
        "row_tiles": _ceil_div(rows, block_m),
        "num_warps": 4 if head_dim <= 128 else 8,
        # fp32 D = 256: no room for a second stage; fp32 at D <= 128 gains from a third (B = 16,
        # 64k keys: 179 against 241 us with 4 splits)
        "num_stages": (1 if head_dim > 128 else 3) if fp32 else 2,
    }


def _merge_chunk(group: int, q_len: int, rep: int, num_blocks: int) -> int:
    """Selection blocks per score-merge program: ``GP * TQP * REP * NBC <= MERGE_ELEMENTS``."""
    rows = _pow2_at_least(group) * _pow2_at_least(q_len)
    return max(1, min(_pow2_at_least(num_blocks), MERGE_ELEMENTS // (rows * rep)))


def decode_unsupported_reason(
    q: Tensor, k_cmp: Tensor, *, compress_block: int, compress_stride: int, select_block: int,
    num_blocks: int | None = None,
) -> str | None:
    """``None`` when :func:`nsa_decode_compressed` can run on these inputs, else why not
    (device, dtypes, head dim, block geometry; with ``num_blocks``, the merge's grid)."""
    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        return reason
    if q.dtype not in SUPPORTED_QUERY_DTYPES:
        return f"the NSA decode kernels take float16, bfloat16 or float32 queries, got {q.dtype}"
    if not (k_cmp.is_floating_point() and k_cmp.dtype in (torch.float16, torch.bfloat16, torch.float32,
                                                          torch.float64)):
        return f"the NSA decode kernels take floating-point compressed keys, got {k_cmp.dtype}"
    D = q.shape[-1]
    if D < 16 or D > 256 or D & (D - 1):
        return f"the NSA decode kernels need a head dim that is a power of two in [16, 256], got D={D}"
    if compress_block % compress_stride or select_block % compress_stride:
        return (f"the NSA decode kernels need compress_block={compress_block} and select_block={select_block} to "
                f"be multiples of compress_stride={compress_stride}")
    R, E = _geometry(compress_block, compress_stride, select_block)
    G, Tq = q.shape[1] // max(1, k_cmp.shape[1]), q.shape[2]
    rows = _pow2_at_least(max(1, G)) * _pow2_at_least(max(1, Tq))
    if rows * _pow2_at_least(R + E) > MERGE_ELEMENTS:
        return (f"a selection block overlaps {R + E} compressed tokens (select_block / compress_stride + "
                f"compress_block / compress_stride - 1); the score merge holds them for the {rows} padded query "
                f"rows of a KV head in at most {MERGE_ELEMENTS} elements")
    if num_blocks is not None:
        chunks = _ceil_div(num_blocks, _merge_chunk(G, Tq, _pow2_at_least(R + E), num_blocks))
        if G * Tq + chunks > MAX_GRID_Y:
            return (f"the score merge would need {G * Tq + chunks} programs per (sequence, KV head), past CUDA's "
                    f"grid limit of {MAX_GRID_Y} ({num_blocks} selection blocks, {G * Tq} query rows)")
    return None


# ---------------------------------------------------------------------------- kernels
@triton.jit
def _visible(kv_len, n_cmp, n_blocks, cmp_block, cmp_stride, R: tl.constexpr, E: tl.constexpr):
    """``(n_vis, nb_need)`` of a sequence of ``kv_len`` keys: the compressed tokens its last
    query sees, ``clamp(floor((kv_len - l) / d) + 1, 0, nC)`` (non-negative integer divisions
    only), and the selection blocks they reach (block ``j`` overlaps tokens ``[j*R - E,
    (j+1)*R)``); 0 blocks when no token is visible."""
    n_vis = tl.minimum(tl.maximum(kv_len - cmp_block + cmp_stride, 0) // cmp_stride, n_cmp)
    nb_need = tl.where(n_vis > 0, tl.minimum((n_vis + E + R - 1) // R, n_blocks), 0)
    return n_vis, nb_need


@triton.jit
def _cmp_decode_split(
    Q, K, V, Lens, OP, LP, SR,
    qk_scale,  # scale * log2(e)
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt,
    split_stride_o, split_stride_l,  # elements between splits in OP and LP
    n_cmp, num_kv_heads, num_splits, cmp_block, cmp_stride,
    G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr,
):
    """One split of one ``(sequence, KV head)`` and row tile: partial output ``OP[s, b, h, t]``
    (normalised, fp32; 0 where the split's tokens are all invisible), base-2 LSE ``LP[s, b, h,
    t]`` (``-inf`` then) and the raw scores ``SR[b, h, t, i]`` (log2 units, ``-inf`` where row
    ``t`` cannot see token ``i``) of the tokens the split owns. ``OP``/``LP``/``SR`` are
    contiguous."""
    pid_bk = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bk // num_kv_heads).to(tl.int64)
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    kv_len = tl.load(Lens + b).to(tl.int32)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # r = g * TQ + t
    row_ok = rows < G * TQ
    t = rows % TQ
    head = kvh * G + rows // TQ
    pos = kv_len - TQ + t  # absolute query positions [BLOCK_M]
    flat = (b * num_kv_heads * G + head) * TQ + t  # row of [B, H, Tq] (int64)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b * sqb + head[:, None] * sqh + t[:, None] * sqt + d[None, :], mask=row_ok[:, None], other=0.0)
    q = q.to(K.dtype.element_ty)  # 16-bit queries against fp32 compressed keys: exact upcast

    # this split's tiles of the tokens the sequence's last query sees
    n_vis = tl.minimum(tl.maximum(kv_len - cmp_block + cmp_stride, 0) // cmp_stride, n_cmp)
    n_tiles = (n_vis + BLOCK_N - 1) // BLOCK_N
    per = (n_tiles + num_splits - 1) // num_splits
    t_lo = pid_s * per
    t_hi = tl.minimum(t_lo + per, n_tiles)

    n = tl.arange(0, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    for tile in range(t_lo, t_hi):
        tok = tile * BLOCK_N + n  # compressed token index [BLOCK_N]
        tok_ok = tok < n_vis  # never loads a token past the last query's view
        kt = tl.load(k_base + tok[None, :] * skt + d[:, None], mask=tok_ok[None, :], other=0.0)  # [D, BLOCK_N]
        s = _mm(q, kt, F32, PREC, UPCAST) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
        vis = tok_ok[None, :] & (tok[None, :] * cmp_stride + cmp_block - 1 <= pos[:, None]) & row_ok[:, None]
        s = tl.where(vis, s, float("-inf"))
        tl.store(SR + flat[:, None] * n_cmp + tok[None, :], s, mask=row_ok[:, None] & tok_ok[None, :])
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(v_base + tok[:, None] * svt + d[None, :], mask=tok_ok[:, None], other=0.0)  # [BLOCK_N, D]
        # fp32 tokens: fp32 P (tf32x3); 16-bit tokens: P rounded to their dtype, as flash attention
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32, PREC, UPCAST)

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse2 = tl.where(has, m_i + tl.log2(tl.where(has, l_i, 1.0)), float("-inf"))
    split = pid_s.to(tl.int64)
    tl.store(OP + split * split_stride_o + flat[:, None] * HEAD_DIM + d[None, :], o, mask=row_ok[:, None])
    tl.store(LP + split * split_stride_l + flat, lse2, mask=row_ok)


@triton.jit
def _merged_lse2(LP, flat, ok, sp, s_ok, split_stride_l):
    """Base-2 LSE of rows ``flat`` merged over the splits (``-inf`` where no split saw a token)."""
    lse_s = tl.load(LP + sp[:, None] * split_stride_l + flat[None, :], mask=s_ok[:, None] & ok[None, :],
                    other=float("-inf"))  # [S_PAD, ROWS]
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    tot = tl.sum(tl.exp2(lse_s - m_safe[None, :]), 0)
    return tl.where(tot > 0.0, m_safe + tl.log2(tl.where(tot > 0.0, tot, 1.0)), float("-inf"))


@triton.jit
def _merge_row(OP, LP, O, LSE, b, kvh, r, H, sp, s_ok, sob, soh, sot, slb, slh, split_stride_o, split_stride_l,
               G: tl.constexpr, TQ: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Row ``r = g * TQ + t`` of one ``(sequence, KV head)``: the splits' partial outputs weighted
    by their LSE; output in O's dtype and the natural-log LSE."""
    t = r % TQ
    head = kvh * G + r // TQ
    flat = (b * H + head) * TQ + t
    lse_s = tl.load(LP + sp * split_stride_l + flat, mask=s_ok, other=float("-inf"))  # [S_PAD]
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wgt = tl.exp2(lse_s - m_safe)  # 0 for a split that saw nothing (its partial row is 0)
    tot = tl.sum(wgt, 0)
    has = tot > 0.0
    d = tl.arange(0, HEAD_DIM)
    o_s = tl.load(OP + sp[:, None] * split_stride_o + flat * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    out = tl.sum(wgt[:, None] * o_s, 0) / tl.where(has, tot, 1.0)
    lse = tl.where(has, (m_safe + tl.log2(tl.where(has, tot, 1.0))) * 0.6931471805599453, float("-inf"))
    tl.store(O + b * sob + head * soh + t * sot + d, out.to(O.dtype.element_ty))
    tl.store(LSE + b * slb + head * slh + t, lse)


@triton.jit
def _merge_scores(LP, SR, PS, b, kvh, c, H, n_vis, n_cmp, n_blocks, sp, s_ok, spb, sph, spt, split_stride_l,
                  G: tl.constexpr, TQ: tl.constexpr, GP: tl.constexpr, TQP: tl.constexpr, NBC: tl.constexpr,
                  R: tl.constexpr, E: tl.constexpr, REP: tl.constexpr):
    """Scores of blocks ``[c*NBC, (c+1)*NBC)`` of one ``(sequence, KV head)``: per row ``rr = g *
    TQP + t``, ``exp2(s - lse2)`` of the visible tokens ``[j*R - E, (j+1)*R)`` overlapping block
    ``j``, summed over them and over the ``G`` heads."""
    rr = tl.arange(0, GP * TQP)
    g = rr // TQP
    t = rr % TQP
    ok = (g < G) & (t < TQ)
    flat = (b * H + kvh * G + g) * TQ + t
    lse2 = _merged_lse2(LP, flat, ok, sp, s_ok, split_stride_l)  # [ROWS]
    j = c * NBC + tl.arange(0, NBC)
    e = tl.arange(0, REP)
    tok = j[:, None] * R - E + e[None, :]  # [NBC, REP]
    tok_ok = (e < R + E)[None, :] & (tok >= 0) & (tok < n_vis) & (j < n_blocks)[:, None]
    s = tl.load(SR + flat[:, None, None] * n_cmp + tok[None, :, :], mask=ok[:, None, None] & tok_ok[None, :, :],
                other=float("-inf"))  # [ROWS, NBC, REP], -inf where invisible
    lse2_safe = tl.where(lse2 == float("-inf"), 0.0, lse2)  # rows that see nothing have only -inf scores
    p = tl.where(s == float("-inf"), 0.0, tl.exp2(s - lse2_safe[:, None, None]))  # NaN (unwritten) stays NaN
    blk = tl.sum(p, 2)  # [ROWS, NBC]
    ps = tl.sum(tl.reshape(blk, [GP, TQP, NBC]), 0)  # [TQP, NBC]: summed over the group's heads
    tq = tl.arange(0, TQP)
    tl.store(PS + b * spb + kvh * sph + tq[:, None] * spt + j[None, :], ps,
             mask=(tq < TQ)[:, None] & (j < n_blocks)[None, :])


@triton.jit
def _cmp_decode_merge(
    OP, LP, SR, Lens, O, LSE, PS,
    sob, soh, sot, slb, slh, spb, sph, spt,
    split_stride_o, split_stride_l, num_splits,
    n_cmp, n_blocks, num_kv_heads, cmp_block, cmp_stride,
    G: tl.constexpr, TQ: tl.constexpr, GP: tl.constexpr, TQP: tl.constexpr, HEAD_DIM: tl.constexpr,
    S_PAD: tl.constexpr, R: tl.constexpr, E: tl.constexpr, REP: tl.constexpr, NBC: tl.constexpr,
):
    """Programs ``(bk, r < G*TQ)``: row ``r`` of the group, merged over the splits (output and
    natural-log LSE). Programs ``(bk, G*TQ + c)``: scores of blocks ``[c*NBC, (c+1)*NBC)`` for
    the group's ``Tq`` rows, summed over its ``G`` heads (0 for blocks no visible token reaches)."""
    pid_bk = tl.program_id(0)
    pid = tl.program_id(1)
    b = (pid_bk // num_kv_heads).to(tl.int64)
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    H = num_kv_heads * G
    sp = tl.arange(0, S_PAD)
    s_ok = sp < num_splits
    sp = sp.to(tl.int64)  # split offsets: S x B x H x Tq x D elements may pass 2^31
    if pid < G * TQ:
        _merge_row(OP, LP, O, LSE, b, kvh, pid, H, sp, s_ok, sob, soh, sot, slb, slh, split_stride_o,
                   split_stride_l, G, TQ, HEAD_DIM)
    else:
        n_vis, _ = _visible(tl.load(Lens + b).to(tl.int32), n_cmp, n_blocks, cmp_block, cmp_stride, R, E)
        _merge_scores(LP, SR, PS, b, kvh, pid - G * TQ, H, n_vis, n_cmp, n_blocks, sp, s_ok, spb, sph, spt,
                      split_stride_l, G, TQ, GP, TQP, NBC, R, E, REP)


# ---------------------------------------------------------------------------- wrappers
def _buffer(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """An uninitialised buffer (NaN-filled when :data:`POISON_BUFFERS` is set)."""
    if POISON_BUFFERS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def _check_pos_int(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_inputs(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cache_seqlens: Tensor, l: int, d: int, ls: int,
                  num_blocks: int) -> None:
    for name, t in (("q", q), ("k_cmp", k_cmp), ("v_cmp", v_cmp), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if q.dim() != 4 or k_cmp.dim() != 4:
        raise ValueError(f"expected q [B, H, Tq, D] and k_cmp, v_cmp [B, Hkv, nC, D], got q {tuple(q.shape)}, "
                         f"k_cmp {tuple(k_cmp.shape)}")
    if v_cmp.shape != k_cmp.shape:
        raise ValueError(f"v_cmp must have k_cmp's shape {tuple(k_cmp.shape)}, got {tuple(v_cmp.shape)}")
    B, H, Tq, D = q.shape
    if k_cmp.shape[0] != B or k_cmp.shape[3] != D:
        raise ValueError(f"q {tuple(q.shape)} and k_cmp {tuple(k_cmp.shape)} differ in batch or head dim")
    Hkv = k_cmp.shape[1]
    if H == 0 or Hkv == 0 or H % Hkv:
        raise ValueError(f"q's heads H={H} must be a positive multiple of k_cmp's heads Hkv={Hkv} (GQA)")
    if not 1 <= Tq <= MAX_DECODE_QUERIES:
        raise ValueError(f"q has Tq={Tq} queries per sequence; the decode kernels take 1..{MAX_DECODE_QUERIES}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64) or cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must be an int32/int64 tensor of shape [B]=({B},), got "
                         f"{cache_seqlens.dtype} {tuple(cache_seqlens.shape)}")
    for name, val in (("compress_block", l), ("compress_stride", d), ("select_block", ls),
                      ("num_blocks", num_blocks)):
        _check_pos_int(name, val)
    nC = k_cmp.shape[2]
    if nC and (nC - 1) * d >= num_blocks * ls:
        raise ValueError(f"num_blocks={num_blocks} selection blocks of {ls} keys end before compressed token "
                         f"{nC - 1} (keys from {(nC - 1) * d}); num_blocks must be ceil(Tmax / select_block)")
    reason = decode_unsupported_reason(q, k_cmp, compress_block=l, compress_stride=d, select_block=ls,
                                       num_blocks=num_blocks)
    if reason is not None:
        raise ValueError(f"the NSA decode kernels cannot run: {reason}")


def _dot_args(dtype: torch.dtype) -> dict:
    fp32 = dtype == torch.float32
    interp = interpreting()
    return dict(F32=fp32, PREC="ieee" if interp else FP32_DOT_PRECISION, UPCAST=interp and not fp32)


def nsa_decode_compressed(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    cache_seqlens: Tensor,
    *,
    compress_block: int,
    compress_stride: int,
    select_block: int,
    num_blocks: int,
    scale: float,
    num_splits: int | None = None,
    block_n: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """NSA's compressed branch and selection-block scores for decoding (Native Sparse
    Attention, Yuan et al., 2025), split-K over the compressed tokens.

    Args:
        q: ``[B, H, Tq, D]`` (float16/bfloat16/float32, ``1 <= Tq <= 16``, D a power of two in
            [16, 256]); query ``t`` of sequence ``b`` sits at ``p = cache_seqlens[b] - Tq + t``.
        k_cmp, v_cmp: ``[B, Hkv, nC, D]``, ``H % Hkv == 0``, any float dtype (fp32 from the mean
            compression; float64 is computed in float32, 16-bit values differing from q's dtype
            upcast to float32). Token ``i`` summarises keys ``[i*d, i*d + l)``; tokens past a
            sequence's valid prefix may hold anything (never read).
        cache_seqlens: ``int32/int64 [B]``, each in ``[Tq, Tmax]`` -- not checked here (no host
            sync); :func:`longattn.decode_nsa.nsa_decode` checks them unless ``validate=False``.
        compress_block, compress_stride, select_block: ``l``, ``d``, ``l'`` (``l`` and ``l'``
            multiples of ``d``).
        num_blocks: ``nKB``, selection blocks of the cache, ``ceil(Tmax / select_block)``.
        scale: score scale.
        num_splits: programs per ``(sequence, KV head)`` sharing its token tiles; ``None``: a
            heuristic (:func:`longattn.kernels.decode.choose_num_splits`) from the shapes only.
        block_n: compressed tokens per tile (a power of two >= 16); ``None``:
            :func:`decode_tile_config`'s choice. For tests and tuning.

    Returns:
        ``o_cmp [B, H, Tq, D]`` in q's dtype, ``lse float32 [B, H, Tq]`` (natural log; output
        0 and ``-inf`` for a row that sees no compressed token) and ``p_slc float32 [B, Hkv,
        Tq, nKB]``: for each KV head ``g`` and row ``t``, the sum over the query heads of ``g``
        and the visible compressed tokens ``i`` overlapping keys ``[j*l', (j+1)*l')`` of
        ``exp(q . k_i * scale - lse)`` (each overlapping token counted once: paper eq. 9-10 as
        :func:`longattn.methods.nsa.block_scores` reads them).

    No autograd, no host sync (CUDA-graph capturable). Raises ``ValueError``/``TypeError`` on
    inconsistent shapes or inputs the kernels cannot take."""
    l, d, ls = compress_block, compress_stride, select_block
    _check_inputs(q, k_cmp, v_cmp, cache_seqlens, l, d, ls, num_blocks)
    cache_seqlens = cache_seqlens.contiguous()  # the kernels read Lens[b] at unit stride
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number, got {scale!r}")
    if num_splits is not None:
        _check_pos_int("num_splits", num_splits)
    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    dev = q.device
    R, E = _geometry(l, d, ls)
    if block_n is not None and (isinstance(block_n, bool) or not isinstance(block_n, int) or block_n < 16
                                or block_n & (block_n - 1)):
        raise ValueError(f"block_n must be a power of two >= 16 (compressed tokens per tile), got {block_n!r}")

    o_cmp = _buffer((B, H, Tq, D), dev, q.dtype)
    lse = _buffer((B, H, Tq), dev)
    p_slc = _buffer((B, Hkv, Tq, num_blocks), dev)
    if B == 0:
        return o_cmp, lse, p_slc
    if nC == 0:  # the cache is shorter than one compression block: nothing to see
        return o_cmp.zero_(), lse.fill_(float("-inf")), p_slc.zero_()

    # operands in one dtype: 16-bit q against fp32 tokens upcasts in the kernel (exact)
    kdtype = k_cmp.dtype
    if kdtype == torch.float64 or (kdtype != q.dtype and kdtype != torch.float32):
        kdtype = torch.float32
    k_cmp, v_cmp = (t.to(kdtype) if t.dtype != kdtype else t for t in (k_cmp, v_cmp))
    q, k_cmp, v_cmp = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k_cmp, v_cmp))
    cfg = decode_tile_config(G, Tq, D, fp32=kdtype == torch.float32, compress_block=l, compress_stride=d,
                             select_block=ls, block_n=block_n)

    n_tiles_max = _ceil_div(nC, cfg["BLOCK_N"])
    if num_splits is None:
        # about three 4-warp programs per SM (choose_num_splits aims at two): at B = 16 and 64k keys
        # with fp32 tokens 4 splits took 179 us against 225 us with 3
        num_splits = choose_num_splits(B * Hkv, cfg["row_tiles"], n_tiles_max, _sm_count(dev) * 3 // 2)  # <= 64
    o_part = _buffer((num_splits, B, H, Tq, D), dev)
    lse_part = _buffer((num_splits, B, H, Tq), dev)
    raw = _buffer((B, H, Tq, nC), dev)  # scores of the visible tokens, written once, read once
    fast(_cmp_decode_split)[(B * Hkv, num_splits, cfg["row_tiles"])](
        q, k_cmp, v_cmp, cache_seqlens, o_part, lse_part, raw,
        float(scale) * math.log2(math.e),
        *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3],
        o_part.stride(0), lse_part.stride(0),
        nC, Hkv, num_splits, l, d,
        G=G, TQ=Tq, HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        **_dot_args(kdtype), num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    GP, TQP = _pow2_at_least(G), _pow2_at_least(Tq)
    nbc = _merge_chunk(G, Tq, cfg["REP"], num_blocks)
    fast(_cmp_decode_merge)[(B * Hkv, G * Tq + _ceil_div(num_blocks, nbc))](
        o_part, lse_part, raw, cache_seqlens, o_cmp, lse, p_slc,
        *o_cmp.stride()[:3], *lse.stride()[:2], *p_slc.stride()[:3],
        o_part.stride(0), lse_part.stride(0), num_splits,
        nC, num_blocks, Hkv, l, d,
        G=G, TQ=Tq, GP=GP, TQP=TQP, HEAD_DIM=D, S_PAD=max(2, _pow2_at_least(num_splits)), R=cfg["R"],
        E=cfg["E"], REP=cfg["REP"], NBC=nbc, num_warps=4 if D <= 128 else 8,
    )
    return o_cmp, lse, p_slc


__all__ = [
    "MAX_DECODE_QUERIES",
    "decode_tile_config",
    "decode_unsupported_reason",
    "nsa_decode_compressed",
]
