"""The KV cache that runs a policy inside a ``transformers`` model.

:class:`KVCache` is a ``transformers.Cache`` whose layers (:class:`KVLayer`) store only what
their policy keeps, and compute the attention over it themselves.

**Storage.** A layer's KV heads are split into *segments*: sets of heads that keep the same
number of entries. Each segment holds ``keys``/``values`` ``[B, h, n, D]`` and ``pos``
``int64 [B, h, n]`` (the token index of each entry), in increasing token order. Most policies
have one segment with every KV head; DuoAttention has two (retrieval heads, full length, and
streaming heads, bounded), so heads that keep different numbers of tokens live in tensors of
different lengths, never in a padded tensor with a mask. Evicted entries are dropped: the
segment's tensors are replaced by smaller ones holding only the kept entries, and the old
ones are released. :meth:`KVCache.kv_bytes` sums ``numel * element_size`` of every stored
key and value; :meth:`KVCache.full_kv_bytes` is what a full cache of the same tokens holds.

**Positions.** Keys are cached after RoPE, as transformers caches them, so an entry keeps the
position it was encoded at: eviction never re-positions the kept keys. The cache counts every
token it was given: ``get_seq_length()`` is the true number of tokens seen (not the number
kept), so ``generate()`` and the model give each new token its true position, and
``get_mask_sizes()`` sizes the model's mask over all token indices ``[0, seen)``. The layer
reads the mask at the token indices of the entries it kept (``pos``), so padding and
sliding-window masks stay exact. (With left-padded batches the first entries of a row are
padding: StreamingLLM's "sinks" then are those padded slots; use unpadded batches with
sink-based policies.)

**How the query reaches the policy.** transformers calls ``cache.update(k, v, layer_idx)``
inside the attention module and hands the returned keys/values to the attention function
(the cache itself is *not* passed to attention functions in transformers 5.17 and 5.24).
:meth:`KVLayer.update` therefore returns a key tensor tagged with the layer that made it
(the attribute :data:`TAG`); ``longattn.hf``'s attention function (``"longattn"``, which
:func:`longattn.kv.make_cache` switches the model to) sees the tag and calls
:meth:`KVLayer.attend` with the query. ``attend`` computes exact softmax attention over the
entries the policy reads, gathers the probabilities the policy needs (H2O's column sums,
Recycled Attention's last-row probabilities), and then evicts. A cache whose keys were not
attended through this path refuses the next ``update`` with a clear error instead of
computing something else.

Order inside one forward of ``Tq`` new tokens: append them (token indices
``seen .. seen+Tq-1``); attend (causal by token index, intersected with the model's mask);
evict down to the policy's budget. So a prefill attends to the whole prompt exactly, and a
decoding query attends to the kept entries plus its own key; the cache holds at most the
budget between forwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import Cache
from transformers.cache_utils import CacheLayerMixin

if TYPE_CHECKING:  # pragma: no cover
    from .base import KVPolicy, ModelShape

#: attribute set on the key tensor that :meth:`KVLayer.update` returns: the layer itself
TAG = "_longattn_kv_layer"

# elements of one [B, h, G, chunk, n] score block in the explicit attention (fp32: 64 MiB)
_CHUNK_ELEMS = 1 << 24


# ------------------------------------------------------------------------------ attention
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def exact_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_slots: Tensor | None,
    query_slots: Tensor,
    scale: float,
    allowed: Tensor | None = None,
    reduce: str | None = None,
    chunk_elems: int = _CHUNK_ELEMS,
) -> tuple[Tensor, Tensor | None]:
    """Exact softmax attention of ``q`` over the given entries, causal by token index.

    Args:
        q: ``[B, h*G, Tq, D]``, the query heads of ``h`` KV heads (GQA groups of ``G``
            consecutive heads).
        k, v: ``[B, h, n, D]``.
        key_slots: ``int64 [B, h, n]`` token index of each entry, or ``None`` when the
            entries are exactly tokens ``0..n-1`` in order (a fresh prefill).
        query_slots: ``int64 [Tq]`` token index of each query. Query ``i`` reads entry ``j``
            when ``key_slots[j] <= query_slots[i]`` and the model's mask allows it.
        scale: score scale.
        allowed: ``bool [B|1, Tq, L]``: the model's mask over token indices ``0..L-1``
            (``L`` > every slot), or ``None`` (causal only).
        reduce: ``None``; ``"colsum"``: also return ``float32 [B, h, n]``, each entry's
            attention probability summed over the ``G`` heads of its group and over the
            ``Tq`` queries (H2O's accumulated attention); ``"lastrow"``: the probabilities
            of the last query, summed over the group (Recycled Attention's pattern).

    Returns ``(out [B, h*G, Tq, D] in q's dtype, reduced or None)``. Scores and softmax are
    computed in fp32 (fp64 for fp64 inputs) over chunks of queries, so memory is
    ``O(B * h * G * chunk * n)``, never ``Tq x n`` for all heads at once. A query that may
    read no entry (a padding row) gets a zero output and contributes no probability. A
    fresh prefill that needs no probabilities goes through SDPA with the model's mask.
    """
    B, HG, Tq, D = q.shape
    h, n = k.shape[1], k.shape[2]
    G = HG // h
    if reduce is None and key_slots is None and Tq == n:
        mask = None if allowed is None else allowed[:, None, :, :n]  # [B|1, 1, Tq, n]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=G > 1
        )
        return out, None

    acc = _acc_dtype(q.dtype)
    kt = k.to(acc).transpose(-1, -2)  # [B, h, D, n]
    vf = v.to(acc)  # [B, h, n, D]
    qg = q.view(B, h, G, Tq, D)
    slots = key_slots if key_slots is not None else torch.arange(n, device=q.device).expand(B, h, n)
    chunk = max(1, chunk_elems // max(1, B * h * G * n))
    out = q.new_empty(B, h, G, Tq, D)
    red = None
    if reduce == "colsum":
        red = torch.zeros(B, h, n, dtype=torch.float32, device=q.device)
    for i0 in range(0, Tq, chunk):
        i1 = min(Tq, i0 + chunk)
        c = i1 - i0
        qc = qg[:, :, :, i0:i1].to(acc).reshape(B, h, G * c, D)
        scores = torch.matmul(qc, kt).mul_(scale).view(B, h, G, c, n)
        ok = slots[:, :, None, :] <= query_slots[i0:i1][None, None, :, None]  # [B, h, c, n]
        if allowed is not None:
            a = allowed[:, i0:i1].expand(B, c, allowed.shape[-1])  # [B, c, L]
            idx = slots[:, :, None, :].expand(B, h, c, n)
            ok = ok & a[:, None].expand(B, h, c, a.shape[-1]).gather(3, idx)
        scores = scores.masked_fill(~ok[:, :, None], float("-inf"))
        top = scores.amax(-1, keepdim=True)
        top = torch.where(torch.isfinite(top), top, torch.zeros((), dtype=acc, device=q.device))
        p = torch.exp(scores - top)  # rows without a readable entry are all 0
        p = p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(acc).tiny)
        o = torch.matmul(p.view(B, h, G * c, n), vf).view(B, h, G, c, D)
        out[:, :, :, i0:i1] = o.to(q.dtype)
        if reduce == "colsum":
            red += p.sum(dim=(2, 3)).float()
        elif reduce == "lastrow" and i1 == Tq:
            red = p[:, :, :, -1, :].sum(2).float()
    return out.view(B, HG, Tq, D), red


# ------------------------------------------------------------------------------ storage
def take_heads(x: Tensor, heads: tuple[int, ...]) -> Tensor:
    """``x[:, heads]`` (a view when ``heads`` is a contiguous range)."""
    if heads == tuple(range(heads[0], heads[0] + len(heads))):
        return x[:, heads[0] : heads[0] + len(heads)]
    return x[:, list(heads)]


class Segment:
    """The entries kept by the KV heads ``heads`` of one layer (all keep the same count).

    ``keys``/``values`` ``[B, h, n, D]``, ``pos`` ``int64 [B, h, n]`` (token indices,
    increasing along ``n``), ``score`` ``float32 [B, h, n]`` (only when ``track_score``: H2O's
    accumulated attention), ``rule`` ``(sinks, window)`` for a StreamingLLM segment or
    ``None`` for one that keeps everything."""

    def __init__(self, heads: Sequence[int], rule: tuple[int, int] | None = None, track_score: bool = False):
        self.heads = tuple(int(h) for h in heads)
        self.rule = rule
        self.track_score = track_score
        self.keys: Tensor | None = None
        self.values: Tensor | None = None
        self.pos: Tensor | None = None
        self.score: Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def query_heads(self, group: int) -> slice | list[int]:
        """The query heads that read this segment's KV heads."""
        hs = self.heads
        if hs == tuple(range(hs[0], hs[0] + len(hs))):
            return slice(hs[0] * group, (hs[0] + len(hs)) * group)
        return [kv * group + g for kv in hs for g in range(group)]

    def append(self, k: Tensor, v: Tensor, pos: Tensor) -> None:
        """Add ``k``/``v`` ``[B, h, T, D]`` at token indices ``pos [T]``."""
        B, h, T, _ = k.shape
        p = pos.view(1, 1, T).expand(B, h, T)
        if self.keys is None:
            self.keys, self.values, self.pos = k.contiguous(), v.contiguous(), p.contiguous()
            if self.track_score:
                self.score = torch.zeros(B, h, T, dtype=torch.float32, device=k.device)
            return
        self.keys = torch.cat([self.keys, k], dim=2)
        self.values = torch.cat([self.values, v], dim=2)
        self.pos = torch.cat([self.pos, p], dim=2)
        if self.track_score:
            self.score = torch.cat([self.score, self.score.new_zeros(B, h, T)], dim=2)

    def take(self, idx: Tensor) -> None:
        """Keep only the entries ``idx`` ``int64 [B, h, m]`` (increasing), dropping the rest."""
        D = self.keys.shape[-1]
        full = idx[..., None].expand(*idx.shape, D)
        self.keys = self.keys.gather(2, full)
        self.values = self.values.gather(2, full)
        self.pos = self.pos.gather(2, idx)
        if self.score is not None:
            self.score = self.score.gather(2, idx)

    def keep_ends(self, first: int, last: int) -> None:
        """Keep the first ``first`` and the last ``last`` entries (same for every head)."""
        def cut(x: Tensor) -> Tensor:
            return torch.cat([x[:, :, :first], x[:, :, x.shape[2] - last:]], dim=2)

        self.keys, self.values, self.pos = cut(self.keys), cut(self.values), cut(self.pos)
        if self.score is not None:
            self.score = cut(self.score)

    def tensors(self) -> Iterator[tuple[str, Tensor]]:
        for name in ("keys", "values", "pos", "score"):
            t = getattr(self, name)
            if t is not None:
                yield name, t

    def map(self, fn) -> None:
        for name, t in list(self.tensors()):
            setattr(self, name, fn(t))

    def clear(self) -> None:
        self.keys = self.values = self.pos = self.score = None


def _nbytes(t: Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


# ------------------------------------------------------------------------------ layers
class KVLayer(CacheLayerMixin):
    """One attention layer's cache under a policy (see the module docstring).

    Subclasses override :meth:`attend_segment` (which entries a query reads, which
    probabilities are gathered) and :meth:`evict` (what is dropped after the attention).
    The base keeps everything and attends to everything.

    Read accounting: every :meth:`attend` of a decoding step (the cache held tokens before
    it) adds the bytes of the keys and values it read (and of any metadata a selection
    reads) to :attr:`bytes_read`, and what full attention would have read to
    :attr:`full_bytes_read`.
    """

    is_compileable = False
    is_croppable = False
    is_sliding = False
    #: names of extra per-batch tensor attributes (dim 0 = batch) a subclass keeps
    batch_attrs: tuple[str, ...] = ()

    def __init__(self, layer_idx: int, shape: "ModelShape", policy: "KVPolicy", segments: Sequence[Segment]):
        super().__init__()
        self.layer_idx = layer_idx
        self.shape = shape
        self.policy = policy
        self.segments = [s for s in segments if s.heads]
        covered = sorted(h for s in self.segments for h in s.heads)
        if covered != list(range(shape.num_kv_heads)):
            raise ValueError(f"layer {layer_idx}: segments must cover KV heads 0..{shape.num_kv_heads - 1} once, got {covered}")
        self.seen = 0  # tokens given to this layer so far (true token count)
        self.new = 0  # tokens added by the current forward
        self.awaiting = False  # update() ran, attend() not yet
        self.decode_steps = 0
        self.bytes_read = 0
        self.full_bytes_read = 0
        self.last_bytes_read = 0

    # ------------------------------------------------------------ transformers layer API
    def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.is_initialized = True

    def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        """Append ``key_states``/``value_states`` ``[B, Hkv, T, D]`` (after RoPE) as tokens
        ``seen .. seen+T-1``. Returns tagged stand-ins for the keys/values: the stored
        tensors of a one-segment layer, empty ``[B, Hkv, 0, D]`` tensors otherwise; the
        attention itself is :meth:`attend`."""
        if self.awaiting:
            raise RuntimeError(
                f"layer {self.layer_idx}: update() called twice without attend(); the model's attention "
                "implementation must be 'longattn' (longattn.kv.make_cache sets it)"
            )
        B, Hkv, T, D = key_states.shape
        if (Hkv, D) != (self.shape.num_kv_heads, self.shape.head_dim) or value_states.shape != key_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: expected keys/values [B, {self.shape.num_kv_heads}, T, "
                f"{self.shape.head_dim}], got {tuple(key_states.shape)} and {tuple(value_states.shape)}"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        pos = torch.arange(self.seen, self.seen + T, device=key_states.device)
        for seg in self.segments:
            seg.append(take_heads(key_states, seg.heads), take_heads(value_states, seg.heads), pos)
        self.seen += T
        self.new = T
        self.awaiting = True
        self._after_append()
        self._sync_public()
        if len(self.segments) == 1:
            k_out = self.segments[0].keys.view(self.segments[0].keys.shape)
            v_out = self.segments[0].values.view(self.segments[0].values.shape)
        else:
            k_out = key_states.new_empty(B, Hkv, 0, D)
            v_out = value_states.new_empty(B, Hkv, 0, D)
        setattr(k_out, TAG, self)
        return k_out, v_out

    def get_seq_length(self) -> int:
        """Tokens seen so far (not the number kept): the next token's index."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """``(kv_length, kv_offset)``: the model's mask covers every token index."""
        return self.seen + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        for seg in self.segments:
            seg.clear()
        for name in self.batch_attrs:
            setattr(self, name, None)
        self.seen = self.new = 0
        self.awaiting = False
        self.decode_steps = self.bytes_read = self.full_bytes_read = self.last_bytes_read = 0
        self._reset_policy_state()
        self.is_initialized = False
        self._sync_public()

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError(
            "a longattn KV cache cannot be cropped (evicted entries are gone); assisted / speculative "
            "decoding that rolls the cache back is not supported"
        )

    def _map_batch(self, fn) -> None:
        for seg in self.segments:
            seg.map(fn)
        for name in self.batch_attrs:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, fn(t))
        self._sync_public()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._map_batch(lambda t: t[indices, ...])

    def offload(self) -> None:
        self._map_batch(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map_batch(lambda t: t.to(self.device, non_blocking=True))

    # ------------------------------------------------------------ attention
    def attend(self, query: Tensor, attention_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
        """Attention of the current forward's queries ``query [B, H, Tq, D]`` (after RoPE;
        ``Tq`` = tokens added by the last :meth:`update`) over what the policy reads, then
        eviction. ``attention_mask``: the model's mask ``[B|1, 1, Tq, seen]`` (bool, or
        additive float with 0 = allowed) over token indices, or ``None``. Returns
        ``[B, H, Tq, D]``."""
        if not self.awaiting:
            raise RuntimeError(f"layer {self.layer_idx}: attend() needs the update() of the same forward first")
        B, H, Tq, D = query.shape
        if (H, D) != (self.shape.num_heads, self.shape.head_dim) or Tq != self.new:
            raise ValueError(
                f"layer {self.layer_idx}: query must be [B, {self.shape.num_heads}, {self.new}, "
                f"{self.shape.head_dim}] (Tq = tokens of the last update), got {tuple(query.shape)}"
            )
        scale = float(D ** -0.5 if scale is None else scale)
        allowed = self._allowed(attention_mask, Tq)
        fresh = self.seen == self.new  # nothing was cached before: a prefill over the prompt
        query_slots = torch.arange(self.seen - Tq, self.seen, device=query.device)
        out = query.new_empty(query.shape)
        self.last_bytes_read = 0
        for seg in self.segments:
            qh = seg.query_heads(self.shape.group)
            out[:, qh] = self.attend_segment(seg, query[:, qh], allowed, query_slots, scale, fresh)
        if not fresh:
            self.decode_steps += 1
            self.bytes_read += self.last_bytes_read
            self.full_bytes_read += self._entry_bytes(self.seen * self.shape.num_kv_heads)
        self.evict()
        self.awaiting = False
        self._sync_public()
        return out

    def attend_segment(
        self, seg: Segment, q: Tensor, allowed: Tensor | None, query_slots: Tensor, scale: float, fresh: bool
    ) -> Tensor:
        """Output ``[B, h*G, Tq, D]`` of the segment's query heads ``q``. Default: exact
        attention over every stored entry."""
        out, _ = exact_attention(
            q, seg.keys, seg.values, key_slots=None if fresh else seg.pos,
            query_slots=query_slots, scale=scale, allowed=allowed,
        )
        self.count_read(seg.length * len(seg.heads))
        return out

    def evict(self) -> None:
        """Drop what the policy does not keep (default: nothing)."""

    def count_read(self, entries: int, extra_bytes: int = 0) -> None:
        """Add ``entries`` (summed over KV heads, per sequence) read keys+values to this
        step's read bytes."""
        self.last_bytes_read += self._entry_bytes(entries) + extra_bytes

    def _entry_bytes(self, entries: int) -> int:
        seg = self.segments[0]
        if seg.keys is None:
            return 0
        B, _, _, D = seg.keys.shape
        return 2 * B * entries * D * seg.keys.element_size()

    def _allowed(self, attention_mask: Tensor | None, Tq: int) -> Tensor | None:
        """The model's mask as ``bool [B|1, Tq, seen]`` over token indices, or ``None``."""
        if attention_mask is None:
            return None
        if attention_mask.dim() != 4:
            raise ValueError(f"layer {self.layer_idx}: expected a 4D attention mask, got shape {tuple(attention_mask.shape)}")
        if attention_mask.shape[1] != 1:
            raise NotImplementedError(f"layer {self.layer_idx}: per-head attention masks are not supported by longattn KV caches")
        if attention_mask.shape[-2:] != (Tq, self.seen):
            raise ValueError(
                f"layer {self.layer_idx}: the attention mask covers {tuple(attention_mask.shape[-2:])} "
                f"(queries, keys) but this forward has {Tq} queries over {self.seen} token indices; "
                "a custom 4D mask must span every token seen (get_mask_sizes)"
            )
        m = attention_mask[:, 0]
        return m if m.dtype == torch.bool else m == 0

    # ------------------------------------------------------------ hooks and accounting
    def _after_append(self) -> None:
        """Called after new tokens were appended (Quest refreshes its page bounds)."""

    def _reset_policy_state(self) -> None:
        """Forget policy state kept outside the segments."""

    def _sync_public(self) -> None:
        # transformers' generic helpers look at layer.keys / layer.values; a one-segment layer
        # exposes its stored tensors there (the same objects: no copy)
        if len(self.segments) == 1:
            self.keys, self.values = self.segments[0].keys, self.segments[0].values
        else:
            self.keys = self.values = None

    def kv_bytes(self) -> int:
        """Bytes of the keys and values this layer holds now."""
        return sum(_nbytes(s.keys) + _nbytes(s.values) for s in self.segments)

    def meta_bytes(self) -> int:
        """Bytes of the bookkeeping held beside the keys and values (token indices, scores,
        page bounds, recycled indices)."""
        total = sum(_nbytes(s.pos) + _nbytes(s.score) for s in self.segments)
        return total + sum(_nbytes(getattr(self, n)) for n in self.batch_attrs)

    def full_kv_bytes(self) -> int:
        """Bytes a full cache of the same tokens would hold for this layer."""
        return self._entry_bytes(self.seen * self.shape.num_kv_heads)

    def kept_lengths(self) -> dict[tuple[int, ...], int]:
        """Entries kept per segment, keyed by the segment's KV heads."""
        return {s.heads: s.length for s in self.segments}

    def __repr__(self) -> str:
        kept = ", ".join(f"heads {list(h)}: {n}" for h, n in self.kept_lengths().items())
        return f"{type(self).__name__}(layer={self.layer_idx}, seen={self.seen}, kept=[{kept}])"


class RuleLayer(KVLayer):
    """Segments that keep everything (``rule=None``) or StreamingLLM's sinks + window
    (``rule=(sinks, window)``): full, StreamingLLM, DuoAttention and LightTransfer layers."""

    def evict(self) -> None:
        for seg in self.segments:
            if seg.rule is not None:
                sinks, window = seg.rule
                if seg.length > sinks + window:
                    seg.keep_ends(sinks, window)


# ------------------------------------------------------------------------------ the cache
class KVCache(Cache):
    """A ``transformers.Cache`` running a :class:`~longattn.kv.base.KVPolicy` (build it
    with :func:`longattn.kv.make_cache`).

    >>> cache = longattn.kv.make_cache(model, "streaming", sinks=4, window=1020)  # doctest: +SKIP
    >>> out = model.generate(ids, past_key_values=cache, max_new_tokens=64)       # doctest: +SKIP
    >>> cache.kv_bytes(), cache.full_kv_bytes()                                    # doctest: +SKIP
    """

    def __init__(self, policy: "KVPolicy", shape: "ModelShape", layers: list[KVLayer]):
        super().__init__(layers=layers)
        self.policy = policy
        self.shape = shape
        self._last_updated: int | None = None

    def update(
        self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[Tensor, Tensor]:
        last = self._last_updated
        if last is not None and last != layer_idx and self.layers[last].awaiting:
            raise RuntimeError(
                f"layer {last} of this longattn KV cache stored keys that were never attended through "
                "longattn: the model's attention implementation must be 'longattn' (longattn.kv.make_cache "
                "sets it; do not switch it afterwards). If a forward was interrupted, make a new cache."
            )
        out = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        self._last_updated = layer_idx
        return out

    def attend(self, layer_idx: int, query: Tensor, attention_mask: Tensor | None = None,
               scale: float | None = None) -> Tensor:
        """:meth:`KVLayer.attend` of layer ``layer_idx`` (after its :meth:`update`)."""
        return self.layers[layer_idx].attend(query, attention_mask, scale)

    def reset(self) -> None:
        super().reset()
        self._last_updated = None

    def crop(self, tokens_to_remove: int) -> None:
        self.layers[0].crop(tokens_to_remove)

    @property
    def is_croppable(self) -> bool:
        return False

    def kv_bytes(self) -> int:
        """Bytes of all keys and values the cache holds now (``numel * element_size``)."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def meta_bytes(self) -> int:
        """Bytes of the policy's bookkeeping (token indices, scores, page bounds, ...)."""
        return sum(layer.meta_bytes() for layer in self.layers)

    def full_kv_bytes(self) -> int:
        """Bytes a full (``DynamicCache``-like) cache of the same tokens would hold."""
        return sum(layer.full_kv_bytes() for layer in self.layers)

    def bytes_read(self) -> int:
        """Key/value (and selection metadata) bytes read by all decoding steps so far."""
        return sum(layer.bytes_read for layer in self.layers)

    def full_bytes_read(self) -> int:
        """What full attention would have read over the same decoding steps."""
        return sum(layer.full_bytes_read for layer in self.layers)

    def __repr__(self) -> str:
        return f"KVCache(policy={self.policy!r}, seen={self.get_seq_length()}, kv_bytes={self.kv_bytes()})"


__all__ = ["KVCache", "KVLayer", "RuleLayer", "Segment", "TAG", "exact_attention", "take_heads"]
