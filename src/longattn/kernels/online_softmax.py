"""Triton helpers of the FlashAttention-style online softmax (forward) and of its backward,
shared by the block-sparse, decoding and NSA kernels (imported by those kernel modules only; importing
:mod:`longattn.kernels` itself does not import Triton).

Scores are in log2 units (``scale * log2(e)`` folded in) and masked with ``-inf``; a row that
has seen no key yet keeps ``m = -inf``, ``l = 0`` and contributes nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def online_softmax_step(s, m_i, l_i):
    """One key tile of the online softmax: ``s [ROWS, N]`` (log2 units, ``-inf`` where masked)
    against the running row maximum ``m_i [ROWS]`` and sum ``l_i [ROWS]``. Returns the tile's
    unnormalised probabilities ``p``, the factor ``alpha`` by which the previous accumulator
    and sum are rescaled, the new maximum and the new sum."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no key yet
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    return p, alpha, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def finish_rows(acc, m_i, l_i):
    """Normalised output ``acc / l`` and natural-log LSE of rows accumulated by
    :func:`online_softmax_step`; a row that read no key gets output 0 and LSE ``-inf``."""
    has = l_i > 0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    return out, lse


@triton.jit
def backward_row_stats(LSE, DELTA, offs, row_ok):
    """For a backward pass: the forward's natural-log log-sum-exp in log2 units (``+inf`` for a
    row that read nothing, so its recomputed probabilities ``exp2(s - lse2)`` come out 0) and
    ``delta = rowsum(dO * O)``, at row offsets ``offs`` of two tensors laid out alike
    (``[B, H, Tq]``)."""
    lse = tl.load(LSE + offs, mask=row_ok, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    delta = tl.load(DELTA + offs, mask=row_ok, other=0.0)
    return lse2, delta
