"""Dense backends: the fp32-accumulating reference (the specification), PyTorch SDPA, and
SDPA under a sparse method's token mask (the dense path ``auto`` takes below the break-even
length, where masked dense attention is faster than the block-sparse kernels)."""

from __future__ import annotations

import contextlib
import threading

import torch
import torch.nn.functional as F
from torch import Tensor

from ..registry import AttnInputs


_plain = threading.local()


@contextlib.contextmanager
def plain_precision():
    """Within this block the reference accumulates in the input dtype instead of fp32: the
    error of "plain PyTorch in the same dtype" that fast paths are held to (DESIGN.md)."""
    prev = getattr(_plain, "on", False)
    _plain.on = True
    try:
        yield
    finally:
        _plain.on = prev


def _accum_dtype(dtype: torch.dtype) -> torch.dtype:
    if getattr(_plain, "on", False):
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def expand_kv_heads(x: Tensor, num_heads: int) -> Tensor:
    """``[B, Hkv, T, D] -> [B, H, T, D]``: each KV head serves ``H // Hkv`` consecutive
    query heads (the GQA convention of SDPA, FlexAttention and transformers)."""
    group = num_heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


def causal_token_mask(q_len: int, kv_len: int, device: torch.device) -> Tensor:
    """``bool [Tq, Tk]``: query ``i`` (absolute ``i + Tk - Tq``) sees keys up to itself."""
    qpos = torch.arange(q_len, device=device)[:, None] + (kv_len - q_len)
    return torch.arange(kv_len, device=device)[None, :] <= qpos


def dense_masked_attention(inputs: AttnInputs, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Softmax attention with an explicit boolean mask, accumulated in fp32 (fp64 for fp64
    inputs). ``mask``: ``bool [B or 1, Hs, Tq, Tk]`` with ``Hs`` dividing ``H`` (a mask
    shared by each group of ``H // Hs`` consecutive query heads), or ``None`` for no mask.

    Returns ``out [B, H, Tq, D]`` in the input dtype and ``lse [B, H, Tq]`` (natural log,
    ``-inf`` for a query with no visible key; its output row is 0).
    """
    acc = _accum_dtype(inputs.q.dtype)
    H = inputs.num_heads
    q = inputs.q.to(acc)
    k = expand_kv_heads(inputs.k, H).to(acc)
    v = expand_kv_heads(inputs.v, H).to(acc)
    scores = torch.matmul(q, k.transpose(-1, -2)) * inputs.scale  # [B, H, Tq, Tk]
    if mask is not None:
        mask = expand_kv_heads(mask, H) if mask.shape[1] != 1 else mask
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B, H, Tq]
    finite = torch.isfinite(lse)[..., None]
    probs = torch.where(finite, torch.exp(scores - torch.where(finite, lse[..., None], 0.0)), 0.0)
    out = torch.matmul(probs, v)  # [B, H, Tq, D]
    return out.to(inputs.q.dtype), lse


def full_reference(inputs: AttnInputs, config=None) -> tuple[Tensor, Tensor]:
    """Full (dense) attention, causal aligned to the end of the key sequence."""
    mask = causal_token_mask(inputs.q_len, inputs.kv_len, inputs.q.device) if inputs.causal else None
    return dense_masked_attention(inputs, None if mask is None else mask[None, None])


def sdpa_full(inputs: AttnInputs, config=None) -> tuple[Tensor, Tensor]:
    """Full attention through ``F.scaled_dot_product_attention`` (cuDNN / FlashAttention /
    memory-efficient / math, as PyTorch chooses). Returns no LSE (``lse`` is None)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    kwargs = dict(scale=inputs.scale, enable_gqa=inputs.group > 1)
    if inputs.causal and inputs.q_len == inputs.kv_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **kwargs)
    elif inputs.causal:
        # queries at the end: bottom-right aligned causal mask
        from torch.nn.attention.bias import causal_lower_right

        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=causal_lower_right(inputs.q_len, inputs.kv_len), **kwargs
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v, **kwargs)
    return out, None  # type: ignore[return-value]


def sdpa_can_serve(inputs: AttnInputs, config=None) -> str | None:
    if inputs.return_lse:
        return "SDPA does not return the log-sum-exp (return_lse=True)"
    return None


# The ``sdpa`` path of a sparse method materialises its [B, H, Tq, Tk] token mask (and SDPA an
# additive copy of it in the input dtype). It is meant for short inputs, where it is the fastest
# exact path. On CUDA, past this many bytes it declines and the block-sparse backends (Triton,
# Flex) serve without any mask; on CPU it always serves, because the only other exact path there
# (the reference) materialises more (fp32 scores and probabilities: 8 bytes per pair).
DENSE_MASK_MAX_BYTES = 1 << 30


def dense_mask_bytes(batch: int, heads: int, q_len: int, kv_len: int, element_size: int) -> int:
    """Bytes the ``sdpa`` path of a sparse method allocates for its mask: one bool per pair plus
    SDPA's additive copy in the input dtype. Matches the H200 measurement of top-k at 8k and 16k
    (B = 1, H = 32, bf16: peaks of 6.6 and 24.9 GiB with the inputs, 3.3 and 3.1 bytes per pair)."""
    return batch * heads * q_len * kv_len * (1 + element_size)


def sdpa_mask_can_serve(inputs: AttnInputs, config=None) -> str | None:
    """``None`` when :func:`sdpa_masked_attention` may serve ``inputs``, else why not."""
    reason = sdpa_can_serve(inputs)
    if reason:
        return reason
    if inputs.q.device.type != "cuda":
        return None
    need = dense_mask_bytes(inputs.batch, inputs.num_heads, inputs.q_len, inputs.kv_len, inputs.q.element_size())
    if need > DENSE_MASK_MAX_BYTES:
        return (f"the dense token mask of {inputs.batch}x{inputs.num_heads}x{inputs.q_len}x{inputs.kv_len} "
                f"pairs would take {need / 2**30:.2f} GiB > longattn.backends.dense.DENSE_MASK_MAX_BYTES "
                f"({DENSE_MASK_MAX_BYTES / 2**30:.2f} GiB)")
    return None


def sdpa_masked_attention(inputs: AttnInputs, mask: Tensor) -> tuple[Tensor, Tensor]:
    """``F.scaled_dot_product_attention`` under an explicit boolean token mask ``bool [B or 1,
    Hs, Tq, Tk]`` (``Hs`` dividing ``H``, as in :func:`dense_masked_attention`), with the same
    result: a query row with no visible key gets output 0 (SDPA alone would give NaN there).
    K/V heads are expanded for GQA so PyTorch can use its fused masked kernel (memory-efficient
    attention) instead of the math path. Returns ``(out [B, H, Tq, D], None)`` (no LSE)."""
    H = inputs.num_heads
    if mask.shape[1] not in (1, H):
        mask = expand_kv_heads(mask, H)
    empty = ~mask.any(dim=-1, keepdim=True)  # [B|1, 1|H, Tq, 1]
    # an empty row attends to every key (no NaN, also in the backward) and is zeroed after
    mask = mask | empty
    k, v = expand_kv_heads(inputs.k, H), expand_kv_heads(inputs.v, H)
    out = F.scaled_dot_product_attention(inputs.q, k, v, attn_mask=mask, scale=inputs.scale)
    return torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out), None  # type: ignore[return-value]
