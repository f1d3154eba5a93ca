"""Full cache: keep every token (the reference the other policies are measured against)."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVPolicy, ModelShape
from .cache import KVLayer, RuleLayer, Segment


@dataclass(frozen=True)
class FullPolicy(KVPolicy):
    """Keep every key and value; every query attends to all of them (exact full attention,
    computed by the same code path as the evicting policies)."""

    name = "full"
    evicts = False

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        return RuleLayer(layer_idx, shape, self, [Segment(range(shape.num_kv_heads))])


__all__ = ["FullPolicy"]
