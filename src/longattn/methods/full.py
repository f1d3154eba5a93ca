"""Full attention: dense causal or bidirectional softmax -- the reference every method is
measured against."""

from __future__ import annotations

from dataclasses import dataclass

from ..backends import (
    flex_call,
    flex_can_serve,
    full_reference,
    sdpa_can_serve,
    sdpa_full,
)
from ..registry import AttnInputs, Backend, MethodSpec, register
from ..selection import FLEX_TILE
from ._common import band_selection


@dataclass(frozen=True)
class FullConfig:
    """Full attention has no parameters."""


def full_flex(inputs: AttnInputs, config: FullConfig):
    sel = band_selection(inputs.q, inputs.k, inputs.causal, block=FLEX_TILE, window=None)
    return flex_call(inputs.q, inputs.k, inputs.v, sel.to_block_mask(), inputs.scale)


register(
    MethodSpec(
        name="full",
        family="dense",
        paper="Attention Is All You Need (Vaswani et al., 2017)",
        summary="dense softmax attention, causal or bidirectional",
        config_cls=FullConfig,
        reference=full_reference,
        density=lambda q, k, causal, config: 1.0,
        backends={
            "sdpa": Backend(sdpa_full, sdpa_can_serve),
            "flex": Backend(full_flex, flex_can_serve),
        },
    )
)
