"""Recycled Attention (Xu, Goyal and Choi 2024, "Recycled Attention: Efficient Inference for
Long-Context Language Models"): alternate full-attention steps with steps that attend only to
the top-K tokens of the last full step.

Per layer: a *full step* attends to the whole cache and records, per (sequence, KV head), the
``top_k`` tokens its query attended most (the probabilities of the query summed over the
query heads of the GQA group). The ``stride - 1`` steps after it are *recycled steps*: they
read only those tokens plus every token added since the full step. The prefill counts as a
full step (its last query's attention is the pattern recycled first). With the optional
query-similarity trigger, a step whose query has cosine similarity below ``threshold`` to the
query of the last full step (mean over batch and query heads) is made a full step early.

``stride=1`` makes every step a full step: exactly full decoding. The whole cache is kept
(full steps need it), so Recycled Attention saves bytes READ, not memory; see
:meth:`longattn.kv.cache.KVCache.bytes_read`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import KVPolicy, ModelShape, check_int
from .cache import KVLayer, Segment, exact_attention


@dataclass(frozen=True)
class RecycledPolicy(KVPolicy):
    """Recycled Attention on every layer.

    Args:
        stride: a full step every ``stride`` decoding steps (int >= 1; 1 = full decoding).
            Default 10.
        top_k: tokens per KV head recycled from the last full step (int >= 1). Default 4096.
        threshold: ``None`` (fixed schedule) or a cosine similarity in ``[-1, 1]``: a step
            whose query is less similar than this to the last full step's query becomes a
            full step (the paper's dynamic schedule).

    The paper sweeps stride and K; these defaults are the library's, not a single value the
    paper fixes.
    """

    name = "recycled"
    evicts = False
    stride: int = 10
    top_k: int = 4096
    threshold: float | None = None

    def __post_init__(self) -> None:
        check_int("stride", self.stride, minimum=1)
        check_int("top_k", self.top_k, minimum=1)
        t = self.threshold
        if t is not None and (
            isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not -1.0 <= t <= 1.0
        ):
            raise ValueError(f"threshold must be None or a cosine similarity in [-1, 1], got {t!r}")

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        return RecycledLayer(layer_idx, shape, self)


class RecycledLayer(KVLayer):
    """Keeps everything. ``recycled``: ``int64 [B, Hkv, K]`` entry indices chosen at the last
    full step (ascending); ``full_len``: entries at that step; ``full_query``: its query
    ``[B, H, D]`` (kept only with a threshold). Counters ``full_steps``/``recycled_steps``/
    ``triggered`` (full steps forced by the similarity trigger) cover decoding steps."""

    batch_attrs = ("recycled", "full_query")

    def __init__(self, layer_idx: int, shape: ModelShape, policy: RecycledPolicy):
        super().__init__(layer_idx, shape, policy, [Segment(range(shape.num_kv_heads))])
        self.recycled: Tensor | None = None
        self.full_query: Tensor | None = None
        self._reset_policy_state()

    def _reset_policy_state(self) -> None:
        self.full_len = 0
        self.since_full = 0
        self.full_steps = self.recycled_steps = self.triggered = 0
        self.last_step_full = True

    def _is_full_step(self, q: Tensor, fresh: bool) -> bool:
        if fresh or q.shape[2] > 1 or self.recycled is None:
            return True
        self.since_full += 1
        if self.since_full >= self.policy.stride:
            return True
        if self.policy.threshold is not None:
            sim = F.cosine_similarity(q[:, :, -1].float(), self.full_query.float(), dim=-1).mean().item()
            if sim < self.policy.threshold:
                self.triggered += 1
                return True
        return False

    def attend_segment(
        self, seg: Segment, q: Tensor, allowed: Tensor | None, query_slots: Tensor, scale: float, fresh: bool
    ) -> Tensor:
        n = seg.length
        full = self._is_full_step(q, fresh)
        self.last_step_full = full
        if full:
            out, last = exact_attention(
                q, seg.keys, seg.values, key_slots=None if fresh else seg.pos,
                query_slots=query_slots, scale=scale, allowed=allowed, reduce="lastrow",
            )  # last: [B, Hkv, n] probabilities of the last query, summed over each group
            k = min(self.policy.top_k, n)
            self.recycled = last.topk(k, dim=-1).indices.sort(dim=-1).values
            self.full_len = n
            self.since_full = 0
            if self.policy.threshold is not None:
                self.full_query = q[:, :, -1].detach().clone()  # [B, H, D]
            if not fresh:
                self.full_steps += 1
            self.count_read(n * len(seg.heads))
            return out
        B, h = self.recycled.shape[:2]
        since = torch.arange(self.full_len, n, device=q.device).expand(B, h, n - self.full_len)
        idx = torch.cat([self.recycled, since], dim=-1)  # [B, h, K + new]
        D = seg.keys.shape[-1]
        k_sel = seg.keys.gather(2, idx[..., None].expand(*idx.shape, D))
        v_sel = seg.values.gather(2, idx[..., None].expand(*idx.shape, D))
        out, _ = exact_attention(
            q, k_sel, v_sel, key_slots=seg.pos.gather(2, idx), query_slots=query_slots, scale=scale, allowed=allowed
        )
        self.recycled_steps += 1
        self.count_read(idx.shape[-1] * h)
        return out


__all__ = ["RecycledLayer", "RecycledPolicy"]
