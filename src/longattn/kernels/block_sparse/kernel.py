"""Triton kernels of block-sparse attention over a :class:`~longattn.selection.BlockSelection`.

FlashAttention-2 style kernels (online softmax in fp32, scores never stored):

* ``_fwd`` -- query-major. One program owns ``BLOCK_M`` consecutive queries of one selection
  row for ``P`` query heads that share both that selection row and one KV head (a GQA group
  with a group-shared selection: each selected K/V chunk is loaded once for all ``P`` heads,
  as in NSA's kernel). Its ``ROWS = P * BLOCK_M`` rows (padded to at least 16 for ``tl.dot``)
  walk the row's selected key blocks in ``BLOCK_N``-token chunks. Writes ``O`` and the
  log-sum-exp.
* ``_bwd_dq`` -- query-major like the forward: recomputes the probabilities from the saved
  log-sum-exp and accumulates ``dQ``.
* ``_bwd_dkdv`` -- key-major. A dK/dV program owns ``BLOCK_N`` keys of one key block and one KV
  head and visits every query block that selected that key block (a transposed, CSR copy of
  the selection built in plain PyTorch), for every query head of the KV head: ``dK`` and
  ``dV`` are summed in registers, no atomics. For per-token selections (``q_block = 1``, NSA)
  each step gathers ``BLOCK_M`` of the selecting tokens, so the tile is full even though no two
  consecutive tokens need share a selection. The kernel runs work items: a whole program, which
  writes dK/dV, or a range of the steps of a long program, which writes fp32 partial sums that
  ``_sum_dkdv_parts`` adds in a fixed order (a block every token selects would otherwise make
  one program as long as many others together).
* ``_fwd_tokens`` / ``_merge_slots`` / ``_bwd_dq_tokens`` -- the key-major forward and dQ of
  per-token selections (``q_block = 1``): one program per work item (a key block and up to
  ``BLOCK_M`` of the tokens that chose it), so each block is loaded once per tile instead of
  once per token. Each program writes its rows' result over that block alone into the block's
  slot of the token's selection; ``_merge_slots`` combines the forward's slots through their
  LSEs, and ``_sum_slots`` sums the dQ slots.

Token-level rules inside selected blocks (the selection's :class:`TokenRule`): end-aligned
causality, a window (one- or two-sided) with sink tokens; out-of-range queries and keys are
masked. A query that reads no key gets output 0 and log-sum-exp ``-inf``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..online_softmax import backward_row_stats, finish_rows, online_softmax_step, online_softmax_step_lazy

@triton.jit
def _mm(a, b, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """``a @ b`` with fp32 accumulation. ``IEEE``: exact fp32 products for fp32 inputs (not
    TF32). ``UPCAST``: the interpreter's dot mishandles 16-bit floats, so there the operands
    go to fp32 first -- the same arithmetic, since products of 16-bit floats are exact in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _token_mask(q_abs, k_pos, kv_len, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                TWO_SIDED: tl.constexpr, window, sink):
    """``[ROWS, BLOCK_N]`` keep-mask from absolute query positions ``q_abs [ROWS]`` and key
    positions ``k_pos [BLOCK_N]``."""
    keep = k_pos[None, :] < kv_len
    if CAUSAL:
        keep = keep & (k_pos[None, :] <= q_abs[:, None])
    if HAS_WINDOW:
        near = (q_abs[:, None] - k_pos[None, :]) < window
        if TWO_SIDED:
            near = near & ((k_pos[None, :] - q_abs[:, None]) < window)
        near = near | (k_pos[None, :] < sink)
        keep = keep & near
    return keep


@triton.jit
def _query_rows(pid_m, pid_bh, num_heads, heads_per_kv, heads_per_sel, q_block, q_len,
                P: tl.constexpr, BLOCK_M: tl.constexpr, ROWS: tl.constexpr):
    """The rows of program ``(pid_m, pid_bh)`` of the query-major kernels: batch ``b``, first
    query head ``h0``, its KV head and selection head, the selection row of the tile, and per
    row its head offset, local query index and validity."""
    groups = num_heads // P
    # int64: batch and head offsets pass 2^31 elements at long T with several sequences
    b = (pid_bh // groups).to(tl.int64)
    h0 = ((pid_bh % groups) * P).to(tl.int64)
    q_start = pid_m * BLOCK_M
    rows = tl.arange(0, ROWS)
    r_head = rows // BLOCK_M
    r_tok = q_start + rows % BLOCK_M  # local query index
    row_ok = (r_head < P) & (r_tok < q_len)
    # the whole tile lies in one selection row (BLOCK_M divides q_block)
    return b, h0, h0 // heads_per_kv, h0 // heads_per_sel, q_start // q_block, r_head, r_tok, row_ok


@triton.jit
def _attend_chunk(acc, m_i, l_i, q, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok, kv_len,
                  sm_scale_log2, window, sink, visible, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                  TWO_SIDED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr, LAZY: tl.constexpr):
    """One online-softmax step of the forward kernels: the rows ``q [ROWS, HEAD_DIM]`` (absolute
    positions ``q_abs``) against the keys ``k_pos [BLOCK_N]`` of one KV head. ``visible``: every
    valid row sees every key of the chunk, so the token mask is skipped (it would keep every
    score of those rows; invalid rows are never stored). ``LAZY``: rescale the accumulator only
    when a maximum grows past ``LAZY_RESCALE_LOG2`` (the query-major forward, whose long rows of
    64-key steps gain from it; the key-major forward's short 32-key items were slower with it)."""
    k_ok = k_pos < kv_len
    kt = tl.load(k_base + k_pos[None, :] * skt + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    s = _mm(q, kt, IEEE, UPCAST)
    s = s * sm_scale_log2  # [ROWS, BLOCK_N], log2 units
    if not visible:
        keep = _token_mask(q_abs, k_pos, kv_len, CAUSAL, HAS_WINDOW, TWO_SIDED, window, sink)
        keep = keep & row_ok[:, None]
        s = tl.where(keep, s, float("-inf"))
    if LAZY:
        p, acc, m_i, l_i = online_softmax_step_lazy(s, m_i, l_i, acc)
    else:
        p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
        acc = acc * alpha[:, None]
    v = tl.load(v_base + k_pos[:, None] * svt + dims[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
    acc = acc + _mm(p.to(v.dtype), v, IEEE, UPCAST)
    return acc, m_i, l_i


@triton.jit
def _fwd(
    Q, K, V, O, LSE, KVN, KVI,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sob, soh, sot, slb, slh,
    snb, snh, snq, sib, sih, siq,
    q_len, kv_len, q_offset, q_block, num_heads, heads_per_kv, heads_per_sel,
    sm_scale_log2, window, sink,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b, h0, kvh, hs, row_sel, r_head, r_tok, row_ok = _query_rows(
        tl.program_id(0), tl.program_id(1), num_heads, heads_per_kv, heads_per_sel, q_block, q_len,
        P, BLOCK_M, ROWS)
    q_abs = r_tok + q_offset
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D

    q_ptr = Q + b * sqb + (h0 + r_head)[:, None] * sqh + r_tok[:, None] * sqt + dims[None, :]
    q = tl.load(q_ptr, mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    n_sel = tl.load(KVN + b * snb + hs * snh + row_sel * snq)
    idx_base = KVI + b * sib + hs * sih + row_sel * siq
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    CHUNKS: tl.constexpr = KV_BLOCK // BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    q_lo = (tl.program_id(0) * BLOCK_M + q_offset).to(tl.int32)  # the tile's first query position
    for t in range(0, n_sel * CHUNKS):
        kb = tl.load(idx_base + t // CHUNKS)
        c_first = kb * KV_BLOCK + (t % CHUNKS) * BLOCK_N
        k_pos = c_first + cols
        # a chunk below kv_len that every query of the tile may see needs no token mask
        # (most of a causal top-k row: all its blocks but the diagonal one)
        c_last = c_first + BLOCK_N - 1
        visible = c_last < kv_len
        if CAUSAL:
            visible = visible & (c_last <= q_lo)
        if HAS_WINDOW:
            visible = visible & (c_last < 0)
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok,
                                      kv_len, sm_scale_log2, window, sink, visible, CAUSAL, HAS_WINDOW, TWO_SIDED,
                                      IEEE, UPCAST, True)

    out, lse = finish_rows(acc, m_i, l_i)
    o_ptr = O + b * sob + (h0 + r_head)[:, None] * soh + r_tok[:, None] * sot + dims[None, :]
    tl.store(o_ptr, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + (h0 + r_head) * slh + r_tok, lse, mask=row_ok)


@triton.jit
def _token_item_rows(ITEM_KEY, ITEM_START, ITEM_STOP, T_TOK, T_SLOT, sel_batch, sel_heads, num_kv_blocks, groups,
                     batch_from_sel, tok_base, q_offset, heads_per_kv, heads_per_sel, P: tl.constexpr,
                     BLOCK_M: tl.constexpr, ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
                     CAUSAL: tl.constexpr):
    """The rows of program ``(item, b * groups + g)`` of the key-major per-token kernels: work item
    ``item`` is one key block ``kb`` and up to ``BLOCK_M`` entries of the list of tokens that
    selected it; row ``r`` is head ``r // BLOCK_M`` of the group and entry ``r % BLOCK_M``.
    Returns the batch, per-row heads, the KV head, ``kb``, per row the token (within the chunk of
    queries, and in ``q``), its slot in the token's selection, validity, absolute position, and
    how many ``BLOCK_N``-key chunks of the block can hold a visible key."""
    item = tl.program_id(0)
    pid1 = tl.program_id(1)
    key = tl.load(ITEM_KEY + item)
    start = tl.load(ITEM_START + item)
    stop = tl.load(ITEM_STOP + item)
    kb = key % num_kv_blocks
    hs = (key // num_kv_blocks) % sel_heads
    sb = (key // (num_kv_blocks * sel_heads)) % sel_batch  # keys also carry the query chunk
    g = pid1 % groups
    # int64 batch and head offsets, as in _query_rows
    b = tl.where(batch_from_sel != 0, sb, pid1 // groups).to(tl.int64)
    h0 = (hs * heads_per_sel + g * P).to(tl.int64)
    rows = tl.arange(0, ROWS)
    r_head = rows // BLOCK_M
    ent = start + rows % BLOCK_M
    ent_ok = ent < stop
    r_tok = tl.load(T_TOK + ent, mask=ent_ok, other=0)
    slot = tl.load(T_SLOT + ent, mask=ent_ok, other=0)
    row_ok = (r_head < P) & ent_ok
    q_tok = (r_tok + tok_base).to(tl.int64)  # int64: token offsets of a [B, T, H, D] view pass 2^31
    q_abs = q_tok + q_offset
    CHUNKS: tl.constexpr = KV_BLOCK // BLOCK_N
    n_chunks = CHUNKS
    if CAUSAL:
        # the lists are sorted by token: chunks past the tile's last query see nothing
        last = tl.max(tl.where(row_ok, q_abs, -1), 0)
        n_chunks = tl.minimum(tl.maximum(last - kb * KV_BLOCK + BLOCK_N, 0) // BLOCK_N, CHUNKS)
    return b, h0 + r_head, h0 // heads_per_kv, kb, r_tok, slot, row_ok, q_tok, q_abs, n_chunks


@triton.jit
def _fwd_tokens(
    Q, K, V, OP, LP, ITEM_KEY, ITEM_START, ITEM_STOP, T_TOK, T_SLOT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sopb, soph, sopt, sops, slpb, slph, slpt,
    sel_batch, sel_heads, num_kv_blocks, groups, batch_from_sel,
    tok_base, kv_len, q_offset, heads_per_kv, heads_per_sel,
    sm_scale_log2, window, sink,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Key-major forward for per-token selections (``q_block = 1``: MoBA's per-token gate, NSA's
    selected branch). Program ``(item, b * groups + g)``: one key block and up to ``BLOCK_M`` of the
    tokens that selected it (work item ``item`` of the transposed selection), for ``P`` query heads.
    Each K/V chunk of the block is loaded once for all of them (a query-major program would load
    it once per token). Writes, per (head, token), the attention over this block alone --
    normalised output ``OP [.., slot, :]`` (bf16 or fp32: ``partial_dtype``) and natural-log LSE ``LP [.., slot]`` -- at the
    block's slot in the token's selection; :func:`_merge_slots` combines the slots."""
    b, heads, kvh, kb, r_tok, slot, row_ok, q_tok, q_abs, n_chunks = _token_item_rows(
        ITEM_KEY, ITEM_START, ITEM_STOP, T_TOK, T_SLOT, sel_batch, sel_heads, num_kv_blocks, groups, batch_from_sel,
        tok_base, q_offset, heads_per_kv, heads_per_sel, P, BLOCK_M, ROWS, KV_BLOCK, BLOCK_N, CAUSAL)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + q_tok[:, None] * sqt + dims[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    m_i = tl.full([ROWS], float("-inf"), tl.float32)
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for c in range(0, n_chunks):
        k_pos = kb * KV_BLOCK + c * BLOCK_N + cols
        acc, m_i, l_i = _attend_chunk(acc, m_i, l_i, q, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok,
                                      kv_len, sm_scale_log2, window, sink, False, CAUSAL, HAS_WINDOW, TWO_SIDED,
                                      IEEE, UPCAST, False)
    out, lse = finish_rows(acc, m_i, l_i)
    part = b * slpb + heads * slph + r_tok * slpt + slot
    tl.store(OP + b * sopb + heads[:, None] * soph + r_tok[:, None] * sopt + slot[:, None] * sops + dims[None, :],
             out.to(OP.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LP + part, lse, mask=row_ok)


@triton.jit
def _slot_tile(tok_base, t_len, num_heads, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program ``(t, b * H + h)`` of the slot kernels (:func:`_merge_slots`, :func:`_sum_slots`):
    batch, head, the ``BLOCK_T`` tokens of the chunk (and their validity and index in ``q``),
    feature indices and their validity."""
    pid_t = tl.program_id(0)
    pid_bh = tl.program_id(1)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    return ((pid_bh // num_heads).to(tl.int64), (pid_bh % num_heads).to(tl.int64), toks, toks < t_len,
            (toks + tok_base).to(tl.int64), dims, dims < D)


@triton.jit
def _merge_slots(
    OP, LP, O, LSE,
    sopb, soph, sopt, sops, slpb, slph, slpt, sob, soh, sot, slb, slh,
    tok_base, t_len, num_heads, n_slots,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """Combines the per-block results of :func:`_fwd_tokens` through their LSEs: program
    ``(t, b * H + h)`` writes ``O`` and ``LSE`` of ``BLOCK_T`` tokens. A slot no block wrote
    keeps LSE ``-inf`` and is not read; a token with no finite slot gets output 0, LSE ``-inf``."""
    b, h, toks, t_ok, q_tok, dims, d_ok = _slot_tile(tok_base, t_len, num_heads, D, HEAD_DIM, BLOCK_T)
    m = tl.full([BLOCK_T], float("-inf"), tl.float32)
    den = tl.zeros([BLOCK_T], tl.float32)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    lp = LP + b * slpb + h * slph + toks * slpt
    op = OP + b * sopb + h * soph + toks[:, None] * sopt + dims[None, :]
    for s in range(0, n_slots):
        lse_s = tl.load(lp + s, mask=t_ok, other=float("-inf"))
        m_new = tl.maximum(m, lse_s)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        w = tl.exp(lse_s - m_use)
        o_s = tl.load(op + s * sops, mask=(t_ok & (lse_s > float("-inf")))[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o_s
        den = den * alpha + w
        m = m_new
    has = den > 0
    out = acc / tl.where(has, den, 1.0)[:, None]
    lse = tl.where(has, m + tl.log(tl.where(has, den, 1.0)), float("-inf"))
    tl.store(O + b * sob + h * soh + q_tok[:, None] * sot + dims[None, :], out.to(O.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])
    tl.store(LSE + b * slb + h * slh + q_tok, lse, mask=t_ok)


@triton.jit
def _bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, KVN, KVI,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdqb, sdqh, sdqt, slb, slh,
    snb, snh, snq, sib, sih, siq,
    q_len, kv_len, q_offset, q_block, num_heads, heads_per_kv, heads_per_sel,
    sm_scale, window, sink,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    b, h0, kvh, hs, row_sel, r_head, r_tok, row_ok = _query_rows(
        tl.program_id(0), tl.program_id(1), num_heads, heads_per_kv, heads_per_sel, q_block, q_len,
        P, BLOCK_M, ROWS)
    q_abs = r_tok + q_offset
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    tile_ok = row_ok[:, None] & d_ok[None, :]

    q = tl.load(Q + b * sqb + (h0 + r_head)[:, None] * sqh + r_tok[:, None] * sqt + dims[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * sdob + (h0 + r_head)[:, None] * sdoh + r_tok[:, None] * sdot + dims[None, :], mask=tile_ok, other=0.0)
    lse2, delta = backward_row_stats(LSE, DELTA, b * slb + (h0 + r_head) * slh + r_tok, row_ok)
    sm_scale_log2 = sm_scale * 1.4426950408889634

    n_sel = tl.load(KVN + b * snb + hs * snh + row_sel * snq)
    idx_base = KVI + b * sib + hs * sih + row_sel * siq
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh

    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    CHUNKS: tl.constexpr = KV_BLOCK // BLOCK_N
    cols = tl.arange(0, BLOCK_N)
    for t in range(0, n_sel * CHUNKS):
        kb = tl.load(idx_base + t // CHUNKS)
        k_pos = kb * KV_BLOCK + (t % CHUNKS) * BLOCK_N + cols
        dq = _dq_chunk(dq, q, do, lse2, delta, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok, kv_len,
                       sm_scale_log2, window, sink, CAUSAL, HAS_WINDOW, TWO_SIDED, IEEE, UPCAST)
    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + (h0 + r_head)[:, None] * sdqh + r_tok[:, None] * sdqt + dims[None, :],
             dq.to(DQ.dtype.element_ty), mask=tile_ok)


@triton.jit
def _dq_chunk(dq, q, do, lse2, delta, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok, kv_len,
              sm_scale_log2, window, sink, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
              TWO_SIDED: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """Adds to ``dq [ROWS, HEAD_DIM]`` (without the softmax scale) the keys ``k_pos`` of one KV
    head's share, probabilities recomputed from the rows' log2 LSE ``lse2``."""
    k_ok = k_pos < kv_len
    kt = tl.load(k_base + k_pos[None, :] * skt + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    vt = tl.load(v_base + k_pos[None, :] * svt + dims[:, None], mask=k_ok[None, :] & d_ok[:, None], other=0.0)
    s = _mm(q, kt, IEEE, UPCAST)
    dp = _mm(do, vt, IEEE, UPCAST)
    keep = _token_mask(q_abs, k_pos, kv_len, CAUSAL, HAS_WINDOW, TWO_SIDED, window, sink) & row_ok[:, None]
    p = tl.where(keep, tl.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)
    ds = p * (dp - delta[:, None])
    return dq + _mm(ds.to(kt.dtype), tl.trans(kt), IEEE, UPCAST)


@triton.jit
def _bwd_dq_tokens(
    Q, K, V, DO, DQP, LSE, DELTA, ITEM_KEY, ITEM_START, ITEM_STOP, T_TOK, T_SLOT,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot, sdpb, sdph, sdpt, sdps, slb, slh,
    sel_batch, sel_heads, num_kv_blocks, groups, batch_from_sel,
    tok_base, kv_len, q_offset, heads_per_kv, heads_per_sel,
    sm_scale_log2, window, sink,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Key-major dQ for per-token selections, laid out like :func:`_fwd_tokens`: each program
    writes its rows' dQ over one key block (fp32, without the softmax scale) at the block's slot
    in ``DQP [.., slot, :]``; :func:`_sum_slots` sums the slots."""
    b, heads, kvh, kb, r_tok, slot, row_ok, q_tok, q_abs, n_chunks = _token_item_rows(
        ITEM_KEY, ITEM_START, ITEM_STOP, T_TOK, T_SLOT, sel_batch, sel_heads, num_kv_blocks, groups, batch_from_sel,
        tok_base, q_offset, heads_per_kv, heads_per_sel, P, BLOCK_M, ROWS, KV_BLOCK, BLOCK_N, CAUSAL)
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + q_tok[:, None] * sqt + dims[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * sdob + heads[:, None] * sdoh + q_tok[:, None] * sdot + dims[None, :], mask=tile_ok,
                 other=0.0)
    lse2, delta = backward_row_stats(LSE, DELTA, b * slb + heads * slh + q_tok, row_ok)
    k_base = K + b * skb + kvh * skh
    v_base = V + b * svb + kvh * svh
    dq = tl.zeros([ROWS, HEAD_DIM], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for c in range(0, n_chunks):
        k_pos = kb * KV_BLOCK + c * BLOCK_N + cols
        dq = _dq_chunk(dq, q, do, lse2, delta, q_abs, row_ok, k_base, v_base, skt, svt, k_pos, dims, d_ok, kv_len,
                       sm_scale_log2, window, sink, CAUSAL, HAS_WINDOW, TWO_SIDED, IEEE, UPCAST)
    tl.store(DQP + b * sdpb + heads[:, None] * sdph + r_tok[:, None] * sdpt + slot[:, None] * sdps + dims[None, :],
             dq, mask=tile_ok)


@triton.jit
def _sum_slots(
    DQP, KVN, DQ,
    sdpb, sdph, sdpt, sdps, snb, snh, snt, sdqb, sdqh, sdqt,
    tok_base, t_len, num_heads, heads_per_sel, n_slots, scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr,
):
    """dQ of the key-major backward: program ``(t, b * H + h)`` sums, for ``BLOCK_T`` tokens, the
    per-block shares :func:`_bwd_dq_tokens` wrote in the slots the token's selection fills
    (``KVN``: its count of blocks; the other slots are never written, so never read), times the
    softmax scale, in ``DQ``'s dtype."""
    b, h, toks, t_ok, q_tok, dims, d_ok = _slot_tile(tok_base, t_len, num_heads, D, HEAD_DIM, BLOCK_T)
    cnt = tl.load(KVN + b * snb + (h // heads_per_sel) * snh + q_tok * snt, mask=t_ok, other=0)
    acc = tl.zeros([BLOCK_T, HEAD_DIM], tl.float32)
    part = DQP + b * sdpb + h * sdph + toks[:, None] * sdpt + dims[None, :]
    for s in range(0, n_slots):
        acc += tl.load(part + s * sdps, mask=(t_ok & (s < cnt))[:, None] & d_ok[None, :], other=0.0)
    tl.store(DQ + b * sdqb + h * sdqh + q_tok[:, None] * sdqt + dims[None, :], (acc * scale).to(DQ.dtype.element_ty),
             mask=t_ok[:, None] & d_ok[None, :])


@triton.jit
def _dkdv_rows(dk, dv, k, v, Q, DO, LSE, DELTA, b, heads, r_tok, row_ok, dims, d_ok, k_pos,
               sqb, sqh, sqt, sdob, sdoh, sdot, slb, slh, kv_len, q_offset, sm_scale_log2, window, sink,
               CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
               UPCAST: tl.constexpr):
    """Adds to ``dk, dv [BLOCK_N, HEAD_DIM]`` the contribution of the query rows ``(heads,
    r_tok)`` (masked by ``row_ok``) to the keys ``k_pos``. Not on transposed tiles, as the NSA
    compressed branch's dK/dV kernel is: measured on the H200 at 64k, the transposed form took
    13.7 ms for MoBA's gathered token rows against 7.0 here, and 14.1 against 9.9 for NSA's."""
    tile_ok = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + heads[:, None] * sqh + r_tok[:, None] * sqt + dims[None, :], mask=tile_ok, other=0.0)
    do = tl.load(DO + b * sdob + heads[:, None] * sdoh + r_tok[:, None] * sdot + dims[None, :], mask=tile_ok, other=0.0)
    lse2, delta = backward_row_stats(LSE, DELTA, b * slb + heads * slh + r_tok, row_ok)
    s = _mm(q, tl.trans(k), IEEE, UPCAST)
    dp = _mm(do, tl.trans(v), IEEE, UPCAST)
    keep = _token_mask(r_tok + q_offset, k_pos, kv_len, CAUSAL, HAS_WINDOW, TWO_SIDED, window, sink)
    keep = keep & row_ok[:, None]
    p = tl.where(keep, tl.exp2(s * sm_scale_log2 - lse2[:, None]), 0.0)  # [ROWS, BLOCK_N]
    ds = p * (dp - delta[:, None])
    dv += _mm(tl.trans(p.to(do.dtype)), do, IEEE, UPCAST)
    dk += _mm(tl.trans(ds.to(q.dtype)), q, IEEE, UPCAST)
    return dk, dv


@triton.jit
def _key_chunk_program(prog, num_kv_heads, key_chunks):
    """Program ``prog = (b * Hkv + kvh) * key_chunks + n`` of the dK/dV kernels: its batch and KV
    head (int64, as in :func:`_query_rows`) and key chunk ``n``."""
    pid_bk = prog // key_chunks
    return (pid_bk // num_kv_heads).to(tl.int64), (pid_bk % num_kv_heads).to(tl.int64), prog % key_chunks


@triton.jit
def _bwd_dkdv(
    Q, K, V, DO, DK, DV, DKP, DVP, LSE, DELTA, T_OFF, T_QB, ITEMS,
    sqb, sqh, sqt, skb, skh, skt, svb, svh, svt, sdob, sdoh, sdot,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt, slb, slh,
    sel_batch, sel_heads, num_kv_blocks,
    q_len, kv_len, q_offset, q_block, num_heads, heads_per_kv, heads_per_sel,
    sm_scale, window, sink,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, P: tl.constexpr, BLOCK_M: tl.constexpr,
    ROWS: tl.constexpr, KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, TWO_SIDED: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, TOKEN_LIST: tl.constexpr,
):
    """Program ``i`` runs work item ``ITEMS[i] = (prog, lo, hi, slot)`` (int32 ``[items, 4]``).
    Program ``prog = (b * Hkv + kvh) * key_chunks + n`` (``key_chunks = num_kv_blocks *
    KV_BLOCK // BLOCK_N``) owns keys ``[n * BLOCK_N, (n + 1) * BLOCK_N)`` of KV head ``kvh``: for
    each group ``g`` of ``P`` of the KV head's query heads it walks the list of the query blocks
    that selected its key block -- ``T_OFF [sel_batch * sel_heads * num_kv_blocks + 1]`` /
    ``T_QB``, per (selection batch, selection head, key block) -- each step one tile of
    ``BLOCK_M`` query rows per head. ``TOKEN_LIST`` (per-token selections, ``q_block = 1``, as
    NSA's): each step gathers the next ``BLOCK_M`` tokens of the list (not one token per step).
    The item does steps ``[lo, hi)`` of the concatenation of its groups' lists, in ``g`` order.
    ``slot < 0`` (the item is its whole program): dK (times ``sm_scale``) and dV go to ``DK`` /
    ``DV`` in their dtype. Else the fp32 sums, without the scale, go to slot ``slot`` of ``DKP`` /
    ``DVP`` (contiguous ``[slots, BLOCK_N, D]``) for :func:`_sum_dkdv_parts`."""
    item = tl.program_id(0)
    prog = tl.load(ITEMS + item * 4)
    lo = tl.load(ITEMS + item * 4 + 1)
    hi = tl.load(ITEMS + item * 4 + 2)
    slot = tl.load(ITEMS + item * 4 + 3)
    CHUNKS: tl.constexpr = KV_BLOCK // BLOCK_N
    b, kvh, pid_n = _key_chunk_program(prog, num_heads // heads_per_kv, num_kv_blocks * CHUNKS)
    kb = pid_n // CHUNKS
    k_pos = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < kv_len
    dims = tl.arange(0, HEAD_DIM)
    d_ok = dims < D
    kv_tile_ok = k_ok[:, None] & d_ok[None, :]

    k = tl.load(K + b * skb + kvh * skh + k_pos[:, None] * skt + dims[None, :], mask=kv_tile_ok, other=0.0)
    v = tl.load(V + b * svb + kvh * svh + k_pos[:, None] * svt + dims[None, :], mask=kv_tile_ok, other=0.0)
    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    sm_scale_log2 = sm_scale * 1.4426950408889634
    sel_b = b % sel_batch  # the selection batch is 1 (shared) or B: 0 or b, without a branch

    rows = tl.arange(0, ROWS)
    r_head = rows // BLOCK_M
    r_in = rows % BLOCK_M
    tiles_per_qblock = (q_block + BLOCK_M - 1) // BLOCK_M
    # the query heads of this KV head, P at a time (P heads share a selection head)
    for g in range(0, heads_per_kv // P):
        h0 = kvh * heads_per_kv + g * P
        hs = h0 // heads_per_sel
        key = (sel_b * sel_heads + hs) * num_kv_blocks + kb
        start = tl.load(T_OFF + key)
        stop = tl.load(T_OFF + key + 1)
        heads = h0 + r_head
        # [lo, hi) counts from the start of this group's list: its steps there are [max(lo, 0),
        # min(hi, n_steps)), none when the item ends before the list or starts after it
        if TOKEN_LIST:
            n_steps = (stop - start + BLOCK_M - 1) // BLOCK_M
            for e in range(tl.maximum(lo, 0), tl.minimum(hi, n_steps)):
                ent_ok = (e * BLOCK_M + r_in) < (stop - start)
                r_tok = tl.load(T_QB + start + e * BLOCK_M + r_in, mask=ent_ok, other=0)
                row_ok = (r_head < P) & ent_ok & (r_tok < q_len)
                dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, LSE, DELTA, b, heads, r_tok, row_ok, dims, d_ok, k_pos,
                                    sqb, sqh, sqt, sdob, sdoh, sdot, slb, slh, kv_len, q_offset, sm_scale_log2,
                                    window, sink, CAUSAL, HAS_WINDOW, TWO_SIDED, IEEE, UPCAST)
        else:
            n_steps = (stop - start) * tiles_per_qblock
            for e in range(tl.maximum(lo, 0), tl.minimum(hi, n_steps)):
                qb = tl.load(T_QB + start + e // tiles_per_qblock)
                r_tok = qb * q_block + (e % tiles_per_qblock) * BLOCK_M + r_in
                row_ok = (r_head < P) & (r_tok < q_len) & (r_tok < (qb + 1) * q_block)
                dk, dv = _dkdv_rows(dk, dv, k, v, Q, DO, LSE, DELTA, b, heads, r_tok, row_ok, dims, d_ok, k_pos,
                                    sqb, sqh, sqt, sdob, sdoh, sdot, slb, slh, kv_len, q_offset, sm_scale_log2,
                                    window, sink, CAUSAL, HAS_WINDOW, TWO_SIDED, IEEE, UPCAST)
        lo -= n_steps
        hi -= n_steps
    if slot < 0:
        dk = dk * sm_scale
        tl.store(DK + b * sdkb + kvh * sdkh + k_pos[:, None] * sdkt + dims[None, :], dk.to(DK.dtype.element_ty),
                 mask=kv_tile_ok)
        tl.store(DV + b * sdvb + kvh * sdvh + k_pos[:, None] * sdvt + dims[None, :], dv.to(DV.dtype.element_ty),
                 mask=kv_tile_ok)
    else:
        part = slot.to(tl.int64) * (BLOCK_N * D) + tl.arange(0, BLOCK_N)[:, None] * D + dims[None, :]
        tl.store(DKP + part, dk, mask=kv_tile_ok)
        tl.store(DVP + part, dv, mask=kv_tile_ok)


@triton.jit
def _sum_dkdv_parts(
    DKP, DVP, DK, DV, SPLIT,
    sdkb, sdkh, sdkt, sdvb, sdvh, sdvt,
    kv_len, num_kv_heads, key_chunks, sm_scale,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, SUM_ROWS: tl.constexpr,
):
    """dK and dV of the :func:`_bwd_dkdv` programs cut into parts. Program ``(i, r)`` takes split
    program ``SPLIT[i] = (prog, first slot, parts)`` (int32 ``[n_split, 3]``; its parts' partials
    sit in consecutive slots of ``DKP`` / ``DVP``) and keys ``[r * SUM_ROWS, (r + 1) * SUM_ROWS)``
    of its ``BLOCK_N``: sums the parts in slot order in fp32 (deterministic), scales dK by
    ``sm_scale`` and writes both in ``DK``'s / ``DV``'s dtype, for keys below ``kv_len``."""
    i = tl.program_id(0)
    prog = tl.load(SPLIT + i * 3)
    first = tl.load(SPLIT + i * 3 + 1)
    parts = tl.load(SPLIT + i * 3 + 2)
    b, kvh, pid_n = _key_chunk_program(prog, num_kv_heads, key_chunks)
    rows = tl.program_id(1) * SUM_ROWS + tl.arange(0, SUM_ROWS)
    k_pos = pid_n * BLOCK_N + rows
    dims = tl.arange(0, HEAD_DIM)
    ok = (k_pos < kv_len)[:, None] & (dims < D)[None, :]
    part = first.to(tl.int64) * (BLOCK_N * D) + rows[:, None] * D + dims[None, :]
    dkp = DKP + part
    dvp = DVP + part
    dk = tl.zeros([SUM_ROWS, HEAD_DIM], tl.float32)
    dv = tl.zeros([SUM_ROWS, HEAD_DIM], tl.float32)
    for _ in range(0, parts):
        dk += tl.load(dkp, mask=ok, other=0.0)
        dv += tl.load(dvp, mask=ok, other=0.0)
        dkp += BLOCK_N * D
        dvp += BLOCK_N * D
    tl.store(DK + b * sdkb + kvh * sdkh + k_pos[:, None] * sdkt + dims[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=ok)
    tl.store(DV + b * sdvb + kvh * sdvh + k_pos[:, None] * sdvt + dims[None, :], dv.to(DV.dtype.element_ty), mask=ok)
