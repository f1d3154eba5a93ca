"""Triton split-K sparse decoding: a few queries per sequence read only their selected KV blocks.

Two kernels:

* ``_decode_split_kernel`` -- grid ``(B * Hkv, num_splits, row_tiles)``. A program owns one
  ``(sequence b, KV head)`` and one share of that pair's selected blocks. Its rows are the
  ``G = H // Hkv`` query heads x ``Tq`` queries of the group (one tile, padded to at least 16
  rows for ``tl.dot``), so every selected K/V chunk is loaded once for the whole GQA group.
  The work list of a pair is its selected blocks cut into ``BLOCK_N``-token chunks, in the
  order of ``block_indices``; blocks smaller than a chunk (Quest's 16-token pages) are packed
  ``SLOTS`` to a chunk, gathered by their indices, so each load still brings ``BLOCK_N`` keys.
  Split ``s`` takes a contiguous share of that list. Keys at
  positions ``>= cache_seqlens[b]`` and, for ``Tq > 1``, keys after a query's own position
  are masked out; a masked key is never loaded (``tl.load`` with a mask reads no bytes there),
  so nothing outside the selection is read. Online softmax in fp32 (base 2); the program
  writes its normalised partial output and natural-log LSE (``-inf`` for a row that read
  nothing, whose output is written as 0).
* ``_merge_kernel`` -- one program per output row loads all ``num_splits`` partials of it at once,
  combines them through their LSE and writes the final output in the query dtype plus the LSE.

With ``num_splits == 1`` the split kernel writes the final output and LSE directly and the
merge is skipped.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import fast
from ..online_softmax import online_softmax_step

_LOG2E = 1.4426950408889634

# dtypes the kernel reads (fp64 has no tensor-core dot; the reference serves it)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# rows of one program: G * Tq padded to a power of two, at least 16 (tl.dot), at most this
MAX_BLOCK_M = 64


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def unsupported_reason(q: Tensor, k_cache: Tensor) -> str | None:
    """``None`` when the kernel can serve these inputs (dtype and head dim), else why not."""
    D = q.shape[-1]
    if q.dtype not in SUPPORTED_DTYPES:
        return f"the triton decode kernel reads float16, bfloat16 or float32, got {q.dtype}"
    if D < 16 or D > MAX_HEAD_DIM or D & (D - 1):
        return (f"the triton decode kernel needs a head dim D that is a power of two in "
                f"[16, {MAX_HEAD_DIM}] (e.g. 64, 128), got D={D}")
    return None


def tile_config(group: int, q_len: int, block_size: int, head_dim: int, dtype: torch.dtype,
                pack_slots: bool = True) -> dict[str, int]:
    """Compile-time tile sizes and launch settings for one call shape.

    ``BLOCK_M``: rows per program, ``G * Tq`` padded to a power of two in [16, 64] (16 for
    fp32, whose exact fp32 dot runs on FMA units); more rows use more row tiles (grid axis 2),
    each re-reading the selected K/V. ``BLOCK_N``: keys per chunk, a power of two >= 16, at
    most ``block_size`` where possible (unless blocks are packed), shrunk for wide tiles to stay
    within registers.
    ``CHUNKS``: chunks per selected block. ``SLOTS``: selected blocks per chunk, > 1 when
    ``pack_slots`` and a power-of-two block is smaller than the chunk cap (Quest's 16-token
    pages: four to a 64-key chunk); then ``CHUNKS = 1``. On an H200 at 128k, B = 16, 16-token
    pages, the attention took 119 us one page per chunk and 70 us four to a chunk (2026-12-01;
    the packed bf16 tile compiled to 119-124 registers and no spills there).

    The table was checked with ptxas for sm_90a (Triton 3.6, G in {1, 4, 8}, Tq in {1, 4, 16},
    D in {64, 128, 256}, block_size in {16, 64, 512}); bf16 D=128 uses about 200 registers at
    16 rows / 4 warps (two programs per SM by registers). Rechecked 2026-11-30 with the ptxas in
    this environment: that tile (G = 4, Tq = 1, 64-key blocks) reported 64 bytes of spill stores
    compiled with its unit strides as runtime integers; compiled as the launcher specialises it
    (unit strides constant) it reports none (tests/test_decode_compile.py, 2026-12-01).
    """
    rows = group * q_len
    max_m = 16 if dtype == torch.float32 else MAX_BLOCK_M
    block_m = min(max_m, max(16, _next_pow2(rows)))
    if dtype == torch.float32:
        cap_n = 64 if head_dim <= 128 else 32
        num_warps = 4 if head_dim <= 64 else 8
    else:
        if head_dim <= 128:
            cap_n = 32 if block_m >= 64 else 64
        else:
            cap_n = 16 if block_m >= 64 else 32
        num_warps = 4 if (block_m == 16 and head_dim <= 128) else 8
    block_n = max(16, min(_next_pow2(block_size), cap_n))
    slots = 1
    if pack_slots and block_size == _next_pow2(block_size) and block_size < cap_n:
        block_n = cap_n
        slots = cap_n // block_size
    chunks = -(-block_size // block_n)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "CHUNKS": chunks,
        "SLOTS": slots,
        "row_tiles": -(-rows // block_m),
        "num_warps": num_warps,
        "num_stages": 2,
    }


def work_units(width: int, cfg: dict[str, int]) -> int:
    """Chunks of work of a ``(sequence, KV head)`` whose selection fills all ``width`` slots."""
    return -(-width // cfg["SLOTS"]) * cfg["CHUNKS"]


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8  # the interpreter: any small number exercises splitting


def choose_num_splits(pairs: int, row_tiles: int, max_units: int, sm_count: int) -> int:
    """Heuristic number of splits per ``(sequence, KV head)``.

    Aim at about two programs per SM (``pairs * row_tiles * splits ~ 2 * sm_count``) so a small
    batch still fills the GPU, never more splits than chunks of work (``max_units``: the chunks
    of a full ``block_indices`` row, :func:`work_units`; real counts are unknown without a host
    sync), at
    least two chunks per split so the partial write (``rows x D`` fp32) stays small next to the
    K/V it summarises, and at most 64.
    """
    programs = max(1, pairs * row_tiles)
    target = 2 * sm_count
    if programs >= target or max_units <= 1:
        return 1
    splits = -(-target // programs)
    return max(1, min(splits, -(-max_units // 2), 64))


DOT_NATIVE, DOT_IEEE, DOT_UPCAST = 0, 1, 2


def _dot_mode(dtype: torch.dtype) -> int:
    """fp32 inputs: exact fp32 products (``ieee``; tf32 would break the fp32 tolerance).
    16-bit inputs: the native tensor-core dot with fp32 accumulation -- except under the
    Triton 3.6 interpreter, whose ``tl.dot`` multiplies the raw uint16 storage of bfloat16;
    there the operands are upcast to fp32 first (exact: a product of two 16-bit floats fits
    fp32), which gives the same numbers the GPU computes."""
    from .. import interpreting

    if dtype == torch.float32:
        return DOT_IEEE
    return DOT_UPCAST if interpreting() else DOT_NATIVE


@triton.jit
def _dot(a, b, MODE: tl.constexpr):
    if MODE == 2:  # DOT_UPCAST
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif MODE == 1:  # DOT_IEEE
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def attend_chunk(q, k_base, v_base, pos, key_ok, ok, m_i, l_i, acc, qk_scale, skt, skd, svt, svd, d,
                 DOT_MODE: tl.constexpr):
    """One chunk of keys at ``pos [BLOCK_N]`` added to the rows' online softmax (fp32, base 2):
    K and V of the keys in ``key_ok`` are loaded (no others), scores outside ``ok [BLOCK_M,
    BLOCK_N]`` are masked; P is rounded to V's dtype for ``P @ V``, as flash attention does.
    Shared by the sparse decode kernel and NSA's decode branch kernel. Returns ``(m_i, l_i,
    acc)``."""
    k = tl.load(k_base + pos[:, None] * skt + d[None, :] * skd, mask=key_ok[:, None], other=0.0)  # [BLOCK_N, D]
    s = _dot(q, tl.trans(k), DOT_MODE) * qk_scale  # [BLOCK_M, BLOCK_N], log2 units
    s = tl.where(ok, s, float("-inf"))
    p, alpha, m_i, l_i = online_softmax_step(s, m_i, l_i)
    v = tl.load(v_base + pos[:, None] * svt + d[None, :] * svd, mask=key_ok[:, None], other=0.0)
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_MODE)
    return m_i, l_i, acc


@triton.jit
def _decode_split_kernel(
    Q, K, V, Lens, Idx, Cnt, O, L,
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ib, stride_ih, stride_ik,
    stride_cb, stride_ch,
    stride_os, stride_ls,  # elements between splits in O and L (0 when writing the final output)
    num_kv_heads, num_splits,
    G: tl.constexpr, TQ: tl.constexpr, BLOCK_SIZE: tl.constexpr, CHUNKS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    DOT_MODE: tl.constexpr, SLOTS: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = (pid_bh // num_kv_heads).to(tl.int64)
    hkv = (pid_bh % num_kv_heads).to(tl.int64)
    kv_len = tl.load(Lens + b).to(tl.int64)
    count = tl.load(Cnt + b * stride_cb + hkv * stride_ch).to(tl.int32)

    # rows of this program: r = g * TQ + i  ->  query head hkv * G + g, query i
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * TQ
    g = rows // TQ
    qi = rows % TQ
    q_pos = kv_len - TQ + qi  # absolute position of each row's query  [BLOCK_M]
    d = tl.arange(0, HEAD_DIM)
    head = hkv * G + g
    q_ptrs = Q + b * stride_qb + head[:, None] * stride_qh + qi[:, None] * stride_qt + d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None], other=0.0)  # [BLOCK_M, D]

    # this split's share of the work list (selected blocks x chunks, or groups of SLOTS blocks)
    total = tl.cdiv(count, SLOTS) * CHUNKS
    per = tl.cdiv(total, num_splits)
    u_lo = pid_s * per
    u_hi = tl.minimum(u_lo + per, total)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
    n = tl.arange(0, BLOCK_N)
    k_base = K + b * stride_kb + hkv * stride_kh
    v_base = V + b * stride_vb + hkv * stride_vh
    i_base = Idx + b * stride_ib + hkv * stride_ih
    for u in range(u_lo, u_hi):
        if SLOTS == 1:
            slot = u // CHUNKS
            chunk = u % CHUNKS
            blk = tl.load(i_base + slot * stride_ik).to(tl.int64)
            within = chunk * BLOCK_N + n
            pos = blk * BLOCK_SIZE + within  # absolute key positions  [BLOCK_N]
            key_ok = (within < BLOCK_SIZE) & (pos < kv_len)
        else:  # SLOTS whole blocks of BLOCK_SIZE keys, gathered (CHUNKS == 1)
            slot_n = u * SLOTS + n // BLOCK_SIZE  # [BLOCK_N]
            slot_ok = slot_n < count
            blk_n = tl.load(i_base + slot_n * stride_ik, mask=slot_ok, other=0).to(tl.int64)
            pos = blk_n * BLOCK_SIZE + n % BLOCK_SIZE
            key_ok = slot_ok & (pos < kv_len)
        ok = key_ok[None, :] & (pos[None, :] <= q_pos[:, None]) & row_ok[:, None]
        m_i, l_i, acc = attend_chunk(q, k_base, v_base, pos, key_ok, ok, m_i, l_i, acc, qk_scale,
                                     stride_kt, stride_kd, stride_vt, stride_vd, d, DOT_MODE)

    has = l_i > 0.0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    # O and L are contiguous [(split,) B, H, Tq(, D)]: row r of this group is flat row
    # (b * H + hkv * G) * TQ + r, with H = num_kv_heads * G
    flat = (b * num_kv_heads * G + hkv * G) * TQ + rows
    o_ptrs = O + pid_s * stride_os + flat[:, None] * HEAD_DIM + d[None, :]
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None])
    tl.store(L + pid_s * stride_ls + flat, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    Op, Lp, O, L, num_splits, stride_os, stride_ls,
    HEAD_DIM: tl.constexpr, S_PAD: tl.constexpr,
):
    """One output row per program; all of its ``num_splits`` partials are loaded at once (no
    loop over splits: a loop of dependent loads is latency-bound at a few rows)."""
    r = tl.program_id(0).to(tl.int64)
    sp = tl.arange(0, S_PAD)
    s_ok = sp < num_splits
    d = tl.arange(0, HEAD_DIM)
    lse_s = tl.load(Lp + sp * stride_ls + r, mask=s_ok, other=float("-inf"))  # [S_PAD]
    o_s = tl.load(Op + sp[:, None] * stride_os + r * HEAD_DIM + d[None, :], mask=s_ok[:, None], other=0.0)
    m = tl.max(lse_s, axis=0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)  # 0 for a split that read nothing (its partial row is 0)
    l = tl.sum(w, axis=0)
    has = l > 0.0
    out = tl.sum(w[:, None] * o_s, axis=0) / tl.where(has, l, 1.0)  # [D]
    lse = tl.where(has, m_safe + tl.log(tl.where(has, l, 1.0)), float("-inf"))
    tl.store(O + r * HEAD_DIM + d, out.to(O.dtype.element_ty))
    tl.store(L + r, lse)


def _ready(device: torch.device) -> None:
    """Raise unless Triton can run on ``device``; on CPU this also prepares the interpreter
    (:func:`longattn.kernels.triton_unavailable_reason` patches its scalar conversion)."""
    from .. import triton_unavailable_reason

    reason = triton_unavailable_reason(device)
    if reason is not None:
        raise ValueError(reason)


def _launch_split(q, k_cache, v_cache, cache_seqlens, block_indices, block_counts, o, lse,
                  *, block_size: int, scale: float, num_splits: int, cfg: dict, direct: bool) -> None:
    _ready(q.device)
    from .. import MAX_SLICE_OFFSET, slice_offset_span

    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        # a copy of the cache per step would defeat sparse decoding: refuse instead
        if slice_offset_span(t) > MAX_SLICE_OFFSET:
            raise ValueError(f"{name} {tuple(t.shape)} with strides {t.stride()}: one [batch, head] slice spans "
                             "more than 2^31 elements, past the decode kernel's int32 token offsets; store the "
                             "cache as a contiguous [B, Hkv, T, D] tensor")
    B, H, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    cache_seqlens = cache_seqlens.contiguous()  # the kernel reads Lens[b] at unit stride
    grid = (B * Hkv, num_splits, cfg["row_tiles"])
    fast(_decode_split_kernel)[grid](
        q, k_cache, v_cache, cache_seqlens, block_indices, block_counts, o, lse,
        scale * _LOG2E,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        *block_indices.stride(), *block_counts.stride(),
        0 if direct else o.stride(0), 0 if direct else lse.stride(0),
        Hkv, num_splits,
        G=H // Hkv, TQ=Tq, BLOCK_SIZE=block_size, CHUNKS=cfg["CHUNKS"], HEAD_DIM=D,
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], DOT_MODE=_dot_mode(q.dtype), SLOTS=cfg["SLOTS"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


def decode_partials(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_indices: Tensor,
    block_counts: Tensor,
    *,
    block_size: int,
    scale: float,
    num_splits: int,
    o_part: Tensor | None = None,
    lse_part: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Run only the split kernel: ``o_part float32 [S, B, H, Tq, D]`` (each split's output,
    normalised by its own softmax sum; 0 where the split read nothing) and
    ``lse_part float32 [S, B, H, Tq]`` (natural log, ``-inf`` where it read nothing).
    Pre-allocated (e.g. NaN-poisoned) contiguous buffers may be passed in; every element is
    written."""
    B, H, Tq, D = q.shape
    shape = (num_splits, B, H, Tq)
    if o_part is None:
        o_part = torch.empty(*shape, D, dtype=torch.float32, device=q.device)
    if lse_part is None:
        lse_part = torch.empty(shape, dtype=torch.float32, device=q.device)
    if o_part.shape != (*shape, D) or lse_part.shape != shape or not (o_part.is_contiguous() and lse_part.is_contiguous()):
        raise ValueError(f"o_part must be contiguous float32 {(*shape, D)} and lse_part {shape}")
    cfg = tile_config(H // k_cache.shape[1], Tq, block_size, D, q.dtype)
    _launch_split(q, k_cache, v_cache, cache_seqlens, block_indices, block_counts, o_part, lse_part,
                  block_size=block_size, scale=scale, num_splits=num_splits, cfg=cfg, direct=False)
    return o_part, lse_part


def merge_partials(o_part: Tensor, lse_part: Tensor, out_dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Combine ``o_part [S, B, H, Tq, D]`` / ``lse_part [S, B, H, Tq]`` through their LSE:
    ``out [B, H, Tq, D]`` in ``out_dtype`` and ``lse float32 [B, H, Tq]``."""
    S, B, H, Tq, D = o_part.shape
    out = torch.empty(B, H, Tq, D, dtype=out_dtype, device=o_part.device)
    lse = torch.empty(B, H, Tq, dtype=torch.float32, device=o_part.device)
    rows = B * H * Tq
    if rows:
        _ready(o_part.device)
        fast(_merge_kernel)[(rows,)](
            o_part, lse_part, out, lse, S, o_part.stride(0), lse_part.stride(0),
            HEAD_DIM=D, S_PAD=max(2, _next_pow2(S)), num_warps=4 if D <= 128 else 8,
        )
    return out, lse


def sparse_decode_triton(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_indices: Tensor,
    block_counts: Tensor,
    *,
    block_size: int,
    scale: float,
    num_splits: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Launch the split kernel (and the merge when ``num_splits > 1``) on inputs already
    validated by :func:`longattn.decode.sparse_decode`. Returns ``out [B, H, Tq, D]`` in q's
    dtype and ``lse float32 [B, H, Tq]``."""
    reason = unsupported_reason(q, k_cache)
    if reason is not None:
        raise ValueError(reason)
    B, H, Tq, D = q.shape
    Hkv = k_cache.shape[1]
    cfg = tile_config(H // Hkv, Tq, block_size, D, q.dtype)
    if num_splits is None:
        max_units = work_units(block_indices.shape[-1], cfg)
        num_splits = choose_num_splits(B * Hkv, cfg["row_tiles"], max_units, _sm_count(q.device))
    if B == 0:
        return q.new_empty(q.shape), torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
    if num_splits == 1:
        out = torch.empty(B, H, Tq, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        _launch_split(q, k_cache, v_cache, cache_seqlens, block_indices, block_counts, out, lse,
                      block_size=block_size, scale=scale, num_splits=1, cfg=cfg, direct=True)
        return out, lse
    o_part, lse_part = decode_partials(
        q, k_cache, v_cache, cache_seqlens, block_indices, block_counts,
        block_size=block_size, scale=scale, num_splits=num_splits,
    )
    return merge_partials(o_part, lse_part, q.dtype)


__all__ = [
    "SUPPORTED_DTYPES",
    "choose_num_splits",
    "decode_partials",
    "merge_partials",
    "sparse_decode_triton",
    "tile_config",
    "work_units",
    "unsupported_reason",
]
