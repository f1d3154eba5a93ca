"""Pieces shared by selectors: band-shaped selections (full / window / sink) and selections
built from a per-absolute-block pattern (BigBird, block top-k, MoBA)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..finite import witness_sums
from ..selection import BlockSelection, _ceil_div, band_mod, causal_mod


def check_positive_int(owner: str, **values: object) -> None:
    """Raise ``ValueError`` naming ``owner.field`` unless each value is an int >= 1."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{owner}.{name} must be an int >= 1, got {value!r}")


def check_tileable(owner: str, **values: int) -> None:
    """Block sizes must divide or be a multiple of 128 (FlexAttention's tile)."""
    for name, value in values.items():
        if value % 128 != 0 and 128 % value != 0:
            raise ValueError(
                f"{owner}.{name}={value} must divide 128 or be a multiple of 128 "
                "(e.g. 16, 32, 64, 128, 256, 512)"
            )


def band_selection(
    q: Tensor, k: Tensor, causal: bool, *, block: int, window: int | None, sink: int = 0
) -> BlockSelection:
    """Selection of every block that the band (causal and/or ``window``, optionally plus
    ``sink`` leading keys) touches, for queries ``q [B, H, Tq, D]`` over keys
    ``k [B, Hkv, Tk, D]``; exact at token level through :func:`band_mod`. Size
    ``O(nQB * nKB)`` bits, shared by every batch element and head."""
    num_heads, q_len, kv_len, device = q.shape[1], q.shape[2], k.shape[2], q.device
    off = kv_len - q_len
    nqb, nkb = _ceil_div(q_len, block), _ceil_div(kv_len, block)
    qb = torch.arange(nqb, device=device)
    q_lo = qb * block + off  # first absolute query position of each query block
    q_hi = torch.clamp((qb + 1) * block, max=q_len) - 1 + off
    kb = torch.arange(nkb, device=device)
    k_lo = kb * block
    k_hi = torch.clamp((kb + 1) * block, max=kv_len) - 1
    touch = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    full = torch.ones(nqb, nkb, dtype=torch.bool, device=device)
    if causal:
        touch &= k_lo[None, :] <= q_hi[:, None]
        full &= k_hi[None, :] <= q_lo[:, None]
    if window is not None:
        near = k_hi[None, :] > q_lo[:, None] - window
        near_full = k_lo[None, :] > q_hi[:, None] - window
        if not causal:
            near &= k_lo[None, :] < q_hi[:, None] + window
            near_full &= k_hi[None, :] < q_lo[:, None] + window
        if sink > 0:
            is_sink = k_lo < sink
            near |= is_sink[None, :]
            near_full |= (k_hi < sink)[None, :]
        touch &= near
        full &= near_full
    needs_mod = causal or window is not None
    return BlockSelection.from_bitmap(
        touch.expand(1, 1, nqb, nkb),
        q_block=block,
        kv_block=block,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        causal=causal,
        mask_mod=band_mod(off, causal, window, sink) if needs_mod else None,
        full_bitmap=(full & touch).expand(1, 1, nqb, nkb),
        validate=False,
    )


def _gate_rows(q_len: int, kv_len: int, gate_block: int, device: torch.device) -> tuple[Tensor | None, int]:
    """How gate rows become query blocks: ``(None, gate_block)`` when the queries' offset lines up
    with the gate blocks (rows are query blocks), else ``(rows int64 [Tq], 1)``: each query gets
    its gate block's row."""
    off = kv_len - q_len
    if off % gate_block == 0:
        return None, gate_block
    return (torch.arange(q_len, device=device) + off) // gate_block - off // gate_block, 1


def pattern_selection(
    pattern: Tensor,
    *,
    gate_block: int,
    kv_block: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    causal: bool,
) -> BlockSelection:
    """Selection from ``pattern: bool [Bp, Hp, nG, nKB]`` where row ``a`` describes the
    queries at absolute positions ``[(first + a) * gate_block, (first + a + 1) * gate_block)``
    (``first = (kv_len - q_len) // gate_block``) and column ``c`` key block ``c``.

    When query blocks line up with gate blocks the rows are used as they are and only the
    causal rule is checked per token; otherwise each query gets its own row (``q_block=1``)."""
    off = kv_len - q_len
    rows, q_block = _gate_rows(q_len, kv_len, gate_block, pattern.device)
    bitmap = pattern if rows is None else pattern[:, :, rows]  # [Bp, Hp, nQB, nKB]
    mask_mod = causal_mod(off) if causal else None
    full = None
    if causal:
        nqb = bitmap.shape[2]
        q_lo = torch.arange(nqb, device=pattern.device) * q_block + off
        k_hi = (torch.arange(bitmap.shape[3], device=pattern.device) + 1) * kv_block - 1
        full = (k_hi[None, :] <= q_lo[:, None]).expand_as(bitmap) & bitmap
    return BlockSelection.from_bitmap(
        bitmap,
        q_block=q_block,
        kv_block=kv_block,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        causal=causal,
        mask_mod=mask_mod,
        full_bitmap=full if causal else bitmap,
        validate=False,
    )


def index_selection(
    idx: Tensor,
    keep: Tensor,
    *,
    gate_block: int,
    kv_block: int,
    q_len: int,
    kv_len: int,
    num_heads: int,
    causal: bool,
) -> BlockSelection:
    """The selection :func:`pattern_selection` builds from the bitmap of the blocks ``idx
    [Bp, Hp, nG, k]`` (where ``keep``), built from the indices directly: ``kv_indices`` is ``k``
    wide (the row's blocks ascending, then unused slots) instead of one column per key block.
    At 64k the paper's per-token MoBA gate has 128 key blocks and keeps 3: the bitmap route
    sorted and validated ``T x 128`` entries per head (28 ms of the 38.5 ms forward on the H200)."""
    nkb = _ceil_div(kv_len, kv_block)
    ordered = torch.where(keep, idx, nkb).sort(dim=-1).values  # kept blocks first, ascending
    counts = keep.sum(-1, dtype=torch.int32)
    indices = torch.where(ordered < nkb, ordered, 0).to(torch.int32)
    off = kv_len - q_len
    rows, q_block = _gate_rows(q_len, kv_len, gate_block, idx.device)
    if rows is not None:
        indices, counts = indices[:, :, rows], counts[:, :, rows]
    valid = torch.arange(indices.shape[-1], device=idx.device) < counts[..., None].long()
    if causal:
        q_lo = torch.arange(indices.shape[2], device=idx.device) * q_block + off
        full = valid & ((indices.long() + 1) * kv_block - 1 <= q_lo[:, None])
    else:
        full = valid
    return indexed_selection(counts, indices.contiguous(), full.contiguous(), q_block=q_block, kv_block=kv_block,
                             q_len=q_len, kv_len=kv_len, num_heads=num_heads, causal=causal)


def indexed_selection(
    counts: Tensor, indices: Tensor, full: Tensor, *, q_block: int, kv_block: int, q_len: int, kv_len: int,
    num_heads: int, causal: bool,
) -> BlockSelection:
    """The :class:`BlockSelection` of rows already in index form (``counts int32 [Bp, Hp, nQB]``,
    ``indices int32 [Bp, Hp, nQB, k]`` ascending then 0, ``full bool [Bp, Hp, nQB, k]``), causal
    aligned to the end of the keys; not validated (the callers build them consistent)."""
    return BlockSelection(
        kv_num_blocks=counts,
        kv_indices=indices,
        q_block=q_block,
        kv_block=kv_block,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        causal=causal,
        mask_mod=causal_mod(kv_len - q_len) if causal else None,
        block_full=full,
        validate=False,
    )


def gate_block_positions(q_len: int, kv_len: int, gate_block: int, device: torch.device) -> Tensor:
    """Absolute index of every gate block that holds at least one query: ``int64 [nG]``."""
    off = kv_len - q_len
    return torch.arange(off // gate_block, (kv_len - 1) // gate_block + 1, device=device)


def _block_means(x: Tensor, front: int, block: int) -> Tensor:
    """Mean over consecutive blocks of ``block`` positions along dim 2 of ``[B, H, T, D]``,
    where the first block starts ``front`` positions before ``x`` does (it and the last block
    may be partial). Accumulates in fp32 without an fp32 copy of ``x``: ``[B, H, nBlocks, D]``."""
    B, H, T, D = x.shape
    n = _ceil_div(front + T, block)
    back = n * block - front - T
    source = x
    if front or back:
        x = torch.cat([x.new_zeros(B, H, front, D), x, x.new_zeros(B, H, back, D)], dim=2)
    blocks = x.view(B, H, n, block, D)
    if not front and not back and block & (block - 1) == 0:
        # every block whole and a power of two long: one reduction (the mean multiplies the
        # fp32 sum by the exact reciprocal, so the same bits as the division by counts below)
        means = blocks.mean(3, dtype=torch.float32)
        if n < T:  # every element of x summed once into fewer rows: the finiteness check reuses them
            witness_sums(source, means)
        return means
    sums = blocks.sum(3, dtype=torch.float32)
    if n < T:
        witness_sums(source, sums)
    counts = torch.full((n,), float(block), device=x.device)
    counts[0] -= front
    counts[-1] -= back
    return sums / counts[:, None]


def pooled_queries(q: Tensor, kv_len: int, gate_block: int) -> Tensor:
    """Mean of the queries in each absolute gate block, fp32: ``[B, H, nG, D]``."""
    off = kv_len - q.shape[2]
    return _block_means(q, off % gate_block, gate_block)


def pooled_keys(k: Tensor, block: int) -> Tensor:
    """Mean of the keys in each key block (the last one may be partial), fp32:
    ``[B, Hkv, nKB, D]``."""
    return _block_means(k, 0, block)


def pooled_block_scores(q: Tensor, k: Tensor, gate_block: int, kv_block: int) -> Tensor:
    """``mean(q over a gate block) . mean(k over a key block)`` in fp32, per query head:
    ``[B, H, nG, nKB]`` (the gate of MoBA and of block top-k; linear in ``q``, so it is also
    the mean of the per-token gates of the block)."""
    qm = pooled_queries(q, k.shape[2], gate_block)  # [B, H, nG, D]
    km = pooled_keys(k, kv_block)  # [B, Hkv, nKB, D]
    B, H, nG, D = qm.shape
    Hkv = km.shape[1]
    # the G query heads of a KV head stacked into one [G * nG, D] operand (heads h = kvh * G + g):
    # one matmul per KV head, no copy of the key means per query head
    nKB = km.shape[2]
    scores = torch.bmm(qm.view(B * Hkv, (H // Hkv) * nG, D), km.view(B * Hkv, nKB, D).transpose(1, 2))
    return scores.view(B, H, nG, nKB)


def _ranked(scores: Tensor, eligible: Tensor, forced: Tensor) -> Tensor:
    """Ranking keys of the block top-k: ``+inf`` for forced blocks, ``-inf`` for blocks neither
    forced nor eligible, else the score, with a non-finite score clamped into the finite range
    (NaN ranks last among eligible blocks, as in NSA) so a gate that overflowed still selects
    ``k`` blocks and never displaces a forced one."""
    fmax = torch.finfo(scores.dtype).max
    clean = torch.nan_to_num(scores, nan=-fmax, posinf=fmax, neginf=-fmax)
    return torch.where(forced, float("inf"), torch.where(eligible, clean, float("-inf")))


def topk_block_indices(scores: Tensor, eligible: Tensor, forced: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``forced`` blocks plus the best-scoring ``eligible`` ones (equal scores: the lower
    block index first), ``k`` blocks in all where enough are eligible: ``(indices int64 [..., min(k, nKB)], keep bool [..., min(k, nKB)])``
    (``keep`` is False for a slot filled by a block neither eligible nor forced). Inputs
    ``[..., nKB]``."""
    ranked = _ranked(scores, eligible, forced)
    k = min(k, scores.shape[-1])
    if k > MAX_PASSES_K:
        # a stable sort, so equal scores go to the lower block index (torch.topk leaves ties
        # unordered), as max does below and the ranking kernels do
        values, top = ranked.sort(dim=-1, descending=True, stable=True)
        return top[..., :k], values[..., :k] > float("-inf")
    # k passes of max instead of torch.topk: over many short rows (MoBA's per-token gate at 64k:
    # 2M rows of 128 blocks) topk took 12 ms of a 19 ms selection on the H200. max returns the
    # first of equal maxima, so ties go to the lower block index
    tops, values = [], []
    for i in range(k):
        v, a = ranked.max(dim=-1)
        tops.append(a)
        values.append(v)
        if i + 1 < k:
            ranked.scatter_(-1, a[..., None], float("-inf"))
    return torch.stack(tops, -1), torch.stack(values, -1) > float("-inf")


MAX_PASSES_K = 8  # topk_block_indices: up to this k, k passes of max; beyond, a stable sort


def topk_blocks(scores: Tensor, eligible: Tensor, forced: Tensor, k: int) -> Tensor:
    """The blocks of :func:`topk_block_indices` as a ``bool [..., nKB]`` pattern, computed
    independently with ``torch.topk`` (the bitmap form, with :func:`pattern_selection` the
    executable specification the index form is tested against). Equal scores at the cut may go
    either way here (``torch.topk`` does not order ties); the index form takes the lower index."""
    n = scores.shape[-1]
    ranked = _ranked(scores, eligible, forced)
    top = ranked.topk(min(k, n), dim=-1).indices
    keep = torch.zeros_like(eligible)
    keep.scatter_(-1, top, True)
    return keep & (eligible | forced)
