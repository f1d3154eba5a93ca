"""H2O, the Heavy-Hitter Oracle (Zhang et al. 2023, "H2O: Heavy-Hitter Oracle for Efficient
Generative Inference of Large Language Models"; named in SinkLoRA): keep the ``recent`` most
recent tokens and the "heavy hitters", the tokens with the largest attention accumulated over
every query that has attended them so far.

Per KV head: a token's score is the sum, over the queries of the prompt and of every
decoding step that read it, and over the query heads of the GQA group, of the attention
probability it received. After each forward the layer keeps, per (sequence, KV head), the
``recent`` newest entries and the ``heavy`` best-scoring older ones -- the same count for
every head, so the kept entries are gathered into one ``[B, Hkv, heavy + recent, D]`` tensor
(different tokens per head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import KVPolicy, ModelShape, check_tokens_or_fraction
from .cache import KVLayer, Segment, exact_attention


@dataclass(frozen=True)
class H2OPolicy(KVPolicy):
    """H2O on every layer.

    Args:
        heavy: heavy hitters kept per KV head: a token count (int >= 1) or a fraction of
            the prompt length (float in (0, 1]; ``max(1, int(fraction * prompt_len))``,
            fixed at the prefill). Default 0.1.
        recent: most recent tokens kept, same forms. Default 0.1 -- the paper's main
            setting, a 20% KV budget split evenly between heavy hitters and recent tokens.
    """

    name = "h2o"
    heavy: int | float = 0.1
    recent: int | float = 0.1

    def __post_init__(self) -> None:
        check_tokens_or_fraction("heavy", self.heavy)
        check_tokens_or_fraction("recent", self.recent)

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        return H2OLayer(layer_idx, shape, self)


def _resolve(value: int | float, prompt_len: int) -> int:
    return value if isinstance(value, int) else max(1, int(value * prompt_len))


class H2OLayer(KVLayer):
    """One segment with every KV head, tracking the accumulated attention ``score
    float32 [B, Hkv, n]`` of each kept entry."""

    def __init__(self, layer_idx: int, shape: ModelShape, policy: H2OPolicy):
        super().__init__(layer_idx, shape, policy, [Segment(range(shape.num_kv_heads), track_score=True)])
        self.heavy: int | None = None  # token counts, fixed at the first forward
        self.recent: int | None = None

    def _reset_policy_state(self) -> None:
        self.heavy = self.recent = None

    def attend_segment(
        self, seg: Segment, q: Tensor, allowed: Tensor | None, query_slots: Tensor, scale: float, fresh: bool
    ) -> Tensor:
        out, colsum = exact_attention(
            q, seg.keys, seg.values, key_slots=None if fresh else seg.pos,
            query_slots=query_slots, scale=scale, allowed=allowed, reduce="colsum",
        )
        seg.score += colsum  # [B, Hkv, n]: this forward's queries, summed over each group
        self.count_read(seg.length * len(seg.heads))
        return out

    def evict(self) -> None:
        if self.heavy is None:
            self.heavy = _resolve(self.policy.heavy, self.seen)
            self.recent = _resolve(self.policy.recent, self.seen)
        seg = self.segments[0]
        n = seg.length
        if n <= self.heavy + self.recent:
            return
        older = n - self.recent  # entries eligible as heavy hitters: all but the recent ones
        B, h = seg.score.shape[:2]
        heavy = seg.score[:, :, :older].topk(self.heavy, dim=-1).indices.sort(dim=-1).values  # [B, h, heavy]
        recent = torch.arange(older, n, device=heavy.device).expand(B, h, self.recent)
        seg.take(torch.cat([heavy, recent], dim=-1))


__all__ = ["H2OLayer", "H2OPolicy"]
