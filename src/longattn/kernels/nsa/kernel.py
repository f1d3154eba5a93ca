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

from ..online_softmax import finish_rows, online_softmax_step


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
def _split3(x):
    """fp32 ``x`` as three bf16 parts whose sum is exactly ``x`` (8 + 8 + 8 mantissa bits) for
    ``2^-110 <= |x|`` below bf16's largest value; smaller values lose at most 2^-133 per part,
    where bf16's exponent range ends."""
    x1 = x.to(tl.bfloat16)
    r1 = x - x1.to(tl.float32)
    x2 = r1.to(tl.bfloat16)
    x3 = (r1 - x2.to(tl.float32)).to(tl.bfloat16)
    return x1, x2, x3


@triton.jit
def _mm_split(a, b, SPLIT_A: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with one fp32 operand (``a`` when ``SPLIT_A``, else ``b``) split into three
    bf16 parts (:func:`_split3`) and the other bf16: three 16-bit tensor-core passes whose
    products are exact in fp32, accumulated in fp32 -- as accurate as an fp32 dot up to the
    order of the sums, at about half the cost of ``tf32x3``. ``UPCAST``: the interpreter (parts
    go to fp32 first)."""
    if SPLIT_A:
        x1, x2, x3 = _split3(a)
        out = _mm(x1, b, False, "ieee", UPCAST) + _mm(x2, b, False, "ieee", UPCAST)
        return out + _mm(x3, b, False, "ieee", UPCAST)
    else:
        x1, x2, x3 = _split3(b)
        out = _mm(a, x1, False, "ieee", UPCAST) + _mm(a, x2, False, "ieee", UPCAST)
        return out + _mm(a, x3, False, "ieee", UPCAST)


@triton.jit
def _group_rows(pid_m, pid_bk, num_kv_heads, q_len, G: tl.constexpr, BLOCK_M: tl.constexpr,
                ROWS: tl.constexpr):
    """Batch, KV head, per-row query head offset / local query index / validity of program
    ``(pid_m, pid_bk)``: row ``r`` is head ``r // BLOCK_M`` of the group, query
    ``pid_m * BLOCK_M + r % BLOCK_M``."""
    b = (pid_bk // num_kv_heads).to(tl.int64)  # int64: offsets pass 2^31 at long T x many heads
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    rows = tl.arange(0, ROWS)
    r_head = rows // BLOCK_M
    r_tok = pid_m * BLOCK_M + rows % BLOCK_M
    row_ok = (r_head < G) & (r_tok < q_len)
    return b, kvh, r_head, r_tok, row_ok


@triton.jit
def _group_tile(X, pid_m, pid_bk, num_kv_heads, q_len, q_offset, sxb, sxh, sxt,
                G: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
                D: tl.constexpr):
    """The rows of program ``(pid_m, pid_bk)`` (:func:`_group_rows`) and their tile of ``X``
    (queries or output gradients, ``[B, H, Tq, D]`` strided): batch, KV head, per-row query head,
    local and absolute query index and validity, the head-dim lanes, and ``x [ROWS, HEAD_DIM]``
    (0 outside)."""
    b, kvh, r_head, r_tok, row_ok = _group_rows(pid_m, pid_bk, num_kv_heads, q_len, G, BLOCK_M, ROWS)
    heads = kvh * G + r_head
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    x = tl.load(X + b * sxb + heads[:, None] * sxh + r_tok[:, None] * sxt + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    return b, kvh, heads, r_tok, row_ok, r_tok + q_offset, dims, d_ok, x


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
    UPCAST: tl.constexpr, F32_V: tl.constexpr, UPCAST_V: tl.constexpr, SPLIT_K: tl.constexpr = False,
    SPLIT_UPCAST: tl.constexpr = False,
):
    """``F32``/``UPCAST``: the score dot (Q and K); ``F32_V``/``UPCAST_V``: the P V dot (V may
    be 16-bit while K is fp32). ``SPLIT_K``: bf16 queries against fp32 keys split into three
    bf16 parts (:func:`_mm_split`; ``SPLIT_UPCAST`` under the interpreter) instead of ``PREC``."""
    pid_m = tl.program_id(0)
    b, kvh, heads, r_tok, row_ok, q_abs, dims, d_ok, q = _group_tile(
        Q, pid_m, tl.program_id(1), num_kv_heads, q_len, q_offset, sqb, sqh, sqt, G, BLOCK_M, ROWS, HEAD_DIM, D)
    if not SPLIT_K:
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
        if SPLIT_K:
            s = _mm_split(q, kt, False, SPLIT_UPCAST) * sm_scale_log2
        else:
            s = _mm(q, kt, F32, PREC, UPCAST) * sm_scale_log2  # [ROWS, BLOCK_N], log2 units
        keep = (cols[None, :] * cmp_stride + cmp_block - 1 <= q_abs[:, None]) & c_ok[None, :] & row_ok[:, None]
        s = tl.where(keep, s, float("-inf"))
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        v = tl.load(v_base + cols[:, None] * svt + dims[None, :], mask=c_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(p.to(v.dtype), v, F32_V, PREC, UPCAST_V)

    out, lse = finish_rows(acc, m_i, l_i)
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
    F32: tl.constexpr, PREC: tl.constexpr, UPCAST: tl.constexpr, OVL_SPLIT: tl.constexpr = True,
    SPLIT_UPCAST: tl.constexpr = False, SPLIT_K: tl.constexpr = False,
):
    """``S[b, kvh, t, j]``: sum over the group's heads and the compressed tokens overlapping
    selection block ``j`` of ``exp(s*scale - lse)``. ``BLOCK_N = NB * l'/d``; ``NBP`` = ``NB``
    padded to >= 16 (``tl.dot``); ``E`` spill blocks (``E <= NB``). ``OVL_SPLIT``: the fp32
    probabilities enter the 0/1 overlap dot as three bf16 parts whose sum is exactly ``p`` for
    ``2^-110 <= p`` below bf16's largest value (``p`` is a probability here; smaller ones lose at
    most 2^-133 per part, where bf16's exponent range ends), three 16-bit passes with exact
    products and fp32 accumulation; else fp32 operands with ``PREC``. ``SPLIT_K``: the score dot
    as in :func:`_cmp_fwd` (bf16 queries, fp32 keys in three bf16 parts). ``SPLIT_UPCAST``: both
    splits' parts go to fp32 first, for the interpreter."""
    ROWS: tl.constexpr = GP * BLOCK_M
    pid_m = tl.program_id(0)
    b, kvh, heads, r_tok, row_ok, q_abs, dims, d_ok, q = _group_tile(
        Q, pid_m, tl.program_id(1), num_kv_heads, q_len, q_offset, sqb, sqh, sqt, G, BLOCK_M, ROWS, HEAD_DIM, D)
    if not SPLIT_K:
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
        if SPLIT_K:
            s = _mm_split(q, kt, False, SPLIT_UPCAST)
        else:
            s = _mm(q, kt, F32, PREC, UPCAST)
        keep = (cols[None, :] * cmp_stride + cmp_block - 1 <= q_abs[:, None]) & c_ok[None, :] & row_ok[:, None]
        p = tl.where(keep, tl.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)  # [ROWS, BLOCK_N]
        if OVL_SPLIT:  # p = p1 + p2 + p3 exactly; w is 0/1, exact in bf16
            per_blk = _mm_split(p, w.to(tl.bfloat16), True, SPLIT_UPCAST)
        else:
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


@triton.jit
def _select_rank(
    S, IDX, CNT, FULL,
    ssb, ssh, sst, sib, sih, sit, scb, sch, sfb, sfh, sft,
    q_len, n_blocks, q_offset, num_kv_heads, select_block, top_k, n_init, n_local, row_stride, slice_base,
    BLOCK_R: tl.constexpr, NB_PAD: tl.constexpr, K_PAD: tl.constexpr,
    KV_LENS=None, HAS_KV_LENS: tl.constexpr = False, CAUSAL: tl.constexpr = True,
):
    """Block selection of ``BLOCK_R`` consecutive rows of one ``(batch, head)`` from their
    scores ``S[b, kvh, t, :n_blocks]``: ``count = min(eligible, top_k)`` blocks -- the forced
    ones, then by score (NaN and -inf as the lowest float, +inf as the largest), ties to the
    lower index -- written ascending to ``IDX[b, kvh, t, :count]`` (0 after, up to ``top_k``),
    with ``FULL`` (block wholly at or before the row's position) and ``CNT``.
    Row ``t`` sits at position ``t * row_stride + q_offset`` (``row_stride`` 1: a query per row,
    NSA; the block size: a query block per row, whose first query is that position, block
    top-k), plus ``KV_LENS[b]`` when ``HAS_KV_LENS`` (per-sequence lengths, as in decoding;
    clamped to ``[1, n_blocks * select_block]``, so a length outside the cache ranks like the
    nearest valid one, as the decode selectors' reference clamps lengths). The program's
    ``(batch, head)`` slice is ``program_id(1) + slice_base`` (launches of at most 65535 slices).
    ``CAUSAL``: block ``j`` is eligible iff ``j * select_block <= position``, else every block
    is (and every kept block is full)."""
    pid_r = tl.program_id(0)
    pid_bk = tl.program_id(1) + slice_base
    b = (pid_bk // num_kv_heads).to(tl.int64)
    kvh = (pid_bk % num_kv_heads).to(tl.int64)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # [BLOCK_R] local row index
    r_ok = r < q_len
    pos = r * row_stride + q_offset  # absolute position (of the row's first query)
    if HAS_KV_LENS:
        kv_l = tl.load(KV_LENS + b).to(tl.int32)
        pos = pos + tl.minimum(tl.maximum(kv_l, 1), n_blocks * select_block)
    c = tl.arange(0, NB_PAD)  # block index
    cb = c[None, :]
    eligible = (cb < n_blocks) & r_ok[:, None]  # [BLOCK_R, NB_PAD]
    if CAUSAL:
        eligible = eligible & (cb * select_block <= pos[:, None])
    own = pos // select_block
    forced = eligible & ((cb < n_init) | ((cb <= own[:, None]) & (cb > own[:, None] - n_local)))
    s = tl.load(S + b * ssb + kvh * ssh + r[:, None].to(tl.int64) * sst + cb, mask=eligible, other=0.0)
    # order-preserving int32 keys from the float bits, in integer operations only (exact for
    # subnormals whatever the float mode): non-negative floats keep their bits, negative ones
    # flip the low 31 bits (a larger magnitude gives a smaller key). NaN -> -FLT_MAX (eligible,
    # ties with the lowest float), +-inf -> +-FLT_MAX, -0 -> +0; forced blocks get the key of
    # +inf, ineligible ones that of -inf (below every eligible key).
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where((bits & 0x7FFFFFFF) > 0x7F800000, -8388609, bits)  # NaN -> -FLT_MAX (0xFF7FFFFF)
    bits = tl.where(bits == 0x7F800000, 0x7F7FFFFF, bits)  # +inf -> FLT_MAX
    bits = tl.where(bits == -8388608, -8388609, bits)  # -inf (0xFF800000) -> -FLT_MAX
    bits = tl.where(bits == -2147483648, 0, bits)  # -0 -> +0
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    key = tl.where(forced, 2139095040, tl.where(eligible, key, -2139095041))  # keys of +inf / -inf
    n_elig = tl.sum(eligible.to(tl.int32), axis=1)  # [BLOCK_R]
    count = tl.minimum(n_elig, top_k)

    # per row, a threshold t such that the keys > t number fewer than count and the keys >= t
    # at least count (the tie rule below then keeps the right set). Invariant until a row's
    # exact hit: count(key >= lo) >= count > count(key >= hi); the search ends when hi = lo + 1
    # in every row of the program. It starts on the row's own key range: forced blocks (the key of
    # +inf) are kept whatever the threshold, so if they alone fill the row, t is that key;
    # otherwise lo = the smallest eligible key (all n_elig >= count of them are >= lo) and hi =
    # one past the largest unforced eligible key (only the n_forced < count forced keys are >=
    # hi). A step whose count is exactly ``count`` ends the row (lo = mid, hi = mid + 1; the
    # invariant's right half may then fail): the keys >= mid are exactly the kept ones, the
    # keys > mid fewer than count, and the tie rule below keeps all of them. Float
    # keys of one row span far fewer than 2^32 values and the exact hit comes once the interval
    # is about as narrow as the gap between the count-th and the next key: ~10-20 steps instead
    # of 32. lo, hi are int64 (hi - lo can pass 2^31); mid lies in the int32 range.
    # Eligible keys lie above the key of -inf, so no ineligible block reaches the threshold.
    INF_KEY: tl.constexpr = 2139095040
    unforced = eligible & ~forced
    n_forced = tl.sum(forced.to(tl.int32), axis=1)
    k_min = tl.min(tl.where(eligible, key, INF_KEY), axis=1).to(tl.int64)
    k_max = tl.max(tl.where(unforced, key, -2139095041), axis=1).to(tl.int64)
    filled = n_forced >= count
    lo = tl.where(filled, INF_KEY, k_min)
    hi = tl.where(filled, INF_KEY + 1, k_max + 1)
    while tl.max(hi - lo, axis=0) > 1:
        mid = lo + ((hi - lo) >> 1)
        n_ge = tl.sum((key >= mid.to(tl.int32)[:, None]).to(tl.int32), axis=1)
        ok = n_ge >= count
        lo = tl.where(ok, mid, lo)
        hi = tl.where(n_ge == count, mid + 1, tl.where(ok, hi, mid))
    thr = lo.to(tl.int32)[:, None]
    above = key > thr  # all kept: fewer than count of them
    tie = key == thr  # the lowest-index ties fill the rest
    n_above = tl.sum(above.to(tl.int32), axis=1)
    tie_rank = tl.cumsum(tie.to(tl.int32), axis=1)  # 1 for the lowest-index tie
    kept = (above | (tie & (tie_rank <= (count - n_above)[:, None]))) & eligible

    slot = tl.cumsum(kept.to(tl.int32), axis=1) - 1  # ascending order
    i_row = IDX + b * sib + kvh * sih + r[:, None].to(tl.int64) * sit
    f_row = FULL + b * sfb + kvh * sfh + r[:, None].to(tl.int64) * sft
    if CAUSAL:
        full = (cb + 1) * select_block - 1 <= pos[:, None]
    else:
        full = tl.full([BLOCK_R, NB_PAD], 1, tl.int1)  # every kept block: no token rule inside it
    tl.store(i_row + slot, tl.broadcast_to(cb, [BLOCK_R, NB_PAD]).to(tl.int32), mask=kept)
    tl.store(f_row + slot, full.to(tl.int8), mask=kept)
    w = tl.arange(0, K_PAD)[None, :]
    rest = (w >= count[:, None]) & (w < top_k) & r_ok[:, None]
    tl.store(i_row + w, tl.zeros([BLOCK_R, K_PAD], tl.int32), mask=rest)
    tl.store(f_row + w, tl.zeros([BLOCK_R, K_PAD], tl.int8), mask=rest)
    tl.store(CNT + b * scb + kvh * sch + r, count.to(tl.int32), mask=r_ok)
