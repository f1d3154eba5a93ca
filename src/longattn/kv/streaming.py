"""StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention
Sinks"): keep the first ``sinks`` tokens (the attention sinks) and the ``window`` most recent
ones; everything in between is evicted. The cache size is constant once full and the sinks
are never evicted."""

from __future__ import annotations

from dataclasses import dataclass

from .base import KVPolicy, ModelShape, check_int
from .cache import KVLayer, RuleLayer, Segment


@dataclass(frozen=True)
class StreamingPolicy(KVPolicy):
    """StreamingLLM's cache on every layer and head.

    Args:
        sinks: initial tokens always kept (int >= 1). Default 4, the paper's choice.
        window: most recent tokens kept (int >= 1). Default 1020: with the 4 sinks the
            paper's "4 + 1020" cache of 1024 entries.

    Between forwards each layer holds at most ``sinks + window`` entries per KV head
    (``[B, Hkv, sinks + window, D]``); a decoding query attends to those plus its own key.
    Kept keys keep the positions (RoPE) they were encoded at; new tokens get their true
    index (see :mod:`longattn.kv.cache`).
    """

    name = "streaming"
    sinks: int = 4
    window: int = 1020

    def __post_init__(self) -> None:
        check_int("sinks", self.sinks, minimum=1)
        check_int("window", self.window, minimum=1)

    def make_layer(self, layer_idx: int, shape: ModelShape) -> KVLayer:
        return RuleLayer(layer_idx, shape, self, [Segment(range(shape.num_kv_heads), rule=(self.sinks, self.window))])


__all__ = ["StreamingPolicy"]
