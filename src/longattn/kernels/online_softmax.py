"""Triton helpers of the FlashAttention-style online softmax (forward) and of its backward,
shared by the block-sparse, decoding and NSA kernels (imported by those kernel modules only; importing
:mod:`longattn.kernels` itself does not import Triton).

Scores are in log2 units (``scale * log2(e)`` folded in) and masked with ``-inf``; a row that
has seen no key yet keeps ``m = -inf``, ``l = 0`` and contributes nothing.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .launch import fast


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


#: :func:`online_softmax_step_lazy` keeps a row's reference maximum until a tile's scores exceed
#: it by more than this (log2 units): probabilities then stay below ``2**8``, far inside fp32
#: and bf16 range, and the accumulator is rescaled only on the few tiles that raise a maximum.
LAZY_RESCALE_LOG2 = tl.constexpr(8.0)


@triton.jit
def online_softmax_step_lazy(s, m_i, l_i, acc):
    """:func:`online_softmax_step` that rescales the accumulator ``acc [ROWS, D]`` and the sums
    only when some row's maximum grew by more than ``LAZY_RESCALE_LOG2`` (then every row moves
    to its new maximum); otherwise the rows keep their reference ``m_i``, so ``p = exp2(s -
    m_i) <= 2**LAZY_RESCALE_LOG2``. The sum, the output ``acc / l`` and the log-sum-exp ``m_i +
    log2(l)`` are the same numbers as with the exact maximum, up to rounding (the trick of
    FlashAttention-4: most tiles after the first few skip ``ROWS x D`` multiplications).
    Returns ``p``, the accumulator, the reference maximum and the sum (``p`` not yet added to
    ``acc``)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with no key yet (m_i = -inf) that sees one now always triggers the rescale
    grow = tl.max((m_new > m_i + LAZY_RESCALE_LOG2).to(tl.int32), 0)
    if grow > 0:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_use)
        acc = acc * alpha[:, None]
        l_i = l_i * alpha
        m_i = m_new
    m_ref = tl.where(m_i == float("-inf"), 0.0, m_i)  # rows with no key yet
    p = tl.exp2(s - m_ref[:, None])
    return p, acc, m_i, l_i + tl.sum(p, 1)


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


@triton.jit
def row_tile(num_heads, q_len, D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Program ``(t tile, b * H + h)`` of the row-wise kernels over ``[B, H, Tq, D]`` tensors
    (:func:`backward_delta`, NSA's branch combine): batch and head (int64), its ``BLOCK_T`` rows
    ``t``, the feature lanes, which rows exist and the ``[BLOCK_T, HEAD_DIM]`` tile mask."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // num_heads).to(tl.int64)
    h = (pid_bh % num_heads).to(tl.int64)
    t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    dims = tl.arange(0, HEAD_DIM)
    t_ok = t < q_len
    return b, h, t, dims, t_ok, t_ok[:, None] & (dims < D)[None, :]


@triton.jit
def load_rows(X, b, h, t, dims, ok, sxb, sxh, sxt):
    """The :func:`row_tile` tile of ``X [B, H, Tq, D]`` (strided, unit stride along ``D``) in fp32."""
    return tl.load(X + b * sxb + h * sxh + t[:, None] * sxt + dims[None, :], mask=ok, other=0.0).to(tl.float32)


def row_launch(x) -> tuple[tuple[int, int], dict]:
    """``(grid, launch keywords)`` of a :func:`row_tile` kernel over ``x [B, H, Tq, D]``: 8,192
    elements per program at most (64 rows of 128)."""
    B, H, Tq, D = x.shape
    head_dim = max(16, 1 << (D - 1).bit_length())
    block_t = max(1, min(64, 8192 // head_dim))
    return (triton.cdiv(Tq, block_t), B * H), dict(D=D, HEAD_DIM=head_dim, BLOCK_T=block_t, num_warps=4)


@triton.jit
def _row_dot(A, B, OUT, sab, sah, sat, sbb, sbh, sbt, num_heads, q_len,
             D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr):
    """``OUT[b, h, t] = sum_d A[b, h, t, d] * B[b, h, t, d]`` in fp32 for ``BLOCK_T`` rows of one
    ``(batch, head)``; ``OUT`` contiguous ``[B, H, Tq]``."""
    b, h, t, dims, t_ok, ok = row_tile(num_heads, q_len, D, HEAD_DIM, BLOCK_T)
    a = load_rows(A, b, h, t, dims, ok, sab, sah, sat)
    x = load_rows(B, b, h, t, dims, ok, sbb, sbh, sbt)
    tl.store(OUT + (b * num_heads + h) * q_len + t, tl.sum(a * x, 1), mask=t_ok)


def backward_delta(dout, out):
    """``delta = rowsum(dO * O)`` of an attention backward: ``float32 [B, H, Tq]``, contiguous
    (laid out as the forward's LSE), from ``dout, out [B, H, Tq, D]`` (unit stride along ``D``).
    One reading pass in a kernel; ``(dout.float() * out.float()).sum(-1)`` wrote and re-read
    three fp32 copies of the ``[B, H, Tq, D]`` tensors (about 7 GB at 64k tokens of 32 x 128)."""
    import torch

    B, H, Tq, D = out.shape
    delta = torch.empty(B, H, Tq, device=out.device, dtype=torch.float32)
    if delta.numel() == 0:
        return delta
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    grid, kw = row_launch(out)
    fast(_row_dot)[grid](dout, out, delta, *dout.stride()[:3], *out.stride()[:3], H, Tq, **kw)
    return delta
