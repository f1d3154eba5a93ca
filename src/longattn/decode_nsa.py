"""NSA's decoding rule: Native Sparse Attention (Yuan et al., 2025, "Native Sparse Attention:
Hardware-Aligned and Natively Trainable Sparse Attention") for a few queries per sequence over a
KV cache whose length differs per sequence.

:func:`nsa_decode` computes, for every sequence ``b`` of the batch, exactly what
:func:`longattn.methods.nsa.nsa_forward` (the parameter-free form: mean compression, the
config's constant gates) computes for the queries at the last ``Tq`` positions of the valid
prefix ``k_cache[b, :, :cache_seqlens[b]]`` -- that is its specification -- while reading

* the compressed tokens the queries can see (``O(nC)``),
* the ``num_selected`` selected blocks of ``select_block`` keys (``O(num_selected *
  select_block)``), directly from the cache,
* the last ``window`` keys (``O(window)``),

per ``(sequence, KV head)`` and query row, never a mask or score row over the whole cache.

The one ``O(T)`` step is the compression itself when ``k_cmp``/``v_cmp`` are not given: the
mean of every ``compress_block`` keys with stride ``compress_stride`` over the whole cache. A
serving cache maintains them incrementally instead -- one new compressed token every
``compress_stride`` appended tokens, the fp32 mean of the last ``compress_block`` keys
(:func:`nsa_decode_compress` is the from-scratch version of that buffer) -- and passes them in.

Branches (see :mod:`longattn.methods.nsa` for the rules, which are reused here unchanged):

1. Compressed: query ``p`` attends the compressed tokens ``i`` with ``i*d + l - 1 <= p``.
   ``backend="reference"``: plain PyTorch, fp32, per query row (the specification).
   ``backend="triton"``: the split-K kernels of :mod:`longattn.kernels.nsa.decode` (many
   programs per ``(sequence, KV head)``, the ``G`` query heads and ``Tq`` rows of a KV head in
   one program, partials merged through their log-sum-exp), which also produce the block scores.
2. Selected: the compressed probabilities summed over the GQA group score the selection blocks
   (:func:`~longattn.methods.nsa.block_scores`); the forced initial and local blocks first, then
   the best eligible blocks, ties to the lower block index (``backend="triton"``: the ranking
   kernel :func:`longattn.kernels.nsa.select_blocks` with per-sequence positions, which picks
   exactly what the PyTorch rule picks from the same scores). NSA selects per query token, so
   for ``Tq > 1`` each query row has its own selection. ``backend="reference"``: the branch
   runs :func:`~longattn.decode.sparse_decode` once per query row (``Tq <= 16`` calls), the row
   ``t`` call seeing the cache length ``cache_seqlens - Tq + t + 1`` so its query is the last
   position.
3. Window: keys ``p - window < kv <= p``. ``backend="reference"``: ``sparse_decode`` cannot
   express the window's lower bound (its blocks have no per-query start), so the ``min(window,
   Tmax)`` keys ending at each query are gathered per ``(sequence, query row)`` into a small
   buffer (query rows folded into the batch axis: ``[B * Tq, Hkv, window, D]``), over which one
   ``sparse_decode`` call with a single block attends causally.

The outputs are mixed by :func:`~longattn.methods.nsa.nsa_combine` with ``config.gates``.
``backend="triton"`` runs branches 2 and 3 and the gated sum as two kernels
(:func:`longattn.kernels.nsa.decode_branches.nsa_decode_branches`: split-K over each query row's
selected blocks and its window, both read in place from the cache, then one merge that also
applies the gates).

Host synchronisation: the only one is the length/finiteness check (``validate=True``). With
``validate=False`` and ``backend="triton"`` a step launches kernels only (no ``.item()``, no
data-dependent shape), so it can be captured in a CUDA graph.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

from .decode import DECODE_BACKENDS, _check_q_cache, _triton_reason, sparse_decode
from .methods.nsa import NSAConfig, block_scores, nsa_combine, nsa_compress, overlap_ranges
from .selection import _ceil_div

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ---------------------------------------------------------------------------- validation
def _check_config(config: NSAConfig | None) -> NSAConfig:
    if config is None:
        return NSAConfig()
    if not isinstance(config, NSAConfig):
        raise TypeError(f"config must be a longattn.methods.nsa.NSAConfig or None, got {type(config).__name__}")
    return config


def _check_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite positive number or None, got {scale!r}")
    return float(scale)


def _check_compressed(
    k_cmp: Tensor | None, v_cmp: Tensor | None, q: Tensor, k_cache: Tensor, config: NSAConfig
) -> None:
    """``k_cmp``/``v_cmp``: both or neither, ``[B, Hkv, config.num_compressed(Tmax), D]``,
    floating point, on q's device."""
    if (k_cmp is None) != (v_cmp is None):
        missing = "v_cmp" if v_cmp is None else "k_cmp"
        raise ValueError(f"k_cmp and v_cmp must be passed together; {missing} is missing")
    if k_cmp is None:
        return
    B, Hkv, Tmax, D = k_cache.shape
    want = (B, Hkv, config.num_compressed(Tmax), D)
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}; all inputs must be on one device")
        if tuple(t.shape) != want:
            raise ValueError(
                f"{name} must have shape [B, Hkv, nC, D]={want} (nC = config.num_compressed(Tmax={Tmax}): "
                f"compressed tokens of blocks of {config.compress_block} keys with stride "
                f"{config.compress_stride} over the whole cache), got {tuple(t.shape)}"
            )


def _check_lengths(q: Tensor, k_cache: Tensor, cache_seqlens: Tensor) -> None:
    """Lengths in ``[Tq, Tmax]`` and finite ``q``, with one host sync."""
    Tq, Tmax = q.shape[2], k_cache.shape[2]
    lens = cache_seqlens.long()
    flags = torch.stack([((lens < Tq) | (lens > Tmax)).any(), ~torch.isfinite(q).all()]).tolist()
    if flags[0]:
        raise ValueError(
            f"cache_seqlens must lie in [Tq={Tq}, Tmax={Tmax}] (each sequence holds its {Tq} queries' keys "
            f"and fits the cache), got min={lens.min().item()}, max={lens.max().item()}"
        )
    if flags[1]:
        raise ValueError("q contains NaN or Inf; decoding needs finite queries")


def _resolve_backend(backend: str, q: Tensor, k_cache: Tensor, v_cache: Tensor) -> str:
    """``"reference"`` or ``"triton"`` for the ``sparse_decode`` calls."""
    if not isinstance(backend, str) or backend not in DECODE_BACKENDS:
        raise ValueError(f"backend must be one of {DECODE_BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    reason = _triton_reason(q, k_cache, v_cache)
    if reason is None:
        return "triton"
    if backend == "triton":
        raise ValueError(f"backend='triton' cannot serve this call: {reason}; use backend='reference' or 'auto'")
    return "reference"


# ---------------------------------------------------------------------------- compression
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _valid_tokens(cache_seqlens: Tensor, num_compressed: int, config: NSAConfig) -> Tensor:
    """``bool [B, nC]``: compressed token ``i`` lies wholly inside sequence ``b``'s valid prefix,
    ``i*d + l <= cache_seqlens[b]``."""
    i = torch.arange(num_compressed, device=cache_seqlens.device)
    end = i * config.compress_stride + config.compress_block
    return end[None, :] <= cache_seqlens.long()[:, None]


def nsa_decode_compress(
    k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, config: NSAConfig
) -> tuple[Tensor, Tensor]:
    """NSA's compressed keys and values of a KV cache, from scratch: the fp32 (fp64 for fp64)
    mean of keys ``[i*d, i*d + l)`` for ``i < config.num_compressed(Tmax)`` (rounded to the
    cache's dtype with ``config.compressed_dtype == "input"``), with every token
    that reaches past its sequence's length (``i*d + l > cache_seqlens[b]``) set to 0.

    ``k_cache, v_cache [B, Hkv, Tmax, D]``, ``cache_seqlens [B]``. Returns ``(k_cmp, v_cmp)``,
    each ``[B, Hkv, nC, D]``: what a cache maintains incrementally (a new token every
    ``compress_stride`` appended keys) and passes to :func:`nsa_decode`. Cost ``O(T)``."""
    config = _check_config(config)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dims [B, Hkv, Tmax, D], got shape {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; allowed: float16, bfloat16, float32, float64")
    if v_cache.shape != k_cache.shape or v_cache.device != k_cache.device:
        raise ValueError(f"v_cache must match k_cache's shape {tuple(k_cache.shape)} and device {k_cache.device}, "
                         f"got {tuple(v_cache.shape)} on {v_cache.device}")
    if not isinstance(cache_seqlens, Tensor) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cache_seqlens must be an int32/int64 torch.Tensor, got {cache_seqlens!r}")
    if cache_seqlens.shape != (k_cache.shape[0],) or cache_seqlens.device != k_cache.device:
        raise ValueError(f"cache_seqlens must have shape [B]=({k_cache.shape[0]},) on {k_cache.device}, "
                         f"got {tuple(cache_seqlens.shape)} on {cache_seqlens.device}")
    k_cmp, v_cmp = nsa_compress(k_cache, v_cache, config)  # [B, Hkv, nC, D]
    valid = _valid_tokens(cache_seqlens, k_cmp.shape[2], config)[:, None, :, None]
    zero = torch.zeros((), dtype=k_cmp.dtype, device=k_cmp.device)
    return torch.where(valid, k_cmp, zero), torch.where(valid, v_cmp, zero)


# ---------------------------------------------------------------------------- branches
def _compressed_and_selection(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    pos: Tensor,
    valid_tok: Tensor,
    config: NSAConfig,
    scale: float,
    num_blocks: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """The compressed branch and the per-query selection.

    ``q [B, H, Tq, D]``, ``k_cmp/v_cmp [B, Hkv, nC, D]``, ``pos int64 [B, Tq]`` absolute query
    positions, ``valid_tok bool [B, nC]``, ``num_blocks``: selection blocks of the cache
    (``ceil(Tmax / select_block)``). Returns ``o_cmp [B, H, Tq, D]`` in q's dtype,
    ``block_indices int32 [B, Hkv, Tq, K]`` (ascending, unused slots 0) and ``block_counts
    int32 [B, Hkv, Tq]``, ``K = min(num_selected, num_blocks)``. Memory
    ``O(B * H * Tq * (nC + nKB))``."""
    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    dev = q.device
    acc = _acc_dtype(q.dtype)

    if nC > 0:
        # tokens past a sequence's end may hold anything (garbage of the cache): zero them
        # before any arithmetic; no query of that sequence can see them anyway
        keep = valid_tok[:, None, :, None]
        zero = torch.zeros((), dtype=acc, device=dev)
        kc = torch.where(keep, k_cmp.to(acc), zero)[:, :, None]  # [B, Hkv, 1, nC, D]
        vc = torch.where(keep, v_cmp.to(acc), zero)[:, :, None]
        q5 = q.reshape(B, Hkv, G, Tq, D).to(acc)  # the query heads of one KV head together
        logits = torch.matmul(q5, kc.transpose(-1, -2)) * scale  # [B, Hkv, G, Tq, nC]
        last_key = torch.arange(nC, device=dev) * d + l - 1
        visible = (last_key[None, None, :] <= pos[:, :, None])[:, None, None]  # [B, 1, 1, Tq, nC]
        logits = logits.masked_fill(~visible, float("-inf"))
        m = logits.amax(dim=-1, keepdim=True)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows that see nothing
        e = torch.exp(logits - m)  # exactly 0 where invisible
        den = e.sum(dim=-1, keepdim=True)
        probs = e / torch.where(den > 0, den, torch.ones_like(den))  # [B, Hkv, G, Tq, nC]
        o_cmp = torch.matmul(probs, vc).reshape(B, H, Tq, D).to(q.dtype)  # 0 for a row seeing nothing
        p_grp = probs.sum(dim=2)  # [B, Hkv, Tq, nC]: one selection per GQA group and query
        first, count = overlap_ranges(nC, num_blocks, config, dev)
        width = (ls + l + d - 1) // d + 1  # >= any count
        p_slc = block_scores(p_grp, first, count, width=width)  # [B, Hkv, Tq, nKB]
    else:
        o_cmp = q.new_zeros(q.shape)
        p_slc = torch.zeros(B, Hkv, Tq, num_blocks, dtype=acc, device=dev)
    idx, counts = _rank_blocks(p_slc, pos, config)
    return o_cmp, idx, counts


def _rank_blocks(p_slc: Tensor, pos: Tensor, config: NSAConfig) -> tuple[Tensor, Tensor]:
    """NSA's per-query selection from the block scores ``p_slc [B, Hkv, Tq, nKB]`` of queries
    at ``pos int64 [B, Tq]`` (plain PyTorch, no host sync): eligible blocks start at or before
    the query; the forced initial and local blocks first, then the best scores, ties to the
    lower index. Returns ``block_indices int32 [B, Hkv, Tq, K]`` (ascending, unused slots 0)
    and ``block_counts int32 [B, Hkv, Tq]``, ``K = min(num_selected, nKB)``."""
    B, Hkv, Tq, num_blocks = p_slc.shape
    ls = config.select_block
    dev = p_slc.device
    # forced (initial, local) blocks rank +inf, ineligible -inf, NaN as the lowest float; a
    # stable descending sort keeps ties in index order (lower index first)
    K = min(config.num_selected, num_blocks)
    j = torch.arange(num_blocks, device=dev)
    eligible = j[None, None, :] * ls <= pos[:, :, None]  # [B, Tq, nKB]: blocks starting at or before p
    own = (pos // ls)[:, :, None]
    forced = eligible & ((j < config.num_init_blocks) | ((j <= own) & (j > own - config.num_local_blocks)))
    fmax = torch.finfo(p_slc.dtype).max
    scores = torch.nan_to_num(p_slc, nan=-fmax, posinf=fmax, neginf=-fmax)
    ranked = torch.where(forced[:, None], float("inf"), torch.where(eligible[:, None], scores, float("-inf")))
    order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :K]  # [B, Hkv, Tq, K]
    counts = eligible.sum(-1).clamp(max=K)[:, None].expand(B, Hkv, Tq)  # [B, Hkv, Tq]
    slot = torch.arange(K, device=dev) < counts[..., None]
    idx = torch.where(slot, order, num_blocks).sort(dim=-1).values  # kept blocks ascending
    idx = torch.where(slot, idx, 0)
    return idx.to(torch.int32), counts.to(torch.int32).contiguous()


def _triton_compressed_reason(q: Tensor, k_cmp: Tensor, config: NSAConfig, num_blocks: int) -> str | None:
    """``None`` when the NSA decode kernels can compute the compressed branch and the scores."""
    from .kernels.nsa.decode import decode_unsupported_reason

    return decode_unsupported_reason(q, k_cmp, compress_block=config.compress_block,
                                     compress_stride=config.compress_stride, select_block=config.select_block,
                                     num_blocks=num_blocks)


def _query_positions(cache_seqlens: Tensor, q_len: int) -> Tensor:
    """``int64 [B, Tq]``: absolute position ``cache_seqlens[b] - Tq + t`` of each query."""
    return cache_seqlens.long()[:, None] - q_len + torch.arange(q_len, device=cache_seqlens.device)


def _compressed_and_selection_triton(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cache_seqlens: Tensor, config: NSAConfig, scale: float,
    num_blocks: int, Tmax: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """What :func:`_compressed_and_selection` returns, from the Triton kernels: the split-K
    compressed branch and block scores (:func:`longattn.kernels.nsa.decode.nsa_decode_compressed`),
    then the ranking kernel :func:`longattn.kernels.nsa.select_blocks` with per-sequence
    positions (:func:`_rank_blocks` on the kernel's scores beyond the ranking kernel's
    ``MAX_SELECT_BLOCKS``). No host sync."""
    from .kernels.nsa import select_blocks, select_unsupported_reason
    from .kernels.nsa.decode import nsa_decode_compressed

    o_cmp, _, p_slc = nsa_decode_compressed(
        q, k_cmp, v_cmp, cache_seqlens, compress_block=config.compress_block,
        compress_stride=config.compress_stride, select_block=config.select_block, num_blocks=num_blocks, scale=scale,
    )
    if select_unsupported_reason(p_slc) is not None:
        idx, counts = _rank_blocks(p_slc, _query_positions(cache_seqlens, q.shape[2]), config)
        return o_cmp, idx, counts
    idx, counts, _ = select_blocks(
        p_slc, kv_len=Tmax, kv_lens=cache_seqlens, select_block=config.select_block,
        num_selected=config.num_selected, num_init_blocks=config.num_init_blocks,
        num_local_blocks=config.num_local_blocks,
    )
    return o_cmp, idx, counts


def _selected_branch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, idx: Tensor, counts: Tensor,
    config: NSAConfig, scale: float, backend: str,
) -> Tensor:
    """One :func:`sparse_decode` call per query row ``t``: its selected blocks, read from the
    cache with the length ``cache_seqlens - Tq + t + 1`` (the query is the last position, so the
    causal rule of the call is the query's own). Returns ``[B, H, Tq, D]``."""
    Tq = q.shape[2]
    outs = []
    for t in range(Tq):
        lens_t = cache_seqlens - (Tq - 1 - t)
        outs.append(sparse_decode(
            q[:, :, t : t + 1].contiguous(), k_cache, v_cache, lens_t,
            idx[:, :, t].contiguous(), counts[:, :, t].contiguous(),
            block_size=config.select_block, scale=scale, backend=backend, validate=False,
        ))
    return torch.cat(outs, dim=2)


def _window_branch(
    q: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor, config: NSAConfig, scale: float, backend: str
) -> Tensor:
    """Keys ``p - window < kv <= p`` of each query: the ``W = min(window, Tmax)`` positions from
    ``lo = max(0, p - window + 1)`` are gathered per (sequence, query row) into
    ``[B * Tq, Hkv, W, D]`` (``O(window)`` bytes; positions past ``p`` are gathered but never read),
    then one :func:`sparse_decode` call with a single block and length ``p - lo + 1``.
    Returns ``[B, H, Tq, D]``."""
    B, H, Tq, D = q.shape
    Hkv, Tmax = k_cache.shape[1], k_cache.shape[2]
    W = min(config.window, Tmax)
    lo = torch.clamp(pos - config.window + 1, min=0)  # [B, Tq]
    gather_pos = torch.clamp(lo[:, :, None] + torch.arange(W, device=q.device), max=Tmax - 1)  # [B, Tq, W]
    b_idx = torch.arange(B, device=q.device)[:, None, None]
    # advanced indexing on dims 0 and 2: [B, Tq, W, Hkv, D]
    kw = k_cache[b_idx, :, gather_pos].permute(0, 1, 3, 2, 4).reshape(B * Tq, Hkv, W, D)
    vw = v_cache[b_idx, :, gather_pos].permute(0, 1, 3, 2, 4).reshape(B * Tq, Hkv, W, D)
    qf = q.permute(0, 2, 1, 3).reshape(B * Tq, H, 1, D)  # query rows folded into the batch
    lens = (pos - lo + 1).reshape(B * Tq)
    block_idx = torch.zeros(B * Tq, Hkv, 1, dtype=torch.int32, device=q.device)
    block_cnt = torch.ones(B * Tq, Hkv, dtype=torch.int32, device=q.device)
    out = sparse_decode(qf, kw, vw, lens, block_idx, block_cnt, block_size=W, scale=scale,
                        backend=backend, validate=False)  # [B * Tq, H, 1, D]
    return out.reshape(B, Tq, H, D).permute(0, 2, 1, 3)


# ---------------------------------------------------------------------------- public call
def nsa_decode(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    cache_seqlens: Tensor,
    *,
    config: NSAConfig | None = None,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    validate: bool = True,
) -> Tensor:
    """NSA (Native Sparse Attention, Yuan et al., 2025) decoding over a KV cache.

    Args:
        q: ``[B, H, Tq, D]``, ``1 <= Tq <= 16``: query ``i`` of sequence ``b`` sits at absolute
            position ``cache_seqlens[b] - Tq + i`` (as :func:`longattn.decode.sparse_decode`
            defines it).
        k_cache, v_cache: ``[B, Hkv, Tmax, D]`` in q's dtype, ``H % Hkv == 0``. Positions
            ``>= cache_seqlens[b]`` may hold anything; they never reach the result.
        cache_seqlens: ``int32/int64 [B]``, each in ``[Tq, Tmax]``.
        config: :class:`~longattn.methods.nsa.NSAConfig` (``None``: the paper's defaults).
        k_cmp, v_cmp: optional compressed keys/values ``[B, Hkv, config.num_compressed(Tmax),
            D]`` (any float dtype; the mean compression gives fp32), as a cache maintains them
            incrementally (:func:`nsa_decode_compress` computes them from scratch). Entries of
            tokens past a sequence's length are ignored. Without them the cache is compressed
            here, which reads the whole cache (``O(T)``) -- pass them to avoid it.
        scale: score scale, default ``1 / sqrt(D)``.
        backend: ``"reference"`` (the compressed branch and the selection in plain PyTorch,
            fp32, and ``sparse_decode(backend="reference")`` for the selected and window
            branches: the specification), ``"triton"`` (the NSA decode kernels of
            :mod:`longattn.kernels.nsa.decode` for the compressed branch and the block scores,
            the ranking kernel :func:`longattn.kernels.nsa.select_blocks`, and
            :func:`longattn.kernels.nsa.decode_branches.nsa_decode_branches` for the selected
            and window branches and the gated sum: CUDA, or CPU with ``TRITON_INTERPRET=1``; float16/bfloat16/float32, D a
            power of two in [16, 256], no autograd -- otherwise ``ValueError``) or ``"auto"``
            (triton when it can run, else reference). A config whose selection block overlaps
            more compressed tokens than the decode kernels take runs the compressed branch and
            the selection in PyTorch (with a ``RuntimeWarning`` for ``"triton"``). The two pick
            the same blocks from scores equal up to fp32 rounding (see
            :mod:`longattn.kernels.nsa.decode`).
        validate: check the lengths (in ``[Tq, Tmax]``) and that ``q`` is finite: ONE host
            sync. ``False`` skips it: then, with ``backend="triton"``, the call does no host
            synchronisation at all and can be captured in a CUDA graph -- and lengths outside
            ``[Tq, Tmax]`` or a non-finite ``q`` are the caller's responsibility (the result is
            then undefined, and the kernels may read past the cache), as with
            :func:`longattn.decode.sparse_decode` ``(validate=False)``.
            Shape, dtype and device checks always run (no sync).

    Returns:
        ``out [B, H, Tq, D]`` in q's dtype, equal for each ``b`` to
        ``nsa_forward(q[b:b+1], k_cache[b:b+1, :, :L], v_cache[b:b+1, :, :L], config,
        scale=scale, backend="reference")`` with ``L = cache_seqlens[b]``.

    Cost per (sequence, KV head) and query row: ``O(nC)`` for the compressed branch and the
    scores, ``O(nKB log nKB)`` for the top-k (``O(32 nKB)`` with the ranking kernel),
    ``O(num_selected * select_block + window)`` keys read. One host sync with
    ``validate=True`` (the length and finiteness checks), none otherwise on the triton path.
    """
    config = _check_config(config)
    _check_q_cache(q, k_cache, cache_seqlens, v_cache)
    _check_compressed(k_cmp, v_cmp, q, k_cache, config)
    scale = _check_scale(scale, q.shape[-1])
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {validate!r}")
    requested, backend = backend, _resolve_backend(backend, q, k_cache, v_cache)
    B, H, Tq, D = q.shape
    if B == 0:
        return q.new_empty(q.shape)
    if validate:
        _check_lengths(q, k_cache, cache_seqlens)

    Tmax = k_cache.shape[2]
    if k_cmp is None:
        k_cmp, v_cmp = nsa_compress(k_cache, v_cache, config)  # O(T): pass k_cmp/v_cmp to avoid it
    assert v_cmp is not None
    num_blocks = _ceil_div(Tmax, config.select_block)
    kernels = backend == "triton"
    if kernels:
        reason = _triton_compressed_reason(q, k_cmp, config, num_blocks)
        if reason is not None:
            if requested == "triton":  # "auto" falls back silently
                warnings.warn(f"NSA decode kernels cannot serve this call ({reason}); the compressed branch and "
                              "the selection run in PyTorch", RuntimeWarning, stacklevel=2)
            kernels = False
    if kernels:
        o_cmp, idx, counts = _compressed_and_selection_triton(
            q, k_cmp, v_cmp, cache_seqlens, config, scale, num_blocks, Tmax)
    else:
        pos = _query_positions(cache_seqlens, Tq)
        valid_tok = _valid_tokens(cache_seqlens, k_cmp.shape[2], config)
        o_cmp, idx, counts = _compressed_and_selection(q, k_cmp, v_cmp, pos, valid_tok, config, scale, num_blocks)
    if backend == "triton":  # both branches read in place and the gated sum: two launches
        from .kernels.nsa.decode_branches import nsa_decode_branches

        return nsa_decode_branches(q, k_cache, v_cache, cache_seqlens, idx, counts, o_cmp,
                                   select_block=config.select_block, window=config.window, gates=config.gates,
                                   scale=scale)
    o_slc = _selected_branch(q, k_cache, v_cache, cache_seqlens, idx, counts, config, scale, backend)
    o_win = _window_branch(q, k_cache, v_cache, pos, config, scale, backend)  # not triton: pos is set above
    return nsa_combine(o_cmp, o_slc, o_win, config.gates)


__all__ = ["nsa_decode", "nsa_decode_compress"]
