"""Attention sinks plus a sliding window (Efficient Streaming Language Models with Attention
Sinks -- StreamingLLM, Xiao et al., 2023; used by SinkLoRA).

The query at absolute position ``p`` sees the first ``sink`` tokens and the last ``window``
keys (``p - window < j <= p``). Defaults are the paper's: 4 sink tokens and a cache of 1024
(4 + 1020 recent). The sink tokens are always attended (causality permitting).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register_selection_method
from ..selection import BlockSelection
from ._common import band_selection, check_positive_int, check_tileable


@dataclass(frozen=True)
class SinkConfig:
    sink: int = 4
    window: int = 1020
    block_size: int = 128

    def __post_init__(self) -> None:
        check_positive_int("SinkConfig", sink=self.sink, window=self.window, block_size=self.block_size)
        check_tileable("SinkConfig", block_size=self.block_size)


def select_sink(q: Tensor, k: Tensor, causal: bool, config: SinkConfig) -> BlockSelection:
    """Blocks of the sink tokens and of the window band; exact through the mask_mod."""
    return band_selection(q, k, causal, block=config.block_size, window=config.window, sink=config.sink)


register_selection_method(
    name="sink",
    family="sparse/static",
    paper="Efficient Streaming Language Models with Attention Sinks (StreamingLLM, 2023); SinkLoRA",
    summary="first `sink` tokens + the last `window` keys",
    config_cls=SinkConfig,
    selector=select_sink,
)
