"""NSA's compressed branch with longattn's own Triton kernels (forward and backward).

Native Sparse Attention (Yuan et al., 2025) scores its selection blocks with the compressed
branch's attention probabilities. Plain PyTorch computes them as ``[chunk, nC]`` score
matrices, a softmax and a gather per chunk; here two kernels do it without ever storing a
``[Tq, nC]`` tensor:

* :func:`compressed_attention` -- the compressed branch's output and log-sum-exp (online
  softmax over the compressed tokens a query tile can see, the ``G`` query heads of a KV head
  in one program).
* :func:`selection_scores` -- ``p_slc [B, Hkv, Tq, nKB]``: the normalised probabilities
  ``exp(s*scale - lse)`` recomputed tile by tile, summed over the GQA group and over the
  compressed tokens overlapping each selection block (the same 0/1 overlap as
  :func:`longattn.methods.nsa.block_overlap`), through a ``tl.dot`` with a fixed tile-local
  overlap matrix.

* :func:`select_blocks` -- the per-token top-k over ``p_slc``: ``BLOCK_R`` query rows of one
  ``(batch, KV head)`` per program (on GPUs one row on a warp per 512 columns: :func:`_rank_layout`),
  each row (``NB_PAD`` = ``nKB`` padded to a power of two
  columns) mapped to order-preserving int32 keys (forced blocks +inf, ineligible -inf); a
  bisection per row (vectorised over the rows) over the row's own key range, ending at an exact
  count (about 10-20 steps, at most 32), finds the ``count``-th largest key, the ties at it are
  filled lowest index first (``tl.cumsum`` along the row) and the kept blocks are written
  ascending (another cumsum gives each its slot). ``O(32 * nKB)`` per query at most,
  independent of ``num_selected``. Same result as the PyTorch reference
  :func:`longattn.methods.nsa.select_from_scores`, bit for bit.

:func:`compressed_attention` is differentiable (backward kernels in :mod:`.backward`); the
scores and the ranking carry no gradient (NSA's selection is discrete).

Precision: scores are computed with the compressed keys in their own dtype. fp32 compressed
keys (the mean ``phi`` output) against bf16 queries are split into three bf16 parts that sum to
them exactly, so each product is exact and only the fp32 sums' order differs from an fp32 dot;
against fp16 queries the queries are upcast (exact) and the fp32 products use ``tf32x3`` on GPUs
(near-fp32) and IEEE fp32 in the interpreter. Either way the block scores match the fp32
chunked scan to rounding and the two pick the same blocks except between scores equal to
~1e-6. 16-bit compressed keys (``NSAConfig.compressed_dtype="input"``) take one 16-bit pass,
also exact per product, at the price of bf16-rounded keys. (NSA's decoding kernels keep
``tf32x3`` for fp32 keys: near-ties may break differently from the prefill kernels.)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...selection import _ceil_div
from .. import interpreting, kernel_layout
from ..launch import fast
from ..block_sparse import inputs_unsupported_reason

# Tile sizes, in one place. Rows of a program = GP x BLOCK_M (GP: query heads per KV head,
# padded to a power of two), capped by ROW_CAP; compressed tokens per inner step: CMP_BLOCK_N
# for the attention kernel, about SLC_BLOCK_N (a whole number of selection blocks) for the
# score kernel. For sm_90 (228 KiB of shared memory per SM): D = 128, fp32 operands, 64 rows x
# 64 tokens -> Q 32 KiB, K and V tiles 32 KiB each; 16-bit operands take 128 rows.
ROW_CAP = {False: 128, True: 64}  # fp32 operands? -> max rows per program
CMP_BLOCK_N = 64
SLC_BLOCK_N = 64
FP32_DOT_PRECISION = "tf32x3"  # on GPUs; the interpreter always uses IEEE fp32
NUM_STAGES = 2
# The score kernel at 64 rows runs 4 warps: 34.0 ms against 62.3 ms at 8 warps (H200, T = 64k,
# paper defaults, benchmarks/nsa_tile_sweep.py, 2026-11-30; same scores bit for bit).
SLC_NUM_WARPS = 4
# The compressed-branch forward likewise: 27.4 ms at 4 warps against 37.0 ms at 8 (same output).
CMP_NUM_WARPS = 4
# And its backward (dq and dk/dv kernels): forward + backward 55.6 ms at 4 warps against 79.1 at 8.
CMP_BWD_NUM_WARPS = 4
# fp32 compressed tokens against bf16 queries, scored as three exact bf16 parts (_split_k) at
# D <= 128: the q tiles stay 16-bit, so both kernels take the 16-bit row cap (128) and 8 warps.
# H200, 64k, benchmarks/nsa_tile_sweep.py --cmp-dtype fp32, 2026-12-01: compressed branch 21.2 ms
# at 64 rows / 4 warps against 12.4 ms at 128 / 8 (same output bit for bit); scores 18.6 against
# 17.4 ms (same scores bit for bit).
SPLIT_NUM_WARPS = 8
# fp32 q and key tiles at D > 128 (fp16 queries against fp32 tokens) take 16 rows: at 64 rows the
# two kernels need about 320 KiB of shared memory at D = 256, past sm_90's 227 KiB; at 16 rows
# 133 and 99 KiB, with the fewest spills of the tiles that fit (tests/test_kernels_compile.py
# compiles both at D = 256; their speed there is not measured).
WIDE_FP32_ROWS = 16
# and the backward's fp32 kernels there (fp32 queries) 16 rows x 16 tokens: 64 x 32 needed 384 KiB
# for dQ at D = 256; 16 x 16 takes 96 KiB in each kernel
WIDE_FP32_BWD_BLOCK_N = 16
# bf16 queries against fp32 tokens at D > 128 (the split, 64-row tiles): the compressed forward
# steps 32 tokens at a time. At 64 it needs 256 KiB of shared memory at D = 256 when its
# arguments are 16-aligned (every power-of-two shape) and failed to launch on the H200; at 32,
# 144 KiB. The score kernel fits as it is (194 KiB).
WIDE_SPLIT_BLOCK_N = 32


def _score_tiles(q: Tensor, k_cmp: Tensor, Hkv: int, tune: dict, warps: int) -> tuple[bool, int, int, int, int, int]:
    """The tiles both compressed forward kernels (attention and scores) take, from one decision:
    ``(split, G, GP, BLOCK_M, HEAD_DIM, num_warps)``. ``k_cmp`` is in the common dtype; ``warps``:
    the kernel's default. fp32 tokens split against bf16 queries keep 16-bit q tiles: at D <= 128
    the 16-bit row cap and :data:`SPLIT_NUM_WARPS`; fp32 q tiles at D > 128 take
    :data:`WIDE_FP32_ROWS`; ``tune`` (``rows``, ``num_warps``) overrides."""
    D = q.shape[-1]
    split = _split_k(q, k_cmp)
    wide = split and D <= 128
    fp32_tiles = k_cmp.dtype == torch.float32 and not wide
    cap = tune.get("rows", WIDE_FP32_ROWS if fp32_tiles and not split and D > 128 else None)
    G, GP, block_m, head_dim = _layout(q, Hkv, fp32_tiles, cap)
    return split, G, GP, block_m, head_dim, tune.get("num_warps", SPLIT_NUM_WARPS if wide else warps)
# Launch settings forced per kernel ("cmp_fwd", "scores"; the backward's "cmp_bwd_dq" and "cmp_bwd_dkdv", or
# "cmp_bwd" for both), e.g. {"scores": {"rows": 32, "num_warps": 4, "num_stages": 3, "block_n": 64}}: a tuning
# hook for benchmarks/nsa_tile_sweep.py; empty in normal use. Also "ovl_split" (scores: False for the tf32x3
# overlap dot) and "split_k" (False under either kernel's key: both score fp32 keys with tf32x3, so the
# scores kernel recomputes the forward's LSE arithmetic).
LAUNCH_OVERRIDES: dict[str, dict[str, int]] = {}
# Backward tiles (rows of the query tiles, compressed tokens per step), fp32 operands? -> size:
# the backward holds two more accumulators (dK, dV or dQ with dP, dS) than the forward.
BWD_ROWS = {False: 64, True: 64}
BWD_BLOCK_N = {False: 64, True: 32}


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def compressed_unsupported_reason(
    q: Tensor, k_cmp: Tensor, *, compress_block: int, compress_stride: int, select_block: int | None = None
) -> str | None:
    """``None`` when the kernels can run on these inputs (``select_block`` given: also
    :func:`selection_scores`), else why not."""
    reason = inputs_unsupported_reason(q)
    if reason:
        return reason
    if k_cmp.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"the NSA kernels take float16, bfloat16 or float32 compressed keys, got {k_cmp.dtype}"
    if k_cmp.device != q.device:
        return f"q is on {q.device} but the compressed keys on {k_cmp.device}"
    if q.shape[1] % k_cmp.shape[1] != 0:
        return f"{k_cmp.shape[1]} KV heads do not divide {q.shape[1]} query heads"
    if select_block is not None:
        r = select_block // compress_stride
        if select_block % compress_stride or r & (r - 1):
            return (f"the NSA score kernel needs select_block / compress_stride to be a power of two, "
                    f"got {select_block} / {compress_stride}")
        nb = max(1, SLC_BLOCK_N // r)
        spill = _ceil_div(max(0, compress_block - compress_stride), select_block)
        if spill > nb:
            return (f"compress_block={compress_block} reaches over more than {nb} selection blocks of "
                    f"{select_block} keys")
    return None


MAX_SELECT_BLOCKS = 8192  # nKB limit of select_blocks: a row of keys lives in registers
MAX_RANK_SLICES = 65535  # B x heads per ranking launch (its grid's second axis, CUDA's limit); more take several


def select_unsupported_reason(p_slc: Tensor) -> str | None:
    """``None`` when :func:`select_blocks` can rank these scores, else why not."""
    if p_slc.dim() != 4:
        return f"expected scores p_slc [B, Hkv, Tq, nKB], got shape {tuple(p_slc.shape)}"
    if p_slc.dtype != torch.float32:
        return f"the selection kernel ranks float32 scores, got {p_slc.dtype}"
    if p_slc.shape[-1] > MAX_SELECT_BLOCKS:
        return (f"the selection kernel ranks at most {MAX_SELECT_BLOCKS} blocks per query (a row of "
                f"scores lives in registers), got nKB={p_slc.shape[-1]}")
    from .. import triton_unavailable_reason

    return triton_unavailable_reason(p_slc.device)


INTERPRETER_RANK_TILE = 4096  # elements (rows x NB_PAD) of one ranking program under the interpreter


def _rank_layout(nb_pad: int, rows: int) -> tuple[int, int]:
    """``(BLOCK_R, num_warps)`` of the ranking kernel for ``rows`` rows of ``nb_pad`` columns.

    On GPUs: one row per program, one warp per 512 columns (16 keys per thread), so a row's
    per-step reductions stay inside one or a few warps. H200, 2026-11-30
    (`docs/results/rank-layout-2026-11-30-s15*.json`, CUDA graphs): against the previous 4-16 rows
    over 4-16 warps per program, block top-k's rows at 64k (32 heads x 512 rows of 512) 141 -> 66
    us, at 128k 505 -> 269 us, NSA's per-token rows at 64k (8 heads x 65,536 rows of 1,024) 7.04 ->
    4.40 ms; decoding's few rows (one per sequence and head, 1,024 columns) take the same time
    within 0.5 us.

    Under the Triton interpreter (CPU tests) a program's cost is mostly per program, so it takes
    about :data:`INTERPRETER_RANK_TILE` elements (at most 16 rows, no more than there are): the
    same result bit for bit (each row is ranked on its own; ``tests/test_topk_rank_kernel.py``
    checks both layouts against each other), in a quarter of the time."""
    from .. import interpreting

    if interpreting():
        block_r = max(1, min(16, INTERPRETER_RANK_TILE // nb_pad, _pow2_at_least(rows)))
        return block_r, 4
    return 1, max(1, nb_pad // 512)


def select_blocks(
    p_slc: Tensor, *, kv_len: int, select_block: int, num_selected: int, num_init_blocks: int,
    num_local_blocks: int, kv_lens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """NSA's per-token block selection from the block scores ``p_slc [B, Hkv, Tq, nKB]``
    (float32, :func:`selection_scores`) of queries at absolute positions ``p = t + kv_len -
    Tq``: block ``j`` is eligible iff ``j * select_block <= p``; the first ``num_init_blocks``
    and the ``num_local_blocks`` blocks ending at ``p // select_block`` are forced (when
    eligible); the query keeps ``count = min(eligible, K)`` blocks, ``K = min(num_selected,
    nKB)``: the forced ones, then the best-scoring eligible ones, ties toward the lower index
    (NaN ranks as -FLT_MAX and ties with it, +-inf as +-FLT_MAX).

    Returns ``kv_indices int32 [B, Hkv, Tq, K]`` (ascending, unused slots 0), ``kv_num_blocks
    int32 [B, Hkv, Tq]`` and ``block_full bool [B, Hkv, Tq, K]`` (selected block wholly at or
    before the query), exactly as :func:`longattn.methods.nsa.select_from_scores`. Raises
    ``ValueError`` on inconsistent arguments or scores the kernel cannot rank
    (:func:`select_unsupported_reason`).

    ``kv_lens``: optional ``int32/int64 [B]`` per-sequence key counts (decoding over a cache
    whose length differs per sequence): query ``t`` of sequence ``b`` then sits at ``p = t +
    kv_lens[b] - Tq`` and ``kv_len`` is the cache capacity (it only fixes ``nKB``). The values
    are not checked (that would need a host sync): each must lie in ``[Tq, kv_len]``."""
    from .kernel import _select_rank

    reason = select_unsupported_reason(p_slc)
    if reason:
        raise ValueError(f"select_blocks cannot run: {reason}")
    for name, val, least in (("kv_len", kv_len, 0), ("select_block", select_block, 1),
                             ("num_selected", num_selected, 1), ("num_init_blocks", num_init_blocks, 0),
                             ("num_local_blocks", num_local_blocks, 0)):
        if isinstance(val, bool) or not isinstance(val, int) or val < least:
            raise ValueError(f"{name} must be an int >= {least}, got {val!r}")
    B, Hkv, Tq, nKB = p_slc.shape
    if kv_len < Tq:
        raise ValueError(f"kv_len={kv_len} is shorter than the {Tq} queries")
    if nKB != _ceil_div(kv_len, select_block):
        raise ValueError(f"p_slc has {nKB} blocks, but {kv_len} keys make {_ceil_div(kv_len, select_block)} "
                         f"blocks of {select_block}")
    if kv_lens is not None:
        if not isinstance(kv_lens, Tensor) or kv_lens.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"kv_lens must be an int32/int64 torch.Tensor or None, got {kv_lens!r}")
        if kv_lens.shape != (B,) or kv_lens.device != p_slc.device:
            raise ValueError(f"kv_lens must have shape [B]=({B},) on {p_slc.device}, got {tuple(kv_lens.shape)} "
                             f"on {kv_lens.device}")
    return rank_blocks(p_slc, first_position=kv_len - Tq if kv_lens is None else -Tq, row_stride=1,
                       block=select_block, top_k=num_selected, num_init_blocks=num_init_blocks,
                       num_local_blocks=num_local_blocks, causal=True, kv_lens=kv_lens)


def rank_blocks(
    scores: Tensor, *, first_position: int, row_stride: int, block: int, top_k: int, num_init_blocks: int,
    num_local_blocks: int, causal: bool, kv_lens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The ranking kernel behind :func:`select_blocks` (NSA's per-token rows) and the block
    top-k selection of :mod:`longattn.methods.topk` (a row per query block), on checked
    arguments: row ``t`` of ``scores float32 [B, Hs, R, nKB]`` sits at position ``p = t *
    row_stride + first_position`` (``+ kv_lens[b]`` when given). Causal: block ``j`` is eligible
    iff ``j * block <= p``, else every block is. Forced: the first ``num_init_blocks`` and the
    ``num_local_blocks`` ending at ``p // block``. Keeps ``count = min(eligible, K)``, ``K =
    min(top_k, nKB)``, blocks: forced, then by score, ties to the lower index. Returns
    ``(indices int32 [B, Hs, R, K] ascending then 0, counts int32 [B, Hs, R], full bool
    [B, Hs, R, K])``; full: causal and ``(j + 1) * block - 1 <= p``, or any kept block when not
    causal."""
    from .kernel import _select_rank

    B, Hs, R, nKB = scores.shape
    K = min(top_k, nKB)
    dev = scores.device
    idx = torch.empty(B, Hs, R, K, dtype=torch.int32, device=dev)
    cnt = torch.empty(B, Hs, R, dtype=torch.int32, device=dev)
    full = torch.empty(B, Hs, R, K, dtype=torch.int8, device=dev)
    if B * Hs * R == 0 or nKB == 0:
        return idx, cnt.zero_(), full.view(torch.bool)
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    nb_pad = max(16, _pow2_at_least(nKB))
    block_r, warps = _rank_layout(nb_pad, R)
    if kv_lens is not None:
        kv_lens = kv_lens.contiguous()  # the kernel reads KV_LENS[b] at unit stride
    slices = B * Hs
    for base in range(0, slices, MAX_RANK_SLICES):  # grid axis 1 holds at most 65535 slices
        fast(_select_rank)[(_ceil_div(R, block_r), min(MAX_RANK_SLICES, slices - base))](
            scores, idx, cnt, full,
            *scores.stride()[:3], *idx.stride()[:3], *cnt.stride()[:2], *full.stride()[:3],
            R, nKB, first_position, Hs, block, K, num_init_blocks, num_local_blocks, row_stride, base,
            BLOCK_R=block_r, NB_PAD=nb_pad, K_PAD=max(16, _pow2_at_least(K)), num_warps=warps,
            KV_LENS=kv_lens, HAS_KV_LENS=kv_lens is not None, CAUSAL=causal,
        )
    return idx, cnt, full.view(torch.bool)


def _check(q: Tensor, k_cmp: Tensor, v_cmp: Tensor | None, kv_len: int, l: int, d: int, ls: int | None) -> None:
    if q.dim() != 4 or k_cmp.dim() != 4 or (v_cmp is not None and v_cmp.shape != k_cmp.shape):
        raise ValueError(f"expected q [B, H, Tq, D] and k_cmp, v_cmp [B, Hkv, nC, D], got "
                         f"{tuple(q.shape)}, {tuple(k_cmp.shape)}, {None if v_cmp is None else tuple(v_cmp.shape)}")
    if k_cmp.shape[0] != q.shape[0] or k_cmp.shape[-1] != q.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k_cmp {tuple(k_cmp.shape)} differ in batch or head dim")
    if kv_len < q.shape[2]:
        raise ValueError(f"kv_len={kv_len} is shorter than the {q.shape[2]} queries")
    for name, val in (("compress_block", l), ("compress_stride", d)) + ((("select_block", ls),) if ls else ()):
        if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
            raise ValueError(f"{name} must be an int > 0, got {val!r}")
    if l % d:
        raise ValueError(f"compress_block={l} must be a multiple of compress_stride={d}")
    n_cmp = (kv_len - l) // d + 1 if kv_len >= l else 0
    if k_cmp.shape[2] > n_cmp:
        raise ValueError(f"{k_cmp.shape[2]} compressed tokens, but {kv_len} keys hold only {n_cmp}")
    reason = compressed_unsupported_reason(q, k_cmp, compress_block=l, compress_stride=d, select_block=ls)
    if reason:
        raise ValueError(f"the NSA kernels cannot run: {reason}")


def _common_dtype(q: Tensor, k_cmp: Tensor) -> torch.dtype:
    # fp32 when either side is fp32 (16-bit values upcast exactly), else the queries' dtype
    return torch.float32 if torch.float32 in (q.dtype, k_cmp.dtype) else q.dtype


def _layout(q: Tensor, Hkv: int, fp32: bool, cap: int | None = None) -> tuple[int, int, int, int]:
    """``(G, GP, BLOCK_M, HEAD_DIM)`` for queries ``q`` (``cap``: rows per program, default
    ``ROW_CAP[fp32]``)."""
    G = q.shape[1] // Hkv
    GP = _pow2_at_least(G)
    block_m = max(1, (ROW_CAP[fp32] if cap is None else cap) // GP)
    block_m = min(block_m, _pow2_at_least(q.shape[2]))  # no wasted rows for short inputs
    block_m = max(block_m, 16 // GP if GP < 16 else 1)  # tl.dot needs >= 16 rows
    return G, GP, block_m, max(16, _pow2_at_least(q.shape[-1]))


def _dot_args(q: Tensor, dtype: torch.dtype) -> dict:
    fp32 = dtype == torch.float32
    interp = interpreting()
    return dict(F32=fp32, PREC="ieee" if interp else FP32_DOT_PRECISION, UPCAST=interp and not fp32)


def _split_k(q: Tensor, k_cmp: Tensor) -> bool:
    """Whether the score dot splits fp32 compressed keys into three bf16 parts against bf16
    queries (exact products; ``tf32x3`` otherwise, e.g. for fp16 queries, whose parts would need
    fp16's narrower exponent range). One decision for both kernels (the scores kernel must
    recompute the forward's scores): ``split_k = False`` under the ``"cmp_fwd"`` or the
    ``"scores"`` key of :data:`LAUNCH_OVERRIDES` restores ``tf32x3`` in both."""
    forced_off = any(LAUNCH_OVERRIDES.get(key, {}).get("split_k", True) is False for key in ("cmp_fwd", "scores"))
    return not forced_off and q.dtype == torch.bfloat16 and k_cmp.dtype == torch.float32


def _cmp_forward(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kv_len: int, l: int, d: int, scale: float) -> tuple[Tensor, Tensor]:
    """The forward launch on checked inputs (``k_cmp``/``v_cmp`` already in the common dtype)."""
    from .kernel import _cmp_fwd

    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    out = torch.zeros_like(q)
    lse = torch.full((B, H, Tq), float("-inf"), device=q.device, dtype=torch.float32)
    if B == 0 or Tq == 0 or nC == 0 or H == 0:
        return out, lse
    tune = LAUNCH_OVERRIDES.get("cmp_fwd", {})
    split, G, GP, block_m, head_dim, warps = _score_tiles(q, k_cmp, Hkv, tune, CMP_NUM_WARPS)
    rows = GP * block_m
    block_n = tune.get("block_n", WIDE_SPLIT_BLOCK_N if split and D > 128 else CMP_BLOCK_N)
    # 16-bit queries: P V takes the values rounded to q's dtype (the output is 16-bit anyway);
    # the scores, hence lse and the selection, keep the fp32 keys
    v_dot = v_cmp.to(q.dtype) if q.dtype != torch.float32 else v_cmp
    v_args = _dot_args(q, v_dot.dtype)
    fast(_cmp_fwd)[(_ceil_div(Tq, block_m), B * Hkv)](
        q, k_cmp, v_dot, out, lse,
        *q.stride()[:3], *k_cmp.stride()[:3], *v_dot.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        Tq, nC, kv_len - Tq, Hkv, l, d, float(scale) * math.log2(math.e),
        D=D, HEAD_DIM=head_dim, G=G, BLOCK_M=block_m, ROWS=rows, BLOCK_N=block_n,
        **_dot_args(q, k_cmp.dtype), F32_V=v_args["F32"], UPCAST_V=v_args["UPCAST"],
        SPLIT_K=split, SPLIT_UPCAST=interpreting(), num_warps=warps, num_stages=tune.get("num_stages", NUM_STAGES),
    )
    return out, lse


def _cmp_backward(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, out: Tensor, lse: Tensor, dout: Tensor, kv_len: int, l: int, d: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dq, dk_cmp, dv_cmp)`` of the compressed branch from the saved forward (``lse``:
    natural log); ``dq`` in q's dtype, ``dk_cmp``/``dv_cmp`` in the compressed tokens' dtype."""
    from ..online_softmax import backward_delta
    from .backward import _cmp_bwd_dkdv, _cmp_bwd_dq

    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    dq = torch.zeros_like(q)
    dk = torch.zeros_like(k_cmp)
    dv = torch.zeros_like(v_cmp)
    if B == 0 or Tq == 0 or nC == 0 or H == 0:
        return dq, dk, dv
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    delta = backward_delta(dout, out)  # [B, H, Tq] fp32, laid out as lse
    if q.dtype != torch.float32:
        # 16-bit queries: the gradient matmuls take the compressed tokens rounded to q's dtype
        # (fp32 accumulation), as a 16-bit attention backward does, at the full tensor-core rate;
        # the fp32 tokens only matter for the selection scores, which carry no gradient
        k_cmp, v_cmp = k_cmp.to(q.dtype), v_cmp.to(q.dtype)
    fp32 = k_cmp.dtype == torch.float32
    shared = LAUNCH_OVERRIDES.get("cmp_bwd", {})
    args = (Tq, nC, kv_len - Tq, Hkv, l, d, float(scale) * math.log2(math.e), float(scale))

    def launch(name: str) -> dict:
        # tiles of one backward kernel: rows of a query tile, compressed tokens per tile
        tune = {**shared, **LAUNCH_OVERRIDES.get(name, {})}
        wide_fp32 = fp32 and D > 128  # fp32 training at D = 256: smaller tiles fit shared memory
        G, GP, block_m, head_dim = _layout(q, Hkv, fp32, tune.get("rows", WIDE_FP32_ROWS if wide_fp32
                                                                     else BWD_ROWS[fp32]))
        return dict(D=D, HEAD_DIM=head_dim, G=G, BLOCK_M=block_m, ROWS=GP * block_m,
                    BLOCK_N=tune.get("block_n", WIDE_FP32_BWD_BLOCK_N if wide_fp32 else BWD_BLOCK_N[fp32]),
                    **_dot_args(q, k_cmp.dtype),
                    num_warps=tune.get("num_warps", CMP_BWD_NUM_WARPS), num_stages=tune.get("num_stages", NUM_STAGES))

    kw = launch("cmp_bwd_dq")
    fast(_cmp_bwd_dq)[(_ceil_div(Tq, kw["BLOCK_M"]), B * Hkv)](
        q, k_cmp, v_cmp, dout, dq, lse, delta,
        *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *dout.stride()[:3], *dq.stride()[:3],
        *lse.stride()[:2], *args, **kw,
    )
    kw = launch("cmp_bwd_dkdv")
    fast(_cmp_bwd_dkdv)[(_ceil_div(nC, kw["BLOCK_N"]), B * Hkv)](
        q, k_cmp, v_cmp, dout, dk, dv, lse, delta,
        *q.stride()[:3], *k_cmp.stride()[:3], *v_cmp.stride()[:3], *dout.stride()[:3],
        *dk.stride()[:3], *dv.stride()[:3], *lse.stride()[:2], *args, **kw,
    )
    return dq, dk, dv


class _CompressedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, kv_len, l, d, scale):
        out, lse = _cmp_forward(q, k_cmp, v_cmp, kv_len, l, d, scale)
        ctx.save_for_backward(q, k_cmp, v_cmp, out, lse)
        ctx.meta = (kv_len, l, d, scale)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k_cmp, v_cmp, out, lse = ctx.saved_tensors
        dq, dk, dv = _cmp_backward(q, k_cmp, v_cmp, out, lse, dout, *ctx.meta)
        return dq, dk, dv, None, None, None, None


def compressed_attention(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, *, kv_len: int, compress_block: int, compress_stride: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """NSA's compressed branch: attention of ``q [B, H, Tq, D]`` (absolute positions ``p = i +
    kv_len - Tq``) over the compressed tokens ``k_cmp, v_cmp [B, Hkv, nC, D]``; query ``p``
    sees token ``j`` iff ``j * compress_stride + compress_block - 1 <= p``.

    Returns ``(out [B, H, Tq, D] in q's dtype, lse float32 [B, H, Tq])`` (natural log; output
    0 and lse ``-inf`` for a query that sees no token). The scores (hence ``lse``) use the
    compressed keys in their own dtype; for 16-bit ``q`` the ``P V`` product takes the values
    rounded to ``q``'s dtype (fp32 accumulation), the output being 16-bit. Differentiable in ``q``, ``k_cmp`` and
    ``v_cmp`` (``lse`` carries no gradient): the backward runs the kernels of
    :mod:`longattn.kernels.nsa.backward`; for 16-bit ``q`` their matmuls take the compressed
    tokens rounded to ``q``'s dtype (fp32 accumulation), as a 16-bit attention backward does;
    fp32 ``q`` keeps fp32 throughout. Raises ``ValueError`` on
    inconsistent shapes or inputs the kernels cannot take."""
    _check(q, k_cmp, v_cmp, kv_len, compress_block, compress_stride, None)
    dtype = _common_dtype(q, k_cmp)
    q = kernel_layout(q, "q")
    # the casts are differentiable: gradients return in k_cmp's / v_cmp's own dtype
    k_cmp, v_cmp = (t.to(dtype) if t.dtype != dtype else t for t in (k_cmp, v_cmp))
    k_cmp, v_cmp = kernel_layout(k_cmp, "k_cmp"), kernel_layout(v_cmp, "v_cmp")
    return _CompressedAttention.apply(q, k_cmp, v_cmp, kv_len, compress_block, compress_stride, float(scale))


def selection_scores(
    q: Tensor, k_cmp: Tensor, lse: Tensor, *, kv_len: int, compress_block: int, compress_stride: int,
    select_block: int, scale: float,
) -> Tensor:
    """NSA's selection-block scores (paper eq. 9-10, with each overlapping compressed token
    counted once): ``p_slc [B, Hkv, Tq, nKB]`` float32, ``nKB = ceil(kv_len / select_block)``,
    ``p_slc[b, g, t, j] = sum over the query heads h of KV head g and the visible compressed
    tokens i overlapping keys [j*l', (j+1)*l') of exp(q_h . k_i * scale - lse[b, h, t])``.

    ``lse [B, H, Tq]``: the compressed branch's log-sum-exp (:func:`compressed_attention`).
    No autograd. Raises ``ValueError`` on inconsistent shapes or unsupported inputs."""
    from .kernel import _slc_scores

    _check(q, k_cmp, None, kv_len, compress_block, compress_stride, select_block)
    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    if lse.shape != (B, H, Tq):
        raise ValueError(f"lse must be [B, H, Tq] = {(B, H, Tq)}, got {tuple(lse.shape)}")
    n_blocks = _ceil_div(kv_len, select_block)
    if B == 0 or Tq == 0 or nC == 0 or H == 0:
        return torch.zeros(B, Hkv, Tq, n_blocks, device=q.device, dtype=torch.float32)
    out = torch.empty(B, Hkv, Tq, n_blocks, device=q.device, dtype=torch.float32)
    dtype = _common_dtype(q, k_cmp)
    q = kernel_layout(q, "q")
    k_cmp = k_cmp.to(dtype) if k_cmp.dtype != dtype else k_cmp
    k_cmp = kernel_layout(k_cmp, "k_cmp")
    lse = lse.to(torch.float32)
    tune = LAUNCH_OVERRIDES.get("scores", {})
    # rows per program as for the attention kernel: 16-bit q tiles (16-bit tokens, or fp32 tokens
    # split against bf16 queries at D <= 128) take 128 (32 queries x 4 heads; with 16-bit tokens 64
    # rows took 10.9 ms against 7.5 at 64k on an H200 with the split overlap dot, 2026-12-01,
    # benchmarks/nsa_tile_sweep.py)
    split, G, GP, block_m, head_dim, warps = _score_tiles(q, k_cmp, Hkv, tune, SLC_NUM_WARPS)
    r = select_block // compress_stride
    nb = max(1, tune.get("block_n", SLC_BLOCK_N) // r)
    spill = _ceil_div(max(0, compress_block - compress_stride), select_block)
    rows = GP * block_m
    fast(_slc_scores)[(_ceil_div(Tq, block_m), B * Hkv)](
        q, k_cmp, lse, out,
        *q.stride()[:3], *k_cmp.stride()[:3], *lse.stride()[:2], *out.stride()[:3],
        Tq, nC, n_blocks, kv_len - Tq, Hkv, compress_block, compress_stride, select_block,
        float(scale) * math.log2(math.e),
        D=D, HEAD_DIM=head_dim, G=G, GP=GP, BLOCK_M=block_m, BLOCK_N=nb * r, NB=nb, NBP=max(16, nb), E=spill,
        **_dot_args(q, dtype), OVL_SPLIT=bool(tune.get("ovl_split", True)), SPLIT_UPCAST=interpreting(),
        SPLIT_K=split, num_warps=warps, num_stages=tune.get("num_stages", NUM_STAGES),
    )
    return out


__all__ = ["compressed_attention", "selection_scores", "compressed_unsupported_reason", "select_blocks",
           "select_unsupported_reason", "rank_blocks", "MAX_RANK_SLICES", "ROW_CAP", "CMP_BLOCK_N", "SLC_BLOCK_N", "MAX_SELECT_BLOCKS"]
