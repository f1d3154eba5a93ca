"""NSA: Native Sparse Attention (Hardware-Aligned and Natively Trainable Sparse Attention,
Yuan et al., 2025).

Every query at absolute position ``p`` reads the keys through three branches and mixes their
outputs with gates (order: compressed, selected, window)::

    o = g_c * o_cmp + g_s * o_slc + g_w * o_win

1. **Compressed** (``nsa_compress`` + ``nsa_compressed_branch``): keys and values are cut into
   overlapping blocks of ``l = compress_block`` tokens with stride ``d = compress_stride``;
   compressed token ``i`` summarises keys ``[i*d, i*d + l)`` through ``phi`` (``i = 0 ..
   nC-1``, ``nC = floor((Tk - l) / d) + 1`` when ``Tk >= l``, else 0; a tail shorter than a
   block is not compressed). The functional form here uses ``phi = mean`` (parameter free),
   kept in fp32 (``compressed_dtype="float32"``, the default) or rounded to the inputs' dtype
   (``compressed_dtype="input"``: what a model in bf16 holds, as the paper's learned ``phi``
   and kernels do; the triton backend then scores them with one 16-bit tensor-core pass
   instead of three fp32-emulating ones); :class:`longattn.nn.NativeSparseAttention` learns
   ``phi`` as the paper's MLP with an intra-block position embedding. Query ``p`` attends
   compressed token ``i`` iff the whole block lies in its past, ``i*d + l - 1 <= p``. A query
   that sees no compressed token gets 0 from this branch.
2. **Selected** (``nsa_selection`` + ``nsa_selected_branch``): the compressed attention
   probabilities ``p_cmp`` (softmax over the visible compressed tokens, per query head) score
   selection blocks of ``l' = select_block`` keys: ``p_slc[j]`` is the sum of ``p_cmp[i]`` over
   the compressed tokens ``i`` whose range ``[i*d, i*d + l)`` overlaps ``[j*l', (j+1)*l')``,
   summed over the query heads of a GQA group (paper eq. 10: one selection per KV head and
   query token, so a group reads each selected block once). Eligible blocks start at or before
   ``p``. Forced blocks: the first ``num_init_blocks`` blocks and the ``num_local_blocks``
   blocks ending at the query's own block ``p // l'`` (when eligible). The query keeps
   ``num_selected`` blocks in all: the forced ones, then the best-scoring eligible ones
   (fewer when fewer are eligible), and attends their keys causally (``kv <= p``).
3. **Window** (``nsa_window_branch``): keys ``p - window < kv <= p``.

Readings of points the paper leaves open (or prints differently):

* Eq. 9 writes ``p_slc`` as a double sum over shifted indices, which for ``l = 2d``,
  ``l' = 4d`` counts some compressed tokens twice and is offset by ``l'/d - 1`` tokens from the
  overlap it describes in words. We use the words: each compressed token that overlaps the
  selection block counts once (``p_slc = p_cmp @ overlap`` for a 0/1 ``[nC, nKB]``
  matrix).
* ``num_selected`` counts the forced blocks (the paper's ``n = 16`` "including 1 initial block
  and 2 local blocks"); hence ``num_init_blocks + num_local_blocks <= num_selected``.
* Ties between block scores (e.g. all scores 0 when no compressed token is visible yet, or
  probabilities that underflow to 0) are broken toward the lower block index: the selection is
  deterministic and every backend picks the same blocks from the same scores. It is a
  ``torch.topk`` of the ``K``-th largest score plus an index-ordered pick among the entries equal
  to it (:func:`_top_k_lowest_index`), which keeps exactly what a stable descending sort would,
  without sorting all ``nKB`` blocks.
* The selection is discrete and carries no gradient (as in the paper); gradients reach the
  compressed keys/values through the compressed branch only.
* Gates: the paper computes ``g = sigmoid(MLP(x))`` from the layer input. The functional
  method takes constant gates (``gates``, default ``1/3`` each); the ``nn`` module learns them.
  A branch that sees nothing contributes 0; the gates are not renormalised.
* The paper gives each branch its own key/value projections ("to prevent shortcut learning").
  Here the branch functions take ``k``/``v`` explicitly, so a model that wants independent K/V
  per branch projects three times and calls the branch functions; the registered method and
  the ``nn`` module share one ``k``/``v`` across the selected and window branches.
* Queries may be the last ``Tq`` of ``Tk`` positions (``p = i + Tk - Tq``); compressed tokens
  and selection blocks are always indexed from key 0.

Backends: ``reference`` (dense boolean masks, fp32 accumulation: the specification) and
``flex`` (never a ``Tq x Tk`` tensor: the compressed branch and the selection scores are
computed in query chunks of memory ``O(chunk * nC)``, the selected branch runs FlexAttention
with the per-token :class:`~longattn.selection.BlockSelection`, the window branch
FlexAttention with :func:`~longattn.methods.window.select_window`), and ``triton`` (as
``flex`` but with longattn's block-sparse kernels, forward and backward; the compressed
branch and the block scores come from the NSA kernels of :mod:`longattn.kernels.nsa` --
online softmax over the compressed tokens (with its own backward kernels), then the scores
recomputed from its log-sum-exp, never an ``[Tq, nC]`` tensor -- and the per-token top-k
from its ranking kernel :func:`~longattn.kernels.nsa.select_blocks`). All select by the same
rule (:func:`_select_chunk`, which the ranking kernel matches exactly) from fp32 scores, so they
select the same blocks up to the rounding of the scores; the chunking only bounds memory.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..backends import dense_masked_attention, flex_call, flex_can_serve
from ..registry import AttnInputs, Backend, MethodSpec, register
from ..selection import BlockSelection, _ceil_div, causal_mod
from ._common import check_positive_int, check_tileable
from .window import WindowConfig, select_window

Phi = Callable[[Tensor], Tensor]

# NSAConfig.compressed_dtype: the mean's fp32 (fp64 for fp64 inputs), or the dtype of k / v
COMPRESSED_DTYPES = ("float32", "input")
# Elements of one fp32 score chunk [B, H, chunk, max(nC, nKB)] in the chunked scan (64 MiB).
CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class NSAConfig:
    """Paper defaults (Yuan et al., 2025, section 4.1): compression blocks ``l = 32`` with
    stride ``d = 16``, selection blocks ``l' = 64``, ``n = 16`` selected blocks (1 initial + 2
    local among them), a 512-token window. ``gates``: constant branch gates (compressed,
    selected, window) of the parameter-free functional form. ``compressed_dtype``: the dtype
    of the compressed keys and values, ``"float32"`` (fp64 for fp64 inputs; the mean exactly
    as accumulated) or ``"input"`` (rounded to the dtype of ``k`` / ``v``). Every backend,
    the reference included, scores the same tokens, so they select alike either way."""

    compress_block: int = 32
    compress_stride: int = 16
    select_block: int = 64
    num_selected: int = 16
    window: int = 512
    num_init_blocks: int = 1
    num_local_blocks: int = 2
    gates: tuple[float, float, float] = (1 / 3, 1 / 3, 1 / 3)
    compressed_dtype: str = "float32"

    def __post_init__(self) -> None:
        check_positive_int(
            "NSAConfig",
            compress_block=self.compress_block,
            compress_stride=self.compress_stride,
            select_block=self.select_block,
            num_selected=self.num_selected,
            window=self.window,
        )
        for name in ("num_init_blocks", "num_local_blocks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"NSAConfig.{name} must be an int >= 0, got {value!r}")
        l, d, ls = self.compress_block, self.compress_stride, self.select_block
        if l % d != 0:
            raise ValueError(
                f"NSAConfig.compress_block={l} must be a multiple of NSAConfig.compress_stride={d} "
                "(e.g. compress_block=32, compress_stride=16)"
            )
        if ls < 16:
            raise ValueError(f"NSAConfig.select_block={ls} must be >= 16 (16, 32, 64, 128, 256, ...)")
        check_tileable("NSAConfig", select_block=ls)
        if ls % d != 0:
            raise ValueError(
                f"NSAConfig.select_block={ls} must be a multiple of NSAConfig.compress_stride={d} "
                "(e.g. select_block=64, compress_stride=16)"
            )
        if self.num_init_blocks + self.num_local_blocks > self.num_selected:
            raise ValueError(
                f"NSAConfig.num_selected={self.num_selected} must be >= num_init_blocks + "
                f"num_local_blocks = {self.num_init_blocks + self.num_local_blocks} (it counts them)"
            )
        gates = self.gates
        if isinstance(gates, (str, bytes)) or not isinstance(gates, Sequence) or len(gates) != 3:
            raise ValueError(
                f"NSAConfig.gates must be 3 numbers (compressed, selected, window), got {gates!r}"
            )
        for g in gates:
            if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
                raise ValueError(f"NSAConfig.gates must hold finite numbers >= 0, got {gates!r}")
        object.__setattr__(self, "gates", tuple(float(g) for g in gates))
        if self.compressed_dtype not in COMPRESSED_DTYPES:
            raise ValueError(f"NSAConfig.compressed_dtype must be one of {COMPRESSED_DTYPES}, "
                             f"got {self.compressed_dtype!r}")

    def num_compressed(self, kv_len: int) -> int:
        """``nC``: compressed tokens over ``kv_len`` keys."""
        l, d = self.compress_block, self.compress_stride
        return (kv_len - l) // d + 1 if kv_len >= l else 0


# ---------------------------------------------------------------------- compression
def compression_blocks(x: Tensor, config: NSAConfig) -> Tensor:
    """``[B, Hkv, Tk, D] -> [B, Hkv, nC, l, D]``: block ``i`` holds tokens ``[i*d, i*d + l)``
    (a strided view, no copy)."""
    l, d = config.compress_block, config.compress_stride
    B, Hkv, T, D = x.shape
    if T < l:
        return x.new_zeros(B, Hkv, 0, l, D)
    return x.unfold(2, l, d).transpose(-1, -2)  # [B, Hkv, nC, D, l] -> [B, Hkv, nC, l, D]


def _mean_phi(blocks: Tensor) -> Tensor:
    # fp32 (fp64 for fp64) mean over the block; the upcast happens before the sum so the
    # same values give the same bits whatever the input dtype was
    acc = torch.float64 if blocks.dtype == torch.float64 else torch.float32
    return blocks.to(acc).mean(dim=-2)


def nsa_compress(
    k: Tensor, v: Tensor, config: NSAConfig, phi: Phi | tuple[Phi, Phi] | None = None
) -> tuple[Tensor, Tensor]:
    """Compressed keys and values ``[B, Hkv, nC, D]``.

    ``phi`` maps blocks ``[B, Hkv, nC, l, D]`` to ``[B, Hkv, nC, D]``: one callable for both,
    a pair ``(phi_k, phi_v)``, or ``None`` for the mean (accumulated in fp32, fp64 for fp64
    inputs). With ``config.compressed_dtype == "input"`` the results are rounded to ``k``'s and
    ``v``'s dtypes.
    """
    if phi is None:
        phi_k = phi_v = _mean_phi
    elif isinstance(phi, tuple):
        phi_k, phi_v = phi
    else:
        phi_k = phi_v = phi
    k_cmp = phi_k(compression_blocks(k, config))  # [B, Hkv, nC, D]
    v_cmp = phi_v(compression_blocks(v, config))  # [B, Hkv, nC, D]
    if config.compressed_dtype == "input":
        k_cmp, v_cmp = k_cmp.to(k.dtype), v_cmp.to(v.dtype)
    return k_cmp, v_cmp


def compressed_visibility(q_positions: Tensor, num_compressed: int, config: NSAConfig) -> Tensor:
    """``bool [len(q_positions), nC]``: compressed token ``i`` lies wholly at or before the
    query, ``i*d + l - 1 <= p``."""
    i = torch.arange(num_compressed, device=q_positions.device)
    last_key = i * config.compress_stride + config.compress_block - 1
    return last_key[None, :] <= q_positions[:, None]


def block_overlap(num_compressed: int, num_blocks: int, config: NSAConfig, device) -> Tensor:
    """``float32 [nC, nKB]``: 1 where compressed token ``i`` (keys ``[i*d, i*d + l)``) overlaps
    selection block ``j`` (keys ``[j*l', (j+1)*l')``)."""
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    start = torch.arange(num_compressed, device=device)[:, None] * d
    j = torch.arange(num_blocks, device=device)[None, :]
    return ((start < (j + 1) * ls) & (start + l > j * ls)).float()


def overlap_ranges(num_compressed: int, num_blocks: int, config: NSAConfig, device) -> tuple[Tensor, Tensor]:
    """The compressed tokens overlapping each selection block form a contiguous range:
    ``first, count int64 [nKB]`` (same relation as :func:`block_overlap`, without its
    ``[nC, nKB]`` matrix)."""
    l, d, ls = config.compress_block, config.compress_stride, config.select_block
    j = torch.arange(num_blocks, device=device)
    # i*d + l > j*ls  <=>  i >= floor((j*ls - l) / d) + 1 ;  i*d < (j+1)*ls  <=>  i <= ceil((j+1)*ls / d) - 1
    first = torch.clamp(torch.div(j * ls - l, d, rounding_mode="floor") + 1, min=0)
    last = torch.clamp(-torch.div(-(j + 1) * ls, d, rounding_mode="floor") - 1, max=num_compressed - 1)
    return first, torch.clamp(last - first + 1, min=0)


def block_scores(p_cmp: Tensor, first: Tensor, count: Tensor, width: int | None = None) -> Tensor:
    """``p_slc[..., j] = sum of p_cmp[..., i]`` over the compressed tokens overlapping block
    ``j`` (:func:`overlap_ranges`): ``[..., nC] -> [..., nKB]`` in ``O(nKB * width)`` gathers,
    not an ``[nC, nKB]`` matmul. ``width``: an upper bound of ``count`` (saves a host sync)."""
    nC = p_cmp.shape[-1]
    out = p_cmp.new_zeros(*p_cmp.shape[:-1], first.shape[0])
    if nC == 0:
        return out
    if width is None:
        width = int(count.max().item()) if count.numel() else 0
    for t in range(width):
        idx = torch.clamp(first + t, max=nC - 1)
        out += torch.where(t < count, p_cmp[..., idx], 0.0)
    return out


# ---------------------------------------------------------------------- chunked scan
def _masked_softmax(logits: Tensor, visible: Tensor) -> Tensor:
    """Softmax over the visible entries of the last dim; rows without one are 0 (and have
    finite gradients)."""
    if logits.shape[-1] == 0:
        return logits
    logits = logits.masked_fill(~visible, float("-inf"))
    m = logits.detach().amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    e = torch.exp(logits - m)  # 0 where masked
    den = e.sum(dim=-1, keepdim=True)
    return e / torch.where(den > 0, den, torch.ones_like(den))


def _chunk_size(batch: int, heads: int, width: int, q_len: int) -> int:
    return max(1, min(q_len, CHUNK_ELEMENTS // max(1, batch * heads * max(1, width))))


def _scan_chunk(
    qc: Tensor, kc: Tensor, vc: Tensor | None, visible: Tensor, scale: float, acc: torch.dtype, group_sum: bool
) -> tuple[Tensor | None, Tensor | None]:
    """One query chunk: compressed-branch output ``[B, Hkv, G, c, D]`` (when ``vc`` is given)
    and the probabilities summed over each GQA group ``[B, Hkv, c, nC]`` (no gradient)."""
    logits = torch.matmul(qc.to(acc), kc.transpose(-1, -2)) * scale  # [B, Hkv, G, c, nC]
    probs = _masked_softmax(logits, visible)  # [B, Hkv, G, c, nC]
    o = torch.matmul(probs, vc) if vc is not None else None  # [B, Hkv, G, c, D]
    p_grp = probs.detach().sum(dim=2) if group_sum else None  # one selection per GQA group
    return o, p_grp


def _compressed_scan(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor | None,
    config: NSAConfig,
    *,
    kv_len: int,
    scale: float,
    want_selection: bool,
    chunk: int | None = None,
) -> tuple[Tensor | None, BlockSelection | None]:
    """One pass over query chunks computing the compressed-attention probabilities in fp32
    (fp64 for fp64) and, from them, the compressed branch output (when ``v_cmp`` is given)
    and/or the per-token block selection. Memory ``O(B * H * chunk * max(nC, nKB))``."""
    B, H, Tq, D = q.shape
    Hkv = k_cmp.shape[1]
    G = H // Hkv
    nC = k_cmp.shape[2]
    ls = config.select_block
    nKB = _ceil_div(kv_len, ls)
    off = kv_len - Tq
    dev = q.device
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if chunk is None:
        chunk = _chunk_size(B, H, max(nC, nKB), Tq)

    kc = k_cmp.to(acc)[:, :, None]  # [B, Hkv, 1, nC, D]
    vc = v_cmp.to(acc)[:, :, None] if v_cmp is not None else None  # [B, Hkv, 1, nC, D]
    q5 = q.reshape(B, Hkv, G, Tq, D)  # [B, Hkv, G, Tq, D]: query heads of one KV head together
    ranges = overlap_ranges(nC, nKB, config, dev) if want_selection else None
    d = config.compress_stride
    overlap_width = (config.select_block + config.compress_block + d - 1) // d + 1  # >= any count

    # with autograd, each chunk's probabilities are recomputed in backward instead of kept:
    # training memory stays O(chunk * nC), not O(Tq * nC)
    recompute = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k_cmp, v_cmp)
    )
    outs, idx_chunks, cnt_chunks, full_chunks = [], [], [], []
    for c0 in range(0, Tq, chunk):
        c1 = min(Tq, c0 + chunk)
        pos = torch.arange(c0, c1, device=dev) + off  # absolute query positions [c]
        visible = compressed_visibility(pos, nC, config)  # [c, nC]
        qc = q5[:, :, :, c0:c1]  # [B, Hkv, G, c, D]
        if recompute:
            o, p_grp = checkpoint(
                _scan_chunk, qc, kc, vc, visible, scale, acc, want_selection,
                use_reentrant=False, preserve_rng_state=False,
            )
        else:
            o, p_grp = _scan_chunk(qc, kc, vc, visible, scale, acc, want_selection)
        if o is not None:
            outs.append(o.reshape(B, H, c1 - c0, D))
        if not want_selection:
            continue
        with torch.no_grad():
            p_slc = block_scores(p_grp, *ranges, width=overlap_width)  # [B, Hkv, c, nKB]
            top, count, full = _select_chunk(p_slc, pos, config, nKB)
            idx_chunks.append(top)
            cnt_chunks.append(count.expand(B, Hkv, c1 - c0))
            full_chunks.append(full)

    out = torch.cat(outs, dim=2) if vc is not None else None  # [B, H, Tq, D]
    sel = None
    if want_selection:
        sel = _block_selection(
            torch.cat(idx_chunks, dim=2), torch.cat(cnt_chunks, dim=2), torch.cat(full_chunks, dim=2),
            config, kv_len=kv_len, q_len=Tq, num_heads=H,
        )
    return out, sel


def _top_k_lowest_index(ranked: Tensor, k: int) -> Tensor:
    """Indices of the ``k`` largest entries of ``ranked [..., n]`` that are ``> -inf``, ties
    broken toward the lower index (what a stable descending sort keeps), in ascending index
    order; ``[..., k]`` int64, slots past the number of such entries hold arbitrary indices.

    Two ``torch.topk`` calls and a few ``O(n)`` passes instead of a full sort: the ``k``-th
    largest value ``v``, every entry above ``v``, and the lowest-index entries equal to ``v``
    until ``k`` are taken."""
    n = ranked.shape[-1]
    if k == 0:
        return ranked.new_zeros(*ranked.shape[:-1], 0, dtype=torch.int64)
    kth = ranked.topk(k, dim=-1).values[..., -1:]  # [..., 1]
    above = ranked > kth
    tied = ranked == kth
    room = k - above.sum(-1, keepdim=True)
    take = (above | (tied & (tied.cumsum(-1) <= room))) & (ranked > float("-inf"))
    j = torch.arange(n, 0, -1, device=ranked.device, dtype=torch.int32)  # n - index: larger first
    return torch.where(take, j, 0).topk(k, dim=-1).indices  # ascending index among the taken


def _select_chunk(p_slc: Tensor, pos: Tensor, config: NSAConfig, num_blocks: int) -> tuple[Tensor, Tensor, Tensor]:
    """Selection of queries at absolute positions ``pos [c]`` from block scores ``p_slc [B,
    Hkv, c, nKB]``: the forced blocks (initial, local), then the best-scoring eligible blocks,
    ``K = min(num_selected, nKB)`` in all; ties toward the lower block index; a NaN score
    ranks as the lowest float and +-inf as +-FLT_MAX (the scores of a row with an overflow are
    meaningless, but the selection stays well defined and device independent). Returns
    ``kv_indices int32 [B, Hkv, c, K]`` (ascending, unused slots 0), ``kv_num_blocks int32 [c]``
    and ``block_full bool [B, Hkv, c, K]``."""
    ls = config.select_block
    dev = p_slc.device
    K = min(config.num_selected, num_blocks)
    j = torch.arange(num_blocks, device=dev)
    eligible = j[None, :] * ls <= pos[:, None]  # [c, nKB]
    own = (pos // ls)[:, None]  # [c, 1]
    forced = eligible & (
        (j[None, :] < config.num_init_blocks)
        | ((j[None, :] <= own) & (j[None, :] > own - config.num_local_blocks))
    )
    # NaN ranks as the lowest float (and ties with it), +-inf as +-FLT_MAX: an eligible block's
    # score never reaches the forced blocks' +inf nor the ineligible ones' -inf (as the kernel
    # longattn.kernels.nsa.select_blocks does)
    fmax = torch.finfo(p_slc.dtype).max
    scores = torch.nan_to_num(p_slc, nan=-fmax, posinf=fmax, neginf=-fmax)
    ranked = torch.where(forced, float("inf"), torch.where(eligible, scores, float("-inf")))
    top = _top_k_lowest_index(ranked, K)  # [B, Hkv, c, K] ascending
    count = eligible.sum(-1).clamp(max=K)  # [c]
    valid = torch.arange(K, device=dev) < count[:, None]  # [c, K]
    top = torch.where(valid, top, 0)
    full = valid & ((top + 1) * ls - 1 <= pos[:, None])  # block wholly in the past
    return top.to(torch.int32), count.to(torch.int32), full


def _block_selection(
    idx: Tensor, count: Tensor, full: Tensor, config: NSAConfig, *, kv_len: int, q_len: int, num_heads: int
) -> BlockSelection:
    return BlockSelection(
        kv_num_blocks=count.contiguous(),  # [B, Hkv, Tq]
        kv_indices=idx,  # [B, Hkv, Tq, K]
        q_block=1,
        kv_block=config.select_block,
        q_len=q_len,
        kv_len=kv_len,
        num_heads=num_heads,
        causal=True,
        mask_mod=causal_mod(kv_len - q_len),
        block_full=full,  # [B, Hkv, Tq, K]
        validate=False,
    )


def select_from_scores(
    p_slc: Tensor, config: NSAConfig, *, kv_len: int, num_heads: int, chunk: int | None = None
) -> BlockSelection:
    """The per-token :class:`BlockSelection` (as :func:`nsa_selection` builds it) from block
    scores ``p_slc [B, Hkv, Tq, nKB]`` (e.g. :func:`longattn.kernels.nsa.selection_scores`), in
    query chunks of ``chunk`` rows; ties toward the lower block index."""
    B, Hkv, Tq, nKB = p_slc.shape
    if chunk is None:
        chunk = _chunk_size(B, Hkv, nKB, Tq)
    idx, cnt, full = [], [], []
    with torch.no_grad():
        for c0 in range(0, Tq, chunk):
            c1 = min(Tq, c0 + chunk)
            pos = torch.arange(c0, c1, device=p_slc.device) + (kv_len - Tq)
            top, count, f = _select_chunk(p_slc[:, :, c0:c1], pos, config, nKB)
            idx.append(top)
            cnt.append(count.expand(B, Hkv, c1 - c0))
            full.append(f)
    return _block_selection(torch.cat(idx, 2), torch.cat(cnt, 2), torch.cat(full, 2), config,
                            kv_len=kv_len, q_len=Tq, num_heads=num_heads)


def _kernel_unsupported_reason(q: Tensor, k_cmp: Tensor, config: NSAConfig) -> str | None:
    from ..kernels.nsa import compressed_unsupported_reason

    return compressed_unsupported_reason(
        q, k_cmp, compress_block=config.compress_block, compress_stride=config.compress_stride,
        select_block=config.select_block,
    )


def _kernel_compressed(
    q: Tensor, k_cmp: Tensor, v_cmp: Tensor, config: NSAConfig, *, kv_len: int, scale: float
) -> tuple[Tensor, BlockSelection]:
    """``backend="triton"``: the compressed branch (differentiable: its backward runs the NSA
    backward kernels), the selection scores and the per-token top-k (no gradient) from
    longattn's NSA kernels. Returns ``(o_cmp, selection)``. Scores the ranking kernel cannot
    take (more than ``MAX_SELECT_BLOCKS`` selection blocks) are ranked by
    :func:`select_from_scores` (same result, slower)."""
    from ..kernels.nsa import compressed_attention, select_blocks, select_unsupported_reason, selection_scores

    l, d = config.compress_block, config.compress_stride
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=kv_len, compress_block=l, compress_stride=d, scale=scale)
    p_slc = selection_scores(q.detach(), k_cmp.detach(), lse, kv_len=kv_len, compress_block=l, compress_stride=d,
                             select_block=config.select_block, scale=scale)
    if select_unsupported_reason(p_slc) is not None:
        return o_cmp, select_from_scores(p_slc, config, kv_len=kv_len, num_heads=q.shape[1])
    idx, cnt, full = select_blocks(
        p_slc, kv_len=kv_len, select_block=config.select_block, num_selected=config.num_selected,
        num_init_blocks=config.num_init_blocks, num_local_blocks=config.num_local_blocks,
    )
    return o_cmp, _block_selection(idx, cnt, full, config, kv_len=kv_len, q_len=q.shape[2], num_heads=q.shape[1])


# ---------------------------------------------------------------------- branches
def _scale(q: Tensor, scale: float | None) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


def _check_backend(backend: str) -> None:
    if backend not in ("reference", "flex", "triton"):
        raise ValueError(f"backend must be 'reference', 'flex' or 'triton', got {backend!r}")


def _sparse_branch(q: Tensor, k: Tensor, v: Tensor, sel: BlockSelection, scale: float, backend: str) -> Tensor:
    """A selection branch through FlexAttention or longattn's block-sparse kernels."""
    if backend == "triton":
        from ..kernels.block_sparse import block_sparse_attention

        return block_sparse_attention(q, k, v, sel, scale)[0]
    return flex_call(q, k, v, sel.to_block_mask(), scale)[0]


def nsa_compressed_branch(
    q: Tensor,
    k_cmp: Tensor,
    v_cmp: Tensor,
    config: NSAConfig,
    *,
    kv_len: int,
    scale: float | None = None,
    backend: str = "reference",
) -> Tensor:
    """Attention of ``q [B, H, Tq, D]`` over the compressed tokens ``[B, Hkv, nC, D]`` of a
    ``kv_len``-long key sequence; query ``p`` sees token ``i`` iff ``i*d + l - 1 <= p``.
    ``reference``: dense masked softmax; ``flex`` and ``triton``: the chunked scan (plain
    PyTorch, fp32).
    Returns ``[B, H, Tq, D]`` in ``q``'s dtype (0 for a query that sees no token)."""
    _check_backend(backend)
    scale = _scale(q, scale)
    Tq = q.shape[2]
    nC = k_cmp.shape[2]
    if nC == 0:
        return q.new_zeros(q.shape)
    if backend == "reference":
        pos = torch.arange(Tq, device=q.device) + (kv_len - Tq)
        mask = compressed_visibility(pos, nC, config)[None, None]  # [1, 1, Tq, nC]
        inputs = AttnInputs(q=q, k=k_cmp, v=v_cmp, causal=True, scale=scale)
        return dense_masked_attention(inputs, mask)[0]
    out, _ = _compressed_scan(q, k_cmp, v_cmp, config, kv_len=kv_len, scale=scale, want_selection=False)
    return out.to(q.dtype)


def nsa_selection(
    q: Tensor,
    k_cmp: Tensor,
    config: NSAConfig,
    *,
    kv_len: int,
    scale: float | None = None,
    chunk: int | None = None,
) -> BlockSelection:
    """Per-token block selection (``q_block=1``, ``kv_block=select_block``, one selection per
    KV head, causal ``mask_mod``) from the compressed keys ``k_cmp [B, Hkv, nC, D]``. Scores,
    softmax and top-k in fp32 (fp64 for fp64 inputs), computed in query chunks; no gradient."""
    with torch.no_grad():
        _, sel = _compressed_scan(
            q.detach(), k_cmp.detach(), None, config, kv_len=kv_len, scale=_scale(q, scale),
            want_selection=True, chunk=chunk,
        )
    return sel


def nsa_selected_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    selection: BlockSelection,
    *,
    scale: float | None = None,
    backend: str = "reference",
) -> Tensor:
    """Softmax attention over the tokens of the selected blocks (causal). ``reference``:
    dense mask from ``selection.to_dense_mask()``; ``flex``: FlexAttention with
    ``selection.to_block_mask()``; ``triton``: the block-sparse kernels (the query heads of a
    GQA group share the selection and are processed together, loading each block once).
    Returns ``[B, H, Tq, D]`` in ``q``'s dtype."""
    _check_backend(backend)
    scale = _scale(q, scale)
    if backend == "reference":
        inputs = AttnInputs(q=q, k=k, v=v, causal=True, scale=scale)
        return dense_masked_attention(inputs, selection.to_dense_mask())[0]
    return _sparse_branch(q, k, v, selection, scale, backend)


def nsa_window_branch(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    backend: str = "reference",
) -> Tensor:
    """Sliding window: query ``p`` sees keys ``p - window < kv <= p``. Returns
    ``[B, H, Tq, D]`` in ``q``'s dtype."""
    _check_backend(backend)
    scale = _scale(q, scale)
    if backend == "reference":
        Tq, Tk = q.shape[2], k.shape[2]
        p = torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
        kv = torch.arange(Tk, device=q.device)[None, :]
        mask = (kv <= p) & (kv > p - config.window)  # [Tq, Tk]
        inputs = AttnInputs(q=q, k=k, v=v, causal=True, scale=scale)
        return dense_masked_attention(inputs, mask[None, None])[0]
    sel = select_window(q, k, True, WindowConfig(window=config.window))
    return _sparse_branch(q, k, v, sel, scale, backend)


def nsa_combine(
    o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor | Sequence[float]
) -> Tensor:
    """``g_c * o_cmp + g_s * o_slc + g_w * o_win`` accumulated in fp32 (fp64 for fp64).
    ``gates``: three constants, or a tensor ``[B, H, Tq, 3]`` (last dim: compressed, selected,
    window). Returns ``[B, H, Tq, D]`` in ``o_slc``'s dtype."""
    dtype = o_slc.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    if isinstance(gates, Tensor):
        g = gates.to(acc).unbind(-1)
        g = [x[..., None] for x in g]  # each [B, H, Tq, 1]
    else:
        g = list(gates)
    out = g[0] * o_cmp.to(acc) + g[1] * o_slc.to(acc) + g[2] * o_win.to(acc)
    return out.to(dtype)


# ---------------------------------------------------------------------- whole method
def _triton_kernels_serve(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, config: NSAConfig) -> bool:
    """Whether ``backend="triton"`` runs the compressed branch (forward and backward) and the
    selection scores with the NSA kernels; inputs the kernels cannot take fall back to the
    chunked PyTorch scan with a ``RuntimeWarning``."""
    reason = _kernel_unsupported_reason(q, k_cmp, config)
    if reason:
        warnings.warn(f"NSA kernels cannot serve these inputs ({reason}); the compressed branch and the "
                      "selection fall back to the chunked PyTorch scan", RuntimeWarning, stacklevel=3)
        return False
    return True


def nsa_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    config: NSAConfig,
    *,
    scale: float | None = None,
    backend: str = "reference",
    phi: Phi | tuple[Phi, Phi] | None = None,
    gates: Tensor | Sequence[float] | None = None,
) -> Tensor:
    """All three branches and the gated sum for causal ``q [B, H, Tq, D]`` over
    ``k, v [B, Hkv, Tk, D]`` (inputs are not validated here; see ``longattn.attention``).

    ``phi``: compression function(s) (default: mean); ``gates``: constants or a
    ``[B, H, Tq, 3]`` tensor (default: ``config.gates``). Returns ``[B, H, Tq, D]``."""
    _check_backend(backend)
    scale = _scale(q, scale)
    Tk = k.shape[2]
    gates = config.gates if gates is None else gates
    k_cmp, v_cmp = nsa_compress(k, v, config, phi)
    if backend == "reference":
        o_cmp = nsa_compressed_branch(q, k_cmp, v_cmp, config, kv_len=Tk, scale=scale, backend="reference")
        sel = nsa_selection(q, k_cmp, config, kv_len=Tk, scale=scale)
    elif backend == "triton" and _triton_kernels_serve(q, k_cmp, v_cmp, config):
        o_cmp, sel = _kernel_compressed(q, k_cmp, v_cmp, config, kv_len=Tk, scale=scale)
    else:
        # one chunked pass: compressed output (with gradient) and selection (without)
        o_cmp, sel = _compressed_scan(
            q, k_cmp, v_cmp if k_cmp.shape[2] > 0 else None, config, kv_len=Tk, scale=scale, want_selection=True
        )
        o_cmp = q.new_zeros(q.shape) if o_cmp is None else o_cmp
    o_slc = nsa_selected_branch(q, k, v, sel, scale=scale, backend=backend)
    o_win = nsa_window_branch(q, k, v, config, scale=scale, backend=backend)
    if backend == "triton":
        from ..kernels.nsa.combine import combine_branches, combine_unsupported_reason

        if combine_unsupported_reason(o_cmp, o_slc, o_win, gates) is None:
            return combine_branches(o_cmp, o_slc, o_win, gates)  # nsa_combine's arithmetic, one pass
    return nsa_combine(o_cmp, o_slc, o_win, gates)


def nsa_density(q: Tensor, k: Tensor, causal: bool, config: NSAConfig) -> float:
    """Score pairs NSA computes, over the pairs of full causal attention: compressed tokens
    seen, selected-block keys (parameter-free selection, averaged over batch and KV heads) and
    window keys, each branch counted (a key read by two branches counts twice)."""
    Tq, Tk = q.shape[2], k.shape[2]
    pos = torch.arange(Tq, device=q.device, dtype=torch.float64) + (Tk - Tq)
    l, d = config.compress_block, config.compress_stride
    n_cmp = torch.clamp(torch.floor((pos - l + 1) / d) + 1, min=0, max=config.num_compressed(Tk))
    n_win = torch.clamp(pos + 1, max=config.window)
    k_cmp, _ = nsa_compress(k, k, config)
    selected = nsa_selection(q, k_cmp, config, kv_len=Tk).kept_pairs().double().mean()
    full = (pos + 1).sum()
    return float((n_cmp.sum() + n_win.sum() + selected) / full)


def nsa_reference(inputs: AttnInputs, config: NSAConfig) -> tuple[Tensor, None]:
    """Dense-mask reference (the specification); returns ``(out, None)`` (no single LSE)."""
    return nsa_forward(inputs.q, inputs.k, inputs.v, config, scale=inputs.scale, backend="reference"), None


def nsa_flex(inputs: AttnInputs, config: NSAConfig) -> tuple[Tensor, None]:
    """Chunked compressed branch + FlexAttention for the selected and window branches."""
    return nsa_forward(inputs.q, inputs.k, inputs.v, config, scale=inputs.scale, backend="flex"), None


def nsa_triton(inputs: AttnInputs, config: NSAConfig) -> tuple[Tensor, None]:
    """Chunked compressed branch + longattn's block-sparse kernels for the selected and window
    branches."""
    return nsa_forward(inputs.q, inputs.k, inputs.v, config, scale=inputs.scale, backend="triton"), None


def _nsa_triton_can_serve(inputs: AttnInputs, config: NSAConfig) -> str | None:
    from ..backends.triton import triton_can_serve

    reason = triton_can_serve(inputs, config)
    if reason is None and config.select_block % 16:
        reason = f"the Triton kernels need select_block to be a multiple of 16, got {config.select_block}"
    return reason


register(
    MethodSpec(
        name="nsa",
        family="sparse/trainable",
        paper="Native Sparse Attention: Hardware-Aligned and Natively Trainable Sparse Attention (Yuan et al., 2025)",
        summary="gated sum of compressed-token, selected-block (shared per GQA group) and sliding-window attention",
        config_cls=NSAConfig,
        reference=nsa_reference,  # type: ignore[arg-type]
        backends={  # type: ignore[arg-type]
            "flex": Backend(nsa_flex, flex_can_serve),
            "triton": Backend(nsa_triton, _nsa_triton_can_serve),
        },
        bidirectional=False,
        needs_finite=True,
        has_lse=False,
        density=nsa_density,
    )
)


__all__ = [
    "NSAConfig",
    "compression_blocks",
    "compressed_visibility",
    "block_overlap",
    "block_scores",
    "overlap_ranges",
    "nsa_compress",
    "nsa_compressed_branch",
    "nsa_selection",
    "nsa_selected_branch",
    "nsa_window_branch",
    "nsa_combine",
    "nsa_forward",
    "nsa_density",
    "nsa_reference",
    "nsa_flex",
    "nsa_triton",
]
