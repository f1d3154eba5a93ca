"""Local / sliding-window attention (Local Self-Attention over Long Text for Efficient
Document Retrieval, Hofstaetter et al., 2020; the sliding window of Longformer and Mistral).

Causal: the query at absolute position ``p`` sees keys ``p - window < j <= p`` (``window``
keys including itself). Bidirectional: ``|p - j| < window``. With ``window >= T`` both equal
full attention.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from ..registry import register_selection_method
from ..selection import BlockSelection
from ._common import band_selection, check_positive_int, check_tileable


@dataclass(frozen=True)
class WindowConfig:
    """``window``: keys per query (default 4096, Mistral-7B's sliding window);
    ``block_size``: tile of the block layout handed to kernels."""

    window: int = 4096
    block_size: int = 128

    def __post_init__(self) -> None:
        check_positive_int("WindowConfig", window=self.window, block_size=self.block_size)
        check_tileable("WindowConfig", block_size=self.block_size)


def select_window(q: Tensor, k: Tensor, causal: bool, config: WindowConfig) -> BlockSelection:
    """Blocks touched by the window band; exact at token level through the mask_mod."""
    return band_selection(q, k, causal, block=config.block_size, window=config.window)


register_selection_method(
    name="window",
    family="sparse/static",
    paper="Local Self-Attention over Long Text for Efficient Document Retrieval (2020)",
    summary="each query sees the last `window` keys (|p - j| < window when bidirectional)",
    config_cls=WindowConfig,
    selector=select_window,
)
