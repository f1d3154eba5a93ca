"""BlockSelection: the portable layout of block-sparse attention.

A sparse method decides, for every ``(batch, head, query block)``, which key blocks a query
may read. :class:`BlockSelection` holds that decision once and converts it to what each
backend consumes:

* :meth:`BlockSelection.to_dense_mask` -- a ``[B, Hs, Tq, Tk]`` boolean mask for the dense
  reference (the specification; it materialises ``Tq x Tk`` on purpose);
* :meth:`BlockSelection.to_block_mask` -- a FlexAttention ``BlockMask`` whose size is
  ``O(T^2 / tile^2)`` blocks, never ``O(T^2)`` tokens;
* :meth:`BlockSelection.density` -- the fraction of the pairs full attention would compute
  that the selection keeps.

Token positions: queries are the *last* ``q_len`` positions of a ``kv_len``-long sequence
(chunked prefill / decoding), so query ``i`` sits at absolute position
``i + (kv_len - q_len)``. Query blocks tile the ``q_len`` local positions.

``mask_mod(b, h, q_idx, kv_idx) -> bool`` refines the selected blocks to tokens. It is called
with broadcastable integer tensors (local ``q_idx``, absolute ``kv_idx``, ``h`` indexing the
selection's head axis) and must only use element-wise tensor operations, so the same
function serves the dense reference, the density count and FlexAttention's compiled kernel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]

# FlexAttention's native tile. Selections with other block sizes are re-tiled to it (exactly:
# finer blocks are enforced token by token through a block-bitmap lookup in the mask_mod).
FLEX_TILE = 128


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, eq=False)
class BlockSelection:
    """Which key blocks each query block attends to.

    Attributes:
        kv_num_blocks: ``int32 [B, Hs, nQB]`` -- number of selected key blocks per query block.
        kv_indices: ``int32 [B, Hs, nQB, K]`` -- the first ``kv_num_blocks`` entries of each row
            are the selected key-block indices (distinct, in ``[0, nKB)``); the rest are ignored.
        q_block: query-block size in tokens.
        kv_block: key-block size in tokens.
        q_len: number of queries ``Tq``.
        kv_len: number of keys ``Tk`` (``Tk >= Tq``; queries sit at the end).
        num_heads: number of query heads ``H``; ``Hs`` must be 1, a divisor of ``H`` (one
            selection shared by each group of ``H // Hs`` consecutive query heads, e.g. a GQA
            group) or ``H``.
        causal: whether the pattern this selection sparsifies is causal (used for density).
        mask_mod: optional token-level predicate applied inside selected blocks.
        block_full: optional ``bool [B, Hs, nQB, K]`` hint: True where ``mask_mod`` is known to
            hold for every token pair of that selected block (lets kernels skip the mask).
        validate: check every invariant on construction (one host sync).
    """

    kv_num_blocks: Tensor
    kv_indices: Tensor
    q_block: int
    kv_block: int
    q_len: int
    kv_len: int
    num_heads: int
    causal: bool = True
    mask_mod: MaskMod | None = None
    block_full: Tensor | None = None
    validate: bool = True

    def __post_init__(self) -> None:
        for name in ("q_block", "kv_block", "q_len", "kv_len", "num_heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"BlockSelection.{name} must be a positive int, got {value!r}")
        if self.q_len > self.kv_len:
            raise ValueError(
                f"BlockSelection.q_len ({self.q_len}) must be <= kv_len ({self.kv_len}): "
                "queries are the last q_len positions of the sequence"
            )
        if self.kv_num_blocks.dim() != 3:
            raise ValueError(
                f"BlockSelection.kv_num_blocks must be [B, Hs, nQB], got shape {tuple(self.kv_num_blocks.shape)}"
            )
        if self.kv_indices.dim() != 4 or self.kv_indices.shape[:3] != self.kv_num_blocks.shape:
            raise ValueError(
                "BlockSelection.kv_indices must be [B, Hs, nQB, K] with the leading dims of "
                f"kv_num_blocks {tuple(self.kv_num_blocks.shape)}, got {tuple(self.kv_indices.shape)}"
            )
        for name in ("kv_num_blocks", "kv_indices"):
            t = getattr(self, name)
            if t.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"BlockSelection.{name} must be int32 or int64, got {t.dtype}")
        if self.kv_indices.device != self.kv_num_blocks.device:
            raise ValueError("BlockSelection.kv_indices and kv_num_blocks must be on one device")
        B, Hs, nqb = self.kv_num_blocks.shape
        if nqb != self.num_q_blocks:
            raise ValueError(
                f"BlockSelection has {nqb} query blocks but q_len={self.q_len} with "
                f"q_block={self.q_block} needs {self.num_q_blocks}"
            )
        if Hs not in (1, self.num_heads) and self.num_heads % Hs != 0:
            raise ValueError(
                f"BlockSelection head axis has {Hs} entries; allowed: 1, a divisor of num_heads, "
                f"or num_heads={self.num_heads}"
            )
        if self.kv_indices.shape[-1] > self.num_kv_blocks:
            raise ValueError(
                f"BlockSelection.kv_indices has width {self.kv_indices.shape[-1]} > number of key "
                f"blocks {self.num_kv_blocks}"
            )
        if self.block_full is not None:
            if self.block_full.shape != self.kv_indices.shape or self.block_full.dtype != torch.bool:
                raise ValueError("BlockSelection.block_full must be a bool tensor shaped like kv_indices")
        if self.validate:
            self._check_values()

    # ------------------------------------------------------------------ properties
    @property
    def num_q_blocks(self) -> int:
        return _ceil_div(self.q_len, self.q_block)

    @property
    def num_kv_blocks(self) -> int:
        return _ceil_div(self.kv_len, self.kv_block)

    @property
    def q_offset(self) -> int:
        """Absolute position of local query 0."""
        return self.kv_len - self.q_len

    @property
    def heads_per_selection(self) -> int:
        return self.num_heads // self.kv_num_blocks.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv_indices.device

    def _check_values(self) -> None:
        K = self.kv_indices.shape[-1]
        counts = self.kv_num_blocks.long()
        bad_count = (counts < 0) | (counts > K)
        valid = torch.arange(K, device=self.device) < counts[..., None]  # [B, Hs, nQB, K]
        idx = self.kv_indices.long()
        bad_idx = valid & ((idx < 0) | (idx >= self.num_kv_blocks))
        # distinct: after sorting the valid entries, no two neighbours are equal
        keyed = torch.where(valid, idx, self.num_kv_blocks + torch.arange(K, device=self.device))
        srt = keyed.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] < self.num_kv_blocks)
        flags = torch.stack([bad_count.any(), bad_idx.any(), dup.any()]).tolist()
        if flags[0]:
            raise ValueError(f"BlockSelection.kv_num_blocks must lie in [0, {K}]")
        if flags[1]:
            raise ValueError(f"BlockSelection.kv_indices must lie in [0, {self.num_kv_blocks})")
        if flags[2]:
            raise ValueError("BlockSelection.kv_indices repeats a key block within one row")

    # ------------------------------------------------------------------ block bitmaps
    def block_bitmap(self, full_only: bool = False) -> Tensor:
        """``bool [B, Hs, nQB, nKB]``: True where a key block is selected (and, with
        ``full_only``, marked full)."""
        B, Hs, nqb, K = self.kv_indices.shape
        valid = torch.arange(K, device=self.device) < self.kv_num_blocks[..., None].long()
        if full_only:
            if self.block_full is None:
                return torch.zeros(B, Hs, nqb, self.num_kv_blocks, dtype=torch.bool, device=self.device)
            valid = valid & self.block_full
        # scatter into one spare column so invalid entries land outside the result
        target = torch.where(valid, self.kv_indices.long(), self.num_kv_blocks)
        bitmap = torch.zeros(B, Hs, nqb, self.num_kv_blocks + 1, dtype=torch.bool, device=self.device)
        bitmap.scatter_(-1, target, True)
        return bitmap[..., : self.num_kv_blocks]

    @classmethod
    def from_bitmap(
        cls,
        bitmap: Tensor,
        *,
        q_block: int,
        kv_block: int,
        q_len: int,
        kv_len: int,
        num_heads: int,
        causal: bool = True,
        mask_mod: MaskMod | None = None,
        full_bitmap: Tensor | None = None,
        validate: bool = True,
    ) -> "BlockSelection":
        """Build a selection from a ``bool [B, Hs, nQB, nKB]`` block bitmap (full width)."""
        counts, order = _counts_and_order(bitmap)
        block_full = None
        if full_bitmap is not None:
            block_full = torch.gather(full_bitmap & bitmap, -1, order.long())
        return cls(
            kv_num_blocks=counts,
            kv_indices=order,
            q_block=q_block,
            kv_block=kv_block,
            q_len=q_len,
            kv_len=kv_len,
            num_heads=num_heads,
            causal=causal,
            mask_mod=mask_mod,
            block_full=block_full,
            validate=validate,
        )

    # ------------------------------------------------------------------ dense view
    def to_dense_mask(self) -> Tensor:
        """``bool [B, Hs, Tq, Tk]`` -- the exact token mask (materialises Tq x Tk)."""
        bitmap = self.block_bitmap()
        tok = bitmap.repeat_interleave(self.q_block, dim=2)[:, :, : self.q_len]
        tok = tok.repeat_interleave(self.kv_block, dim=3)[..., : self.kv_len]  # [B, Hs, Tq, Tk]
        if self.mask_mod is not None:
            B, Hs = tok.shape[:2]
            dev = self.device
            b = torch.arange(B, device=dev).view(B, 1, 1, 1)
            h = torch.arange(Hs, device=dev).view(1, Hs, 1, 1)
            qi = torch.arange(self.q_len, device=dev).view(1, 1, -1, 1)
            ki = torch.arange(self.kv_len, device=dev).view(1, 1, 1, -1)
            tok = tok & self.mask_mod(b, h, qi, ki).expand_as(tok)
        return tok

    # ------------------------------------------------------------------ density
    def reference_pairs(self) -> int:
        """Number of (query, key) pairs full attention computes (per batch and head)."""
        if not self.causal:
            return self.q_len * self.kv_len
        off = self.q_offset
        # query i sees keys 0..i+off  ->  sum_{i<Tq} (i + off + 1)
        return self.q_len * (off + 1) + self.q_len * (self.q_len - 1) // 2

    def kept_pairs(self, max_block_chunk: int = 4096) -> Tensor:
        """``int64 [B, Hs]`` -- pairs kept by the selection, counted without a Tq x Tk tensor:
        full blocks by area, other blocks by evaluating ``mask_mod`` block by block."""
        B, Hs, nqb, K = self.kv_indices.shape
        dev = self.device
        valid = torch.arange(K, device=dev) < self.kv_num_blocks[..., None].long()
        qb = torch.arange(nqb, device=dev).view(1, 1, nqb, 1).expand(B, Hs, nqb, K)
        kb = self.kv_indices.long()
        q_rows = (torch.clamp(self.q_len - qb * self.q_block, max=self.q_block)).clamp(min=0)
        k_cols = (torch.clamp(self.kv_len - kb * self.kv_block, max=self.kv_block)).clamp(min=0)
        full = valid if self.mask_mod is None else valid & (
            self.block_full if self.block_full is not None else torch.zeros_like(valid)
        )
        total = torch.where(full, q_rows * k_cols, 0).sum(dim=(-1, -2))  # [B, Hs]
        if self.mask_mod is None:
            return total
        partial = valid & ~full
        bi, hi, qbi, ki = partial.nonzero(as_tuple=True)
        kbi = kb[bi, hi, qbi, ki]
        qoff = torch.arange(self.q_block, device=dev)
        koff = torch.arange(self.kv_block, device=dev)
        for s in range(0, bi.numel(), max_block_chunk):
            sl = slice(s, s + max_block_chunk)
            qpos = qbi[sl, None, None] * self.q_block + qoff[None, :, None]  # [n, qb, 1]
            kpos = kbi[sl, None, None] * self.kv_block + koff[None, None, :]  # [n, 1, kb]
            inside = (qpos < self.q_len) & (kpos < self.kv_len)
            keep = self.mask_mod(bi[sl, None, None], hi[sl, None, None], qpos, kpos) & inside
            counts = keep.flatten(1).sum(-1)
            total.index_put_((bi[sl], hi[sl]), counts, accumulate=True)
        return total

    def density(self) -> float:
        """Kept pairs over the pairs full attention (with the same causality) computes,
        averaged over batch and selection heads."""
        return float(self.kept_pairs().double().mean().item() / self.reference_pairs())

    # ------------------------------------------------------------------ FlexAttention
    def to_block_mask(self, tile: int = FLEX_TILE):
        """FlexAttention ``BlockMask`` with ``tile x tile`` blocks and ``num_heads`` heads
        (or 1 when the selection is shared by all heads).

        Block sizes that are multiples of ``tile`` are split exactly; finer blocks are merged
        into the tile and enforced token by token through a bitmap lookup (memory
        ``O(Tq * Tk / (q_block * kv_block))`` bits-as-bytes, never ``O(Tq * Tk)``).
        """
        from torch.nn.attention.flex_attention import BlockMask

        for name, bs in (("q_block", self.q_block), ("kv_block", self.kv_block)):
            if bs % tile != 0 and tile % bs != 0:
                raise ValueError(
                    f"BlockSelection.{name}={bs} cannot be tiled for FlexAttention: it must divide "
                    f"or be a multiple of {tile}"
                )
        bitmap = self.block_bitmap()  # [B, Hs, nQB, nKB]
        fullmap = self.block_bitmap(full_only=True) if self.mask_mod is not None else bitmap
        n_qt = _ceil_div(self.q_len, tile)
        n_kt = _ceil_div(self.kv_len, tile)
        sel_t = _retile(bitmap, self.q_block, self.kv_block, tile, n_qt, n_kt, reduce="any")
        full_t = _retile(fullmap, self.q_block, self.kv_block, tile, n_qt, n_kt, reduce="all")
        needs_lookup = self.q_block < tile or self.kv_block < tile

        Hs = bitmap.shape[1]
        group = self.num_heads // Hs
        if Hs not in (1, self.num_heads):
            sel_t = sel_t.repeat_interleave(group, dim=1)
            full_t = full_t.repeat_interleave(group, dim=1)
        full_t = full_t & sel_t
        partial_t = sel_t & ~full_t

        kv_num, kv_idx = _counts_and_order(partial_t)
        full_num, full_idx = _counts_and_order(full_t)
        mask_mod = _flex_mask_mod(
            self.mask_mod,
            bitmap if needs_lookup else None,
            self.q_block,
            self.kv_block,
            group if Hs != 1 else None,
        )
        return BlockMask.from_kv_blocks(
            kv_num,
            kv_idx,
            full_num,
            full_idx,
            BLOCK_SIZE=tile,
            mask_mod=mask_mod,
            seq_lengths=(self.q_len, self.kv_len),
        )


def _counts_and_order(bitmap: Tensor) -> tuple[Tensor, Tensor]:
    """``bool [..., n]`` -> (``int32 [...]`` count of True, ``int32 [..., n]`` full-width
    indices with the True positions first, ascending): the layout of ``kv_num_blocks`` /
    ``kv_indices`` that FlexAttention's ``from_kv_blocks`` wants."""
    counts = bitmap.sum(-1, dtype=torch.int32)
    order = torch.argsort((~bitmap).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    return counts, order


def _retile(m: Tensor, qb: int, kb: int, tile: int, n_qt: int, n_kt: int, reduce: str) -> Tensor:
    """Map a ``[B, Hs, nQB, nKB]`` block bitmap to a ``[B, Hs, n_qt, n_kt]`` tile bitmap."""

    def along(x: Tensor, dim: int, bs: int, n_out: int) -> Tensor:
        if bs >= tile:  # each block spans bs // tile tiles
            x = x.repeat_interleave(bs // tile, dim=dim)
            return x.narrow(dim, 0, n_out) if x.shape[dim] >= n_out else _pad(x, dim, n_out, False)
        per = tile // bs  # tiles merge `per` blocks
        x = _pad(x, dim, n_out * per, reduce == "all")
        shape = list(x.shape)
        shape[dim : dim + 1] = [n_out, per]
        x = x.reshape(shape)
        return x.any(dim=dim + 1) if reduce == "any" else x.all(dim=dim + 1)

    m = along(m, 2, qb, n_qt)
    return along(m, 3, kb, n_kt)


def _pad(x: Tensor, dim: int, n: int, value: bool) -> Tensor:
    if x.shape[dim] >= n:
        return x.narrow(dim, 0, n)
    shape = list(x.shape)
    shape[dim] = n - x.shape[dim]
    return torch.cat([x, torch.full(shape, value, dtype=x.dtype, device=x.device)], dim=dim)


def _flex_mask_mod(
    token_mod: MaskMod | None,
    bitmap: Tensor | None,
    q_block: int,
    kv_block: int,
    group: int | None,
) -> MaskMod | None:
    """Compose the FlexAttention mask_mod: query head -> selection head, then the fine-block
    lookup (when blocks are finer than the tile) and the token predicate."""
    if token_mod is None and bitmap is None:
        return None

    def mask_mod(b, h, q_idx, kv_idx):
        hs = h // group if group is not None else torch.zeros_like(h)
        keep = q_idx >= 0
        if bitmap is not None:
            bb = b if bitmap.shape[0] > 1 else torch.zeros_like(b)
            keep = keep & bitmap[bb, hs, q_idx // q_block, kv_idx // kv_block]
        if token_mod is not None:
            keep = keep & token_mod(b, hs, q_idx, kv_idx)
        return keep

    return mask_mod


# ---------------------------------------------------------------------- token predicates
@dataclass(frozen=True)
class TokenRule:
    """The token predicate of a band-shaped pattern, as data: local query ``i`` (absolute
    position ``p = i + q_offset``) may read key ``j`` when ``j <= p`` (if ``causal``) and, with a
    ``window``, ``p - j < window`` (and ``j - p < window`` when not causal) or ``j < sink``.
    Own kernels read these fields instead of calling the Python predicate built from them."""

    q_offset: int
    causal: bool
    window: int | None = None
    sink: int = 0


def band_mod(q_offset: int, causal: bool, window: int | None = None, sink: int = 0) -> MaskMod:
    """Token predicate of :class:`TokenRule` ``(q_offset, causal, window, sink)``; the returned
    function carries the rule as its ``rule`` attribute."""
    rule = TokenRule(q_offset, causal, window, sink)

    def mod(b, h, q_idx, kv_idx):
        p = q_idx + q_offset
        keep = kv_idx <= p if causal else kv_idx >= 0
        if window is not None:
            near = (p - kv_idx < window) if causal else ((p - kv_idx < window) & (kv_idx - p < window))
            if sink > 0:
                near = near | (kv_idx < sink)
            keep = keep & near
        return keep

    mod.rule = rule
    return mod


def causal_mod(q_offset: int) -> MaskMod:
    """Key at absolute position ``kv_idx`` is visible to local query ``q_idx``."""
    return band_mod(q_offset, True)


def token_rule_of(mask_mod: MaskMod | None) -> TokenRule | None:
    """The :class:`TokenRule` behind a predicate made by :func:`band_mod` / :func:`causal_mod`
    (``None`` for no predicate or one without a rule)."""
    return None if mask_mod is None else getattr(mask_mod, "rule", None)


__all__ = [
    "BlockSelection",
    "MaskMod",
    "FLEX_TILE",
    "TokenRule",
    "band_mod",
    "causal_mod",
    "token_rule_of",
]
