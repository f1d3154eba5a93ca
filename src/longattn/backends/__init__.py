"""Backends that execute attention: ``reference`` (dense, fp32 accumulation), ``sdpa``
(PyTorch's fused dense kernels; for sparse methods under their dense token mask, short inputs
only) and ``flex`` (FlexAttention)."""

from .dense import (
    causal_token_mask,
    dense_mask_bytes,
    dense_masked_attention,
    expand_kv_heads,
    full_reference,
    plain_precision,
    sdpa_can_serve,
    sdpa_full,
    sdpa_mask_can_serve,
    sdpa_masked_attention,
)
from .flex import flex_call, flex_can_serve, flex_selection_attention

__all__ = [
    "causal_token_mask",
    "dense_mask_bytes",
    "dense_masked_attention",
    "expand_kv_heads",
    "flex_call",
    "flex_can_serve",
    "flex_selection_attention",
    "full_reference",
    "plain_precision",
    "sdpa_can_serve",
    "sdpa_full",
    "sdpa_mask_can_serve",
    "sdpa_masked_attention",
]
