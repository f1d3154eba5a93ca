"""BigBird block-sparse attention (Big Bird: Transformers for Longer Sequences, Zaheer et
al., 2020), ITC variant with the paper's defaults: blocks of 64 tokens, 3 window blocks
(own +- 1), 2 global blocks, 3 random blocks per query block and head.

Pattern per absolute query block ``a`` and key block ``c`` (per head):

* window: ``|c - a| <= num_window_blocks // 2``;
* global: the first ``num_global_blocks`` blocks are keys for every query, and their own
  queries attend to every key (bidirectional); in causal mode "everywhere" means every past key;
* random: ``num_random_blocks`` blocks drawn from the rest (causal: from the past), by a
  counter-based hash of ``(seed, head, a, c)`` -- reproducible from the seed, the same on
  every device, and independent of the sequence length (so a decode step sees the blocks
  the prefill saw).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..registry import register_selection_method
from ..selection import BlockSelection, _ceil_div
from ._common import check_positive_int, check_tileable, gate_block_positions, pattern_selection, topk_blocks

_M31 = (1 << 31) - 1


@dataclass(frozen=True)
class BigBirdConfig:
    block_size: int = 64
    num_window_blocks: int = 3
    num_global_blocks: int = 2
    num_random_blocks: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        check_positive_int("BigBirdConfig", block_size=self.block_size, num_window_blocks=self.num_window_blocks)
        for name in ("num_global_blocks", "num_random_blocks", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"BigBirdConfig.{name} must be an int >= 0, got {value!r}")
        if self.num_window_blocks % 2 != 1:
            raise ValueError(
                f"BigBirdConfig.num_window_blocks must be odd (own block +- w), got {self.num_window_blocks}"
            )
        check_tileable("BigBirdConfig", block_size=self.block_size)


def hash_uniform(seed: int, head: Tensor, row: Tensor, col: Tensor) -> Tensor:
    """Deterministic pseudo-random numbers in [0, 1) from integer coordinates (broadcast)."""
    x = (torch.as_tensor(seed % _M31) * 1000003 + head) & _M31
    x = (x * 1000033 + row) & _M31
    x = (x * 1000037 + col) & _M31
    for mult in (0x5BD1E995, 0x27D4EB2D):
        x = x ^ (x >> 15)
        x = (x * mult) & _M31
    x = x ^ (x >> 13)
    return x.to(torch.float64) / float(_M31 + 1)


def bigbird_pattern(num_heads: int, rows: Tensor, num_kv_blocks: int, causal: bool, config: BigBirdConfig) -> Tensor:
    """``bool [1, H, len(rows), nKB]``: key blocks of absolute query blocks ``rows``."""
    dev = rows.device
    a = rows.view(1, -1, 1)
    c = torch.arange(num_kv_blocks, device=dev).view(1, 1, -1)
    h = torch.arange(num_heads, device=dev).view(-1, 1, 1)
    half = config.num_window_blocks // 2
    window = (c - a).abs() <= half
    g = config.num_global_blocks
    glob = (c < g) | (a < g)
    fixed = (window | glob).expand(num_heads, -1, -1)
    eligible = ~fixed & ((c < a) if causal else torch.ones_like(window))
    scores = hash_uniform(config.seed, h, a, c).to(torch.float32)
    rand = topk_blocks(scores, eligible.expand_as(scores), torch.zeros_like(fixed), config.num_random_blocks)
    pattern = fixed | rand
    if causal:
        pattern = pattern & (c <= a)
    return pattern[None]


def select_bigbird(q: Tensor, k: Tensor, causal: bool, config: BigBirdConfig) -> BlockSelection:
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    rows = gate_block_positions(Tq, Tk, config.block_size, q.device)
    pattern = bigbird_pattern(H, rows, _ceil_div(Tk, config.block_size), causal, config)
    return pattern_selection(
        pattern,
        gate_block=config.block_size,
        kv_block=config.block_size,
        q_len=Tq,
        kv_len=Tk,
        num_heads=H,
        causal=causal,
    )


register_selection_method(
    name="bigbird",
    family="sparse/static",
    paper="Big Bird: Transformers for Longer Sequences (Zaheer et al., 2020)",
    summary="window blocks + global blocks + seeded random blocks",
    config_cls=BigBirdConfig,
    selector=select_bigbird,
)
