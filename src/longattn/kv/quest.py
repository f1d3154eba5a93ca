"""Quest (Tang et al. 2024, "Quest: Query-Aware Sparsity for Efficient Long-Context LLM
Inference"): keep the whole cache, but at each decoding step read only the pages whose keys
can score highest for the current query.

The cache is cut into pages of ``page_size`` tokens; per page and KV head the layer keeps the
element-wise minimum and maximum of its keys (:func:`longattn.decode.page_bounds`, refreshed
only for the pages new tokens touch). At a decoding step the upper bound of ``q . k`` over a
page is ``sum_d max(q_d * min_d, q_d * max_d)`` (:func:`longattn.decode.quest_upper_bounds`);
summed over the query heads of a GQA group, the best ``budget // page_size`` pages are read
(:func:`longattn.decode.select_quest_pages`; the page holding the current token is always
read). Defining property: no unread page has a bound above the smallest bound among the
pages chosen by rank.

**Quest does not free memory**: every key and value stays in the cache (plus the page
bounds, ``2 * nPages * D`` values per KV head). What it saves is the bytes READ per step,
reported by :meth:`longattn.kv.cache.KVCache.bytes_read` against
:meth:`~longattn.kv.cache.KVCache.full_bytes_read`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..decode import page_bounds, select_quest_pages
from .base import KVPolicy, ModelShape, check_int
from .cache import KVLayer, Segment, exact_attention


@dataclass(frozen=True)
class QuestPolicy(KVPolicy):
    """Quest page selection on every layer from ``dense_layers`` on.

    Args:
        budget: tokens read per decoding step and KV head, a multiple of ``page_size``
            (``budget // page_size`` pages). Default 1024.
        page_size: tokens per page (int >= 1). Default 16, the paper's page size.
        dense_layers: the first layers attend to everything (int >= 0). Default 2: the
            paper leaves the first two layers dense, where attention is not sparse.

    Prefill forwards (and any forward of more than one token) attend to everything; so
    does a step whose cache holds no more than ``budget`` tokens.
    """

    name = "quest"
    evicts = False
    budget: int = 1024
    page_size: int = 16
    dense_layers: int = 2

    def __post_init__(self) -> None:
        check_int("page_size", self.page_size, minimum=1)
        check_int("budget", self.budget, minimum=1)
        check_int("dense_layers", self.dense_layers, minimum=0)
        if self.budget % self.page_size:
            raise ValueError(
                f"budget must be a multiple of page_size={self.page_size} (whole pages are read), got {self.budget}"
            )

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        return QuestLayer(layer_idx, shape, self)


class QuestLayer(KVLayer):
    """Keeps everything; ``kmin``/``kmax`` ``[B, Hkv, nPages, D]`` page bounds (not on dense
    layers). ``last_selection``: ``(page indices int32 [B, Hkv, K], counts int32 [B, Hkv])``
    of the last selective step, ``None`` when the last step read everything."""

    batch_attrs = ("kmin", "kmax")

    def __init__(self, layer_idx: int, shape: ModelShape, policy: QuestPolicy):
        super().__init__(layer_idx, shape, policy, [Segment(range(shape.num_kv_heads))])
        self.dense = layer_idx < policy.dense_layers
        self.kmin: Tensor | None = None
        self.kmax: Tensor | None = None
        self.last_selection: tuple[Tensor, Tensor] | None = None

    def _reset_policy_state(self) -> None:
        self.last_selection = None

    def _after_append(self) -> None:
        if self.dense:
            return
        P = self.policy.page_size
        seg = self.segments[0]
        first = (self.seen - self.new) // P  # first page the new tokens touch
        tail = seg.keys[:, :, first * P:]  # [B, Hkv, T_tail, D]
        lens = torch.full((tail.shape[0],), tail.shape[2], dtype=torch.long, device=tail.device)
        kmin, kmax = page_bounds(tail, lens, P)  # [B, Hkv, pages from `first`, D]
        if self.kmin is None or first == 0:
            self.kmin, self.kmax = kmin, kmax
        else:
            self.kmin = torch.cat([self.kmin[:, :, :first], kmin], dim=2)
            self.kmax = torch.cat([self.kmax[:, :, :first], kmax], dim=2)

    def attend_segment(
        self, seg: Segment, q: Tensor, allowed: Tensor | None, query_slots: Tensor, scale: float, fresh: bool
    ) -> Tensor:
        n = seg.length
        P = self.policy.page_size
        if self.dense or fresh or q.shape[2] > 1 or n <= self.policy.budget:
            self.last_selection = None
            return super().attend_segment(seg, q, allowed, query_slots, scale, fresh)
        B, h = seg.keys.shape[:2]
        lens = torch.full((B,), n, dtype=torch.long, device=q.device)
        pages, counts = select_quest_pages(
            q, seg.keys, lens, page_size=P, top_k=self.policy.budget // P, bounds=(self.kmin, self.kmax)
        )  # [B, h, K] ascending (the current token's page last), [B, h] all equal to K
        self.last_selection = (pages, counts)
        # token indices of the chosen pages; only the last page may be partial
        K = pages.shape[-1]
        m = (K - 1) * P + (n - ((n - 1) // P) * P)  # tokens read per (sequence, KV head)
        tok = (pages.long()[..., None] * P + torch.arange(P, device=q.device)).reshape(B, h, K * P)[..., :m]
        D = seg.keys.shape[-1]
        k_sel = seg.keys.gather(2, tok[..., None].expand(B, h, m, D))  # [B, h, m, D]: only the chosen pages
        v_sel = seg.values.gather(2, tok[..., None].expand(B, h, m, D))
        out, _ = exact_attention(
            q, k_sel, v_sel, key_slots=seg.pos.gather(2, tok), query_slots=query_slots, scale=scale, allowed=allowed
        )
        bound_bytes = 2 * self.kmin.numel() * self.kmin.element_size()  # kmin and kmax are read too
        self.count_read(m * h, extra_bytes=bound_bytes)
        return out


__all__ = ["QuestLayer", "QuestPolicy"]
