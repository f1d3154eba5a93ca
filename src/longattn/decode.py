"""Sparse decoding: a few queries per sequence attend to selected blocks of a KV cache.

A decoding step has one query per sequence (or a small chunk, ``Tq <= 16``: speculative
verification, chunked appends) and a cache whose length differs per sequence. Dense decoding
is bandwidth-bound -- it reads every cached key and value once -- so the only way to make it
faster is to read fewer bytes. Here each ``(sequence, KV head)`` names the key blocks its
queries may read (``block_indices`` / ``block_counts``, shared by the ``G = H // Hkv`` query
heads of a GQA group, as in NSA and Quest), and the Triton backend loads those blocks only.

Contents:

* :func:`sparse_decode` -- the public call (``backend="reference" | "triton" | "auto"``);
* :func:`sparse_decode_reference` -- plain PyTorch, dense masking, fp32 accumulation: the
  specification the kernel is tested against;
* selectors returning ``(block_indices, block_counts)``: :func:`select_topk_blocks` (pooled
  mean scores with sink and local blocks), :func:`select_quest_pages` (Quest's per-page
  upper bound), :func:`select_moba_blocks` (MoBA's gate with the current block);
* cache summaries a cache can maintain incrementally instead of recomputing per step:
  :func:`block_key_means` (for top-k and MoBA) and :func:`page_bounds` (for Quest).

Positions: query ``i`` of sequence ``b`` sits at absolute position
``cache_seqlens[b] - Tq + i`` and is causal, so it reads the selected keys at positions
``<= cache_seqlens[b] - Tq + i``. Cache positions ``>= cache_seqlens[b]`` are never read.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .backends.dense import dense_masked_attention, expand_kv_heads
from .registry import AttnInputs
from .selection import _ceil_div

MAX_DECODE_QUERIES = 16
DECODE_BACKENDS = ("auto", "reference", "triton")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX_DTYPES = (torch.int32, torch.int64)


# ---------------------------------------------------------------------------- validation
def _check_int(name: str, value: object, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def _check_q_cache(q: Tensor, k_cache: Tensor, cache_seqlens: Tensor, v_cache: Tensor | None = None) -> None:
    """Shape, dtype and device checks of ``q [B, H, Tq, D]``, the caches
    ``[B, Hkv, Tmax, D]`` and ``cache_seqlens [B]`` (no host sync)."""
    named = [("q", q), ("k_cache", k_cache)] + ([("v_cache", v_cache)] if v_cache is not None else [])
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, H, T, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64")
    if not isinstance(cache_seqlens, Tensor):
        raise TypeError(f"cache_seqlens must be a torch.Tensor, got {type(cache_seqlens).__name__}")
    if k_cache.dtype != q.dtype or (v_cache is not None and v_cache.dtype != q.dtype):
        got = f"q={q.dtype}, k_cache={k_cache.dtype}" + (f", v_cache={v_cache.dtype}" if v_cache is not None else "")
        raise TypeError(f"q and the caches must share one dtype, got {got}")
    for name, t in named[1:] + [("cache_seqlens", cache_seqlens)]:
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if v_cache is not None and v_cache.shape != k_cache.shape:
        raise ValueError(
            f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} and {tuple(v_cache.shape)}"
        )
    B, H, Tq, D = q.shape
    Bk, Hkv, Tmax, Dk = k_cache.shape
    if Bk != B:
        raise ValueError(f"batch size differs: q has B={B}, k_cache has B={Bk}")
    if Dk != D or D == 0:
        raise ValueError(f"head dim must match and be >= 1: q has D={D}, k_cache has D={Dk}")
    if H == 0 or Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"q's heads H={H} must be a positive multiple of the cache's heads Hkv={Hkv} (GQA)")
    if not 1 <= Tq <= MAX_DECODE_QUERIES:
        raise ValueError(
            f"q has Tq={Tq} queries per sequence; decoding allows 1..{MAX_DECODE_QUERIES} "
            "(use longattn.attention for longer chunks)"
        )
    if Tmax < Tq:
        raise ValueError(f"k_cache has Tmax={Tmax} positions < Tq={Tq} queries; every query needs its key in the cache")
    if cache_seqlens.dtype not in _INDEX_DTYPES:
        raise TypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if cache_seqlens.shape != (B,):
        raise ValueError(f"cache_seqlens must have shape [B]=({B},), got {tuple(cache_seqlens.shape)}")


def _check_selection_shapes(q: Tensor, k_cache: Tensor, block_indices: Tensor, block_counts: Tensor) -> None:
    B, Hkv = k_cache.shape[:2]
    for name, t in (("block_indices", block_indices), ("block_counts", block_counts)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _INDEX_DTYPES:
            raise TypeError(f"{name} must be int32 (or int64), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
    if block_indices.dim() != 3 or block_indices.shape[:2] != (B, Hkv):
        raise ValueError(f"block_indices must have shape [B, Hkv, K]=({B}, {Hkv}, K), got {tuple(block_indices.shape)}")
    if block_counts.shape != (B, Hkv):
        raise ValueError(f"block_counts must have shape [B, Hkv]=({B}, {Hkv}), got {tuple(block_counts.shape)}")


def _check_values(q, k_cache, cache_seqlens, block_indices, block_counts, block_size: int) -> None:
    """The data-dependent checks, evaluated on the device and read back with ONE host sync:
    lengths in ``[Tq, Tmax]``, counts in ``[0, K]``, the counted indices in
    ``[0, ceil(len / block_size))`` and distinct, ``q`` finite."""
    Tq, Tmax = q.shape[2], k_cache.shape[2]
    K = block_indices.shape[-1]
    dev = q.device
    lens = cache_seqlens.long()
    counts = block_counts.long()
    nb = _ceil_div(lens, block_size)  # [B] key blocks holding valid keys
    slot = torch.arange(K, device=dev) < counts[..., None]  # [B, Hkv, K]
    idx = block_indices.long()
    bad_idx = slot & ((idx < 0) | (idx >= nb[:, None, None]))
    sentinel = (1 << 40) + torch.arange(K, device=dev)  # distinct values for unused slots
    srt = torch.where(slot, idx, sentinel).sort(dim=-1).values
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < (1 << 40))
    flags = torch.stack([
        (lens < Tq).any() | (lens > Tmax).any(),
        ((counts < 0) | (counts > K)).any(),
        bad_idx.any(),
        dup.any(),
        ~torch.isfinite(q).all(),
    ]).tolist()  # the one host sync
    if flags[0]:
        raise ValueError(
            f"cache_seqlens must lie in [Tq={Tq}, Tmax={Tmax}] (each sequence holds its {Tq} "
            f"queries' keys and fits the cache), got min={lens.min().item()}, max={lens.max().item()}"
        )
    if flags[1]:
        raise ValueError(f"block_counts must lie in [0, K={K}] (K = block_indices.shape[-1]), "
                         f"got min={counts.min().item()}, max={counts.max().item()}")
    if flags[2]:
        raise ValueError(
            f"block_indices: the first block_counts entries must lie in [0, ceil(cache_seqlens / "
            f"block_size)) with block_size={block_size}; an index names a block past its sequence's length"
        )
    if flags[3]:
        raise ValueError("block_indices repeats a key block within one (sequence, KV head); entries must be distinct")
    if flags[4]:
        raise ValueError("q contains NaN or Inf; decoding needs finite queries")


# ---------------------------------------------------------------------------- reference
def sparse_decode_reference(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_indices: Tensor,
    block_counts: Tensor,
    *,
    block_size: int,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The specification of sparse decoding, in plain PyTorch with dense masks and fp32
    accumulation (fp64 for fp64 inputs; the input dtype inside
    :func:`longattn.backends.plain_precision`). Inputs are assumed valid (see
    :func:`sparse_decode`).

    Query ``i`` of sequence ``b`` and head ``h`` reads key ``j`` when
    (1) ``j``'s block ``j // block_size`` is among the first ``block_counts[b, h // G]`` entries
    of ``block_indices[b, h // G]``, and (2) ``j <= cache_seqlens[b] - Tq + i`` (causal; this also
    keeps ``j < cache_seqlens[b]``). Keys and values outside that set are zeroed before any
    arithmetic, so garbage there (NaN, Inf) cannot reach the result.

    Returns ``out [B, H, Tq, D]`` in q's dtype and ``lse float32 [B, H, Tq]`` (natural log,
    ``-inf`` for a query that reads no key; its output row is 0).
    """
    B, H, Tq, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    dev = q.device
    nb_max = _ceil_div(Tmax, block_size)
    K = block_indices.shape[-1]
    lens = cache_seqlens.long()

    # which key blocks each (sequence, KV head) selected: bool [B, Hkv, nBlocks]
    slot = torch.arange(K, device=dev) < block_counts.long()[..., None]  # [B, Hkv, K]
    target = torch.where(slot, block_indices.long(), nb_max)  # unused slots -> a spare column
    selected = torch.zeros(B, Hkv, nb_max + 1, dtype=torch.bool, device=dev)
    selected.scatter_(-1, target, True)
    selected = selected[..., :nb_max]
    pos = torch.arange(Tmax, device=dev)
    in_selection = selected.repeat_interleave(block_size, dim=-1)[..., :Tmax]  # [B, Hkv, Tmax]

    q_pos = lens[:, None] - Tq + torch.arange(Tq, device=dev)  # [B, Tq] absolute query positions
    causal = pos[None, None, :] <= q_pos[:, :, None]  # [B, Tq, Tmax]
    mask = in_selection[:, :, None, :] & causal[:, None]  # [B, Hkv, Tq, Tmax]
    readable = in_selection & (pos[None, None, :] < lens[:, None, None])  # [B, Hkv, Tmax]

    zero = torch.zeros((), dtype=k_cache.dtype, device=dev)
    k = torch.where(readable[..., None], k_cache, zero)  # [B, Hkv, Tmax, D]
    v = torch.where(readable[..., None], v_cache, zero)
    out, lse = dense_masked_attention(AttnInputs(q=q, k=k, v=v, causal=True, scale=scale), mask)
    return out, lse.float()


# ---------------------------------------------------------------------------- public call
def sparse_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    block_indices: Tensor,
    block_counts: Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    num_splits: int | None = None,
    validate: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention of a few queries per sequence over the selected blocks of a KV cache.

    Args:
        q: ``[B, H, Tq, D]``, ``1 <= Tq <= 16``; the queries are the last ``Tq`` positions of
            each sequence: query ``i`` of sequence ``b`` sits at ``cache_seqlens[b] - Tq + i``
            and reads keys at positions ``<=`` its own (causal).
        k_cache, v_cache: ``[B, Hkv, Tmax, D]`` in q's dtype, ``H % Hkv == 0`` (query head
            ``h`` reads KV head ``h // (H // Hkv)``). Positions ``>= cache_seqlens[b]`` may hold
            anything; they are never read.
        cache_seqlens: ``int32/int64 [B]``, each in ``[Tq, Tmax]`` (the valid prefix length).
        block_indices: ``int32 [B, Hkv, K]`` key-block indices (block ``j`` = positions
            ``[j * block_size, (j + 1) * block_size)``) shared by the query heads of a group;
            the first ``block_counts[b, h]`` entries are used: distinct, each
            ``< ceil(cache_seqlens[b] / block_size)``. Ascending order reads memory in order.
            int64 is accepted too.
        block_counts: ``int32 [B, Hkv]`` in ``[0, K]``.
        block_size: tokens per key block (any int >= 1; the Triton kernel loads 64 keys per
            step from a multiple of 64 or from power-of-two blocks packed several to a step, and
            pads other sizes to a power of two).
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"reference"`` (:func:`sparse_decode_reference`), ``"triton"`` (the split-K
            kernel: CUDA, or CPU under ``TRITON_INTERPRET=1``; float16/bfloat16/float32, D a
            power of two in [16, 256], no autograd -- otherwise ``ValueError``), or ``"auto"``
            (triton when it can serve the call, else reference).
        return_lse: also return the log-sum-exp.
        num_splits: Triton only: programs per ``(sequence, KV head)`` that share its selected
            blocks (split-K); ``None`` picks by a heuristic from the number of programs and SMs
            (:func:`longattn.kernels.decode.choose_num_splits`).
        validate: run the data-dependent checks (lengths, counts, indices, finite ``q``).
            They cost ONE host sync; pass ``False`` in a hot loop (e.g. under CUDA graphs)
            once the selector is trusted. Shape/dtype/device checks always run (no sync).

    Returns:
        ``out [B, H, Tq, D]`` in q's dtype, or ``(out, lse)`` with ``lse float32 [B, H, Tq]``
        (natural log; ``-inf`` where a query reads no key, whose output row is 0).
        ``B == 0`` returns empty tensors.
    """
    if not isinstance(backend, str) or backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    _check_q_cache(q, k_cache, cache_seqlens, v_cache)
    _check_selection_shapes(q, k_cache, block_indices, block_counts)
    _check_int("block_size", block_size, 1)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse must be a bool, got {return_lse!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    if num_splits is not None:
        _check_int("num_splits", num_splits, 1)
    D = q.shape[-1]
    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    scale = float(scale)

    B, H, Tq, _ = q.shape
    if B == 0:
        out = q.new_empty(q.shape)
        lse = torch.empty(B, H, Tq, dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if validate:
        _check_values(q, k_cache, cache_seqlens, block_indices, block_counts, block_size)

    use_triton = False
    if backend != "reference":
        reason = _triton_reason(q, k_cache, v_cache)
        if reason is None:
            use_triton = True
        elif backend == "triton":
            raise ValueError(f"backend='triton' cannot serve this call: {reason}; use backend='reference' or 'auto'")
    if use_triton:
        from .kernels.decode import sparse_decode_triton

        out, lse = sparse_decode_triton(
            q, k_cache, v_cache, cache_seqlens, block_indices, block_counts,
            block_size=block_size, scale=scale, num_splits=num_splits,
        )
    else:
        out, lse = sparse_decode_reference(
            q, k_cache, v_cache, cache_seqlens, block_indices, block_counts, block_size=block_size, scale=scale
        )
    return (out, lse) if return_lse else out


def _triton_reason(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str | None:
    """``None`` when the Triton kernel can serve the call, else why not."""
    from .kernels import triton_unavailable_reason

    reason = triton_unavailable_reason(q.device)
    if reason is not None:
        return reason
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k_cache, v_cache)):
        return "the kernel has no backward (decoding is inference); inputs require grad"
    from .kernels.decode import unsupported_reason

    return unsupported_reason(q, k_cache)


# ---------------------------------------------------------------------------- cache summaries
def _valid_positions(k_cache: Tensor, cache_seqlens: Tensor) -> Tensor:
    """``bool [B, 1, Tmax, 1]``: True at positions below each sequence's length."""
    pos = torch.arange(k_cache.shape[2], device=k_cache.device)
    return (pos[None, :] < cache_seqlens.long()[:, None])[:, None, :, None]


def _pad_to_blocks(x: Tensor, block: int, fill: float) -> Tensor:
    """Pad dim 2 of ``[B, Hkv, T, D]`` with ``fill`` to a multiple of ``block`` and view it as
    ``[B, Hkv, nBlocks, block, D]``."""
    B, Hkv, T, D = x.shape
    n = _ceil_div(T, block)
    if n * block != T:
        x = torch.cat([x, x.new_full((B, Hkv, n * block - T, D), fill)], dim=2)
    return x.view(B, Hkv, n, block, D)


def block_key_means(k_cache: Tensor, cache_seqlens: Tensor, block_size: int) -> Tensor:
    """Mean of each block's VALID keys (positions ``< cache_seqlens[b]``), accumulated in fp32:
    ``float32 [B, Hkv, ceil(Tmax / block_size), D]`` (fp64 for fp64 caches); 0 for a block
    without valid keys. Garbage past the length never enters. A cache can keep these sums up to
    date as tokens are appended instead of recomputing them each step."""
    _check_int("block_size", block_size, 1)
    acc = torch.float64 if k_cache.dtype == torch.float64 else torch.float32
    valid = _valid_positions(k_cache, cache_seqlens)  # [B, 1, Tmax, 1]
    k = torch.where(valid, k_cache, torch.zeros((), dtype=k_cache.dtype, device=k_cache.device))
    sums = _pad_to_blocks(k, block_size, 0.0).sum(3, dtype=acc)  # [B, Hkv, nB, D]
    n_valid = _pad_to_blocks(valid.to(acc), block_size, 0.0).sum(3)  # [B, 1, nB, 1]
    return sums / n_valid.clamp(min=1)


def page_bounds(k_cache: Tensor, cache_seqlens: Tensor, page_size: int) -> tuple[Tensor, Tensor]:
    """Quest's page metadata: the element-wise minimum and maximum of each page's VALID keys,
    ``(kmin, kmax)``, each ``[B, Hkv, ceil(Tmax / page_size), D]`` in the cache's dtype (exact).
    A page without valid keys has ``kmin = +inf`` and ``kmax = -inf``. A cache can maintain
    these incrementally (a new key only updates its own page)."""
    _check_int("page_size", page_size, 1)
    valid = _valid_positions(k_cache, cache_seqlens)
    inf = torch.tensor(float("inf"), dtype=k_cache.dtype, device=k_cache.device)
    kmin = _pad_to_blocks(torch.where(valid, k_cache, inf), page_size, float("inf")).amin(3)
    kmax = _pad_to_blocks(torch.where(valid, k_cache, -inf), page_size, float("-inf")).amax(3)
    return kmin, kmax


def quest_upper_bounds(q: Tensor, kmin: Tensor, kmax: Tensor) -> Tensor:
    """Quest's upper bound of ``q . k`` over every key of a page, per query head and query:
    ``sum_d max(q_d * kmin_d, q_d * kmax_d)``, computed as ``relu(q) . kmax - relu(-q) . kmin``
    (two matmuls, no ``[.., D]`` product tensor). ``q [B, H, Tq, D]``, ``kmin/kmax
    [B, Hkv, nPages, D]`` from :func:`page_bounds`; returns fp32 (fp64 for fp64 inputs)
    ``[B, H, Tq, nPages]``, ``-inf`` for a page without valid keys. Unscaled (no
    ``1/sqrt(D)``)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    empty = (kmin > kmax).any(-1)  # [B, Hkv, nP]: only pages without valid keys
    lo = torch.where(empty[..., None], 0.0, kmin.to(acc))
    hi = torch.where(empty[..., None], 0.0, kmax.to(acc))
    H = q.shape[1]
    lo, hi = expand_kv_heads(lo, H), expand_kv_heads(hi, H)  # [B, H, nP, D]
    qa = q.to(acc)
    bound = torch.matmul(qa.clamp(min=0), hi.transpose(-1, -2)) + torch.matmul(qa.clamp(max=0), lo.transpose(-1, -2))
    return bound.masked_fill(expand_kv_heads(empty, H)[:, :, None, :], float("-inf"))


# ---------------------------------------------------------------------------- selectors
def _group_sum(x: Tensor, num_kv_heads: int) -> Tensor:
    """Sum ``[B, H, ...]`` over the ``G`` consecutive query heads of each GQA group:
    ``[B, Hkv, ...]``."""
    B, H = x.shape[:2]
    return x.reshape(B, num_kv_heads, H // num_kv_heads, *x.shape[2:]).sum(2)


def _keep_top(scores: Tensor, eligible: Tensor, forced: Tensor, counts: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """``(block_indices int32 [B, Hkv, width], block_counts int32 [B, Hkv])`` keeping, per row,
    the ``forced`` blocks and then the best-scoring ``eligible`` ones, ``counts`` in all
    (``counts`` <= number of forced-or-eligible blocks). The kept indices come first, in
    ascending order (sequential reads); unused slots hold 0."""
    big = torch.finfo(scores.dtype).max
    finite = torch.nan_to_num(scores, nan=-big, posinf=big, neginf=-big)  # forced always outranks
    ranked = torch.where(forced, float("inf"), torch.where(eligible, finite, float("-inf")))
    nb = scores.shape[-1]
    top = ranked.topk(width, dim=-1).indices  # [B, Hkv, width], forced first, then by score
    slot = torch.arange(width, device=scores.device) < counts[..., None]
    idx = torch.where(slot, top, nb).sort(dim=-1).values
    idx = torch.where(slot, idx, 0)
    return idx.to(torch.int32), counts.to(torch.int32)


def _selector_setup(q: Tensor, k_cache: Tensor, cache_seqlens: Tensor, block: int, top_k: int, block_name: str) -> int:
    """The selectors' argument checks (no tensor work, no host sync); returns the number of
    blocks of the cache, ``ceil(Tmax / block)``."""
    _check_q_cache(q, k_cache, cache_seqlens)
    _check_int(block_name, block, 1)
    _check_int("top_k", top_k, 1)
    return _ceil_div(k_cache.shape[2], block)


def _clamped_lengths(cache_seqlens: Tensor, k_cache: Tensor) -> Tensor:
    """Lengths are checked by sparse_decode (one sync); the selectors only clamp them to
    ``[1, Tmax]`` so that a bad length cannot index outside the cache."""
    return cache_seqlens.long().clamp(1, k_cache.shape[2])


def _valid_blocks(cache_seqlens: Tensor, k_cache: Tensor, block: int, n_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(lens [B], blocks holding valid keys [B], block ids [n_blocks])`` for the PyTorch
    selectors (the selection kernel derives these itself, so its path skips them)."""
    lens = _clamped_lengths(cache_seqlens, k_cache)
    return lens, _ceil_div(lens, block), torch.arange(n_blocks, device=k_cache.device)


def _selector_backend(backend: str, q: Tensor, k_cache: Tensor, n_blocks: int) -> bool:
    """Whether a selector runs its Triton kernel: ``"triton"`` (error if it cannot),
    ``"reference"`` (never) or ``"auto"`` (when it can)."""
    if not isinstance(backend, str) or backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return False
    reason = _triton_reason(q, k_cache, k_cache)
    if reason is None:
        from .kernels.decode.select import MAX_SELECT_BLOCKS

        if n_blocks > MAX_SELECT_BLOCKS:
            reason = f"the selection kernel ranks at most {MAX_SELECT_BLOCKS} blocks, this cache has {n_blocks}"
    if reason is None:
        return True
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot serve this selection: {reason}; use 'reference' or 'auto'")
    return False


def _check_summary(name: str, summary: Tensor, k_cache: Tensor, n_blocks: int) -> None:
    want = (*k_cache.shape[:2], n_blocks, k_cache.shape[3])
    if tuple(summary.shape) != want:
        raise ValueError(f"{name} must have shape [B, Hkv, nBlocks, D]={want}, got {tuple(summary.shape)}")


def select_topk_blocks(
    q: Tensor,
    k_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_size: int,
    top_k: int,
    sink_blocks: int = 1,
    local_blocks: int = 1,
    key_means: Tensor | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Block top-k for decoding, one selection per GQA group.

    Every block holding valid keys (complete or the partial last one) is scored by
    ``sum over the group's heads h of mean_i(q[b, h, i]) . mean(valid keys of the block)``
    (fp32), i.e. the group-and-query mean of q times the block's mean key, times ``G``.
    The first ``sink_blocks`` and the last ``local_blocks`` blocks are always kept; the best of
    the rest fill up to ``top_k`` blocks in all, clamped to the number of blocks of the sequence.

    Args:
        q: ``[B, H, Tq, D]``; k_cache ``[B, Hkv, Tmax, D]``; cache_seqlens ``[B]``.
        block_size, top_k: ints >= 1; ``sink_blocks + local_blocks <= top_k``.
        key_means: optional precomputed :func:`block_key_means` ``[B, Hkv, nBlocks, D]``.
        backend: ``"reference"`` (this function's PyTorch code, the specification),
            ``"triton"`` (a scoring kernel and a ranking kernel; ties go to the
            lower block index) or ``"auto"`` (triton where it can run).

    Returns:
        ``block_indices int32 [B, Hkv, min(top_k, ceil(Tmax / block_size))]`` (kept blocks
        first, ascending; unused slots 0) and ``block_counts int32 [B, Hkv]``.
    Cost: ``O(B * Hkv * Tmax * D)`` for the means (``O(B * H * nBlocks * D)`` with
    ``key_means``); never ``O(T^2)``. Lengths are not checked here (no host sync): pass the
    same ``cache_seqlens`` to :func:`sparse_decode`, which checks them.
    """
    nb_max = _selector_setup(q, k_cache, cache_seqlens, block_size, top_k, "block_size")
    _check_int("sink_blocks", sink_blocks, 0)
    _check_int("local_blocks", local_blocks, 0)
    if sink_blocks + local_blocks > top_k:
        raise ValueError(
            f"sink_blocks + local_blocks = {sink_blocks + local_blocks} must be <= top_k={top_k} "
            "(the always-kept blocks count toward top_k)"
        )
    Hkv = k_cache.shape[1]
    use_kernel = _selector_backend(backend, q, k_cache, nb_max)
    if key_means is None:
        key_means = block_key_means(k_cache, _clamped_lengths(cache_seqlens, k_cache), block_size)
    _check_summary("key_means", key_means, k_cache, nb_max)
    if use_kernel:
        from .kernels.decode.select import select_blocks_triton

        return select_blocks_triton(q, cache_seqlens, block_size=block_size, top_k=top_k, width=min(top_k, nb_max),
                                    n_sink=sink_blocks, n_local=local_blocks, key_means=key_means)
    _, nb, c = _valid_blocks(cache_seqlens, k_cache, block_size, nb_max)
    acc = key_means.dtype
    q_mean = _group_sum(q.to(acc).mean(2), Hkv)  # [B, Hkv, D]: sum over the group of each head's query mean
    scores = torch.einsum("bhd,bhnd->bhn", q_mean, key_means)  # [B, Hkv, nB]
    eligible = (c[None, :] < nb[:, None])[:, None, :]  # [B, 1, nB]
    forced = eligible & ((c[None, None, :] < sink_blocks) | (c[None, None, :] >= (nb - local_blocks)[:, None, None]))
    counts = torch.clamp(nb, max=top_k)[:, None].expand(-1, Hkv)  # [B, Hkv]
    return _keep_top(scores, eligible.expand_as(scores), forced.expand_as(scores), counts, min(top_k, nb_max))


def select_quest_pages(
    q: Tensor,
    k_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    page_size: int,
    top_k: int,
    bounds: tuple[Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
    Inference"): rank the KV pages of a cache by an upper bound of the attention score any of
    their keys can reach, and read the best ``top_k``.

    Per page, :func:`page_bounds` keeps the element-wise min and max of its valid keys; the
    bound of ``q . k`` for the page is ``sum_d max(q_d * min_d, q_d * max_d)``
    (:func:`quest_upper_bounds`). Quest scores per head; to share one selection per GQA group
    the bound is summed over the group's ``G`` heads (and over the ``Tq`` queries when
    ``Tq > 1``; ``Tq = 1`` is Quest's decoding step). The last page (holding the current
    token) is always kept; ``top_k`` pages in all, clamped to the number of pages.

    Args:
        q: ``[B, H, Tq, D]``; k_cache ``[B, Hkv, Tmax, D]``; cache_seqlens ``[B]``.
        page_size, top_k: ints >= 1 (``block_size`` for :func:`sparse_decode` is
            ``page_size``).
        bounds: optional precomputed ``(kmin, kmax)`` from :func:`page_bounds`.
        backend: ``"reference"`` (the PyTorch code here), ``"triton"`` (the selection kernels; ties go to
            the lower page index) or ``"auto"``, as in :func:`select_topk_blocks`.

    Returns:
        ``block_indices int32 [B, Hkv, min(top_k, nPages)]`` (ascending) and
        ``block_counts int32 [B, Hkv]``. Cost ``O(B * H * Tq * nPages * D)`` given the bounds.
        Lengths are not checked here (no host sync); :func:`sparse_decode` checks them.
    """
    np_max = _selector_setup(q, k_cache, cache_seqlens, page_size, top_k, "page_size")
    Hkv = k_cache.shape[1]
    use_kernel = _selector_backend(backend, q, k_cache, np_max)
    if bounds is None:
        bounds = page_bounds(k_cache, _clamped_lengths(cache_seqlens, k_cache), page_size)
    kmin, kmax = bounds
    if kmin.shape != kmax.shape or kmin.shape[:2] != k_cache.shape[:2] or kmin.shape[2] != np_max:
        raise ValueError(
            f"bounds must be (kmin, kmax) shaped [B, Hkv, ceil(Tmax / page_size), D]="
            f"{(*k_cache.shape[:2], np_max, k_cache.shape[3])}, got {tuple(kmin.shape)} and {tuple(kmax.shape)}"
        )
    if use_kernel:
        from .kernels.decode.select import select_blocks_triton

        if kmin.dtype != q.dtype or kmax.dtype != q.dtype:
            raise TypeError(f"bounds must be in q's dtype {q.dtype} (as page_bounds makes them), got {kmin.dtype}")
        return select_blocks_triton(q, cache_seqlens, block_size=page_size, top_k=top_k, width=min(top_k, np_max),
                                    n_sink=0, n_local=1, bounds=(kmin.contiguous(), kmax.contiguous()))
    _, npg, c = _valid_blocks(cache_seqlens, k_cache, page_size, np_max)
    ub = quest_upper_bounds(q, kmin, kmax)  # [B, H, Tq, nP]
    scores = _group_sum(ub.sum(2), Hkv)  # [B, Hkv, nP]
    eligible = (c[None, :] < npg[:, None])[:, None, :]
    forced = (c[None, :] == (npg - 1)[:, None])[:, None, :]
    counts = torch.clamp(npg, max=top_k)[:, None].expand(-1, Hkv)
    return _keep_top(scores, eligible.expand_as(scores), forced.expand_as(scores), counts, min(top_k, np_max))


def select_moba_blocks(
    q: Tensor,
    k_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    block_size: int,
    top_k: int,
    key_means: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """MoBA (Lu et al. 2025, "MoBA: Mixture of Block Attention for Long-Context LLMs") for
    decoding, one selection per GQA group.

    MoBA gates each query per head: ``gate_j = q . mean(K_j)`` over the COMPLETE past blocks
    ``j``, keeps the top ``top_k - 1`` of them and always its own (current, possibly partial)
    block, read causally. Here the gate is summed over the ``G`` query heads of a GQA group
    (and over the ``Tq`` queries) so the group shares one selection: every selected block is
    read once per group. The current block(s) -- those holding any of the ``Tq`` query positions
    (two when the chunk straddles a boundary) -- are always selected, even beyond ``top_k``;
    blocks before the first query's block are the eligible past blocks (they are complete).
    ``top_k`` blocks in all otherwise.

    Args:
        q: ``[B, H, Tq, D]``; k_cache ``[B, Hkv, Tmax, D]``; cache_seqlens ``[B]``.
        block_size, top_k: ints >= 1.
        key_means: optional precomputed :func:`block_key_means`.

    Returns:
        ``block_indices int32 [B, Hkv, W]`` (``W = min(nBlocks, max(top_k, own blocks))``,
        ascending) and ``block_counts int32 [B, Hkv]``. Lengths are not checked here (no host
        sync); :func:`sparse_decode` checks them.
    """
    nb_max = _selector_setup(q, k_cache, cache_seqlens, block_size, top_k, "block_size")
    lens, nb, c = _valid_blocks(cache_seqlens, k_cache, block_size, nb_max)
    B, H, Tq, _ = q.shape
    Hkv = k_cache.shape[1]
    if key_means is None:
        key_means = block_key_means(k_cache, lens, block_size)
    gate_q = _group_sum(q.to(key_means.dtype).sum(2), Hkv)  # [B, Hkv, D]
    scores = torch.einsum("bhd,bhnd->bhn", gate_q, key_means)  # [B, Hkv, nB]
    first_own = torch.clamp(lens - Tq, min=0) // block_size  # [B] block of the first query
    last_own = (lens - 1) // block_size  # [B] block of the last query
    own = (c[None, :] >= first_own[:, None]) & (c[None, :] <= last_own[:, None])  # [B, nB]
    past = c[None, :] < first_own[:, None]
    n_own = last_own - first_own + 1
    counts = n_own + torch.minimum(torch.clamp(top_k - n_own, min=0), first_own)  # [B]
    max_own = (Tq - 1 + block_size - 1) // block_size + 1  # most blocks Tq positions can touch
    width = min(nb_max, max(top_k, max_own))
    return _keep_top(
        scores, past[:, None, :].expand_as(scores), own[:, None, :].expand_as(scores),
        counts[:, None].expand(-1, Hkv), width,
    )


__all__ = [
    "MAX_DECODE_QUERIES",
    "block_key_means",
    "page_bounds",
    "quest_upper_bounds",
    "select_moba_blocks",
    "select_quest_pages",
    "select_topk_blocks",
    "sparse_decode",
    "sparse_decode_reference",
]
