"""NSA's gated sum of its three branches (Native Sparse Attention, Yuan et al., 2025, eq. 5) in
one kernel each way.

``out = g_cmp * o_cmp + g_slc * o_slc + g_win * o_win``, accumulated in fp32 and rounded once to
the output dtype, as :func:`longattn.methods.nsa.nsa_combine` (the specification) does. That
PyTorch version forms fp32 copies of each ``[B, H, Tq, D]`` branch, three products and two sums
(and as many again in its backward): about 12 ms of the forward + backward at 64k tokens of
32 x 128 on an H200. Here the forward reads each branch once and writes the output; the backward
reads the output gradient once and writes the three branch gradients ``g_i * dO`` (rounded to
each branch's dtype), and, for gates given per query (``[B, H, Tq, 3]``), also reads the branches
for ``dg_i = sum_d dO * o_i`` (fp32).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..launch import fast
from ..online_softmax import load_rows, row_launch, row_tile


@triton.jit
def _gates(GATES, b, h, t, t_ok, sgb, sgh, sgt, g0, g1, g2, PER_QUERY: tl.constexpr):
    """The three gates as ``[BLOCK_T, 1]`` fp32 columns (per query) or the constants."""
    if PER_QUERY:
        base = GATES + b * sgb + h * sgh + t * sgt
        c = tl.load(base, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        s = tl.load(base + 1, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        w = tl.load(base + 2, mask=t_ok, other=0.0).to(tl.float32)[:, None]
        return c, s, w
    else:
        return g0, g1, g2


@triton.jit
def _combine_fwd(
    OC, OS, OW, GATES, OUT,
    scb, sch, sct, ssb, ssh, sst, swb, swh, swt, sgb, sgh, sgt, sob, soh, sot,
    num_heads, q_len, g0, g1, g2,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PER_QUERY: tl.constexpr,
):
    b, h, t, dims, t_ok, ok = row_tile(num_heads, q_len, D, HEAD_DIM, BLOCK_T)
    c, s, w = _gates(GATES, b, h, t, t_ok, sgb, sgh, sgt, g0, g1, g2, PER_QUERY)
    out = c * load_rows(OC, b, h, t, dims, ok, scb, sch, sct)
    out = out + s * load_rows(OS, b, h, t, dims, ok, ssb, ssh, sst)
    out = out + w * load_rows(OW, b, h, t, dims, ok, swb, swh, swt)
    tl.store(OUT + b * sob + h * soh + t[:, None] * sot + dims[None, :], out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _combine_bwd(
    DO, OC, OS, OW, GATES, DC, DS, DW, DG,
    sdb, sdh, sdt, scb, sch, sct, ssb, ssh, sst, swb, swh, swt, sgb, sgh, sgt,
    num_heads, q_len, g0, g1, g2,
    D: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_T: tl.constexpr, PER_QUERY: tl.constexpr,
):
    """``DC``/``DS``/``DW``: contiguous ``[B, H, Tq, D]``; ``DG``: contiguous fp32 ``[B, H, Tq, 3]``
    (written only ``PER_QUERY``)."""
    b, h, t, dims, t_ok, ok = row_tile(num_heads, q_len, D, HEAD_DIM, BLOCK_T)
    c, s, w = _gates(GATES, b, h, t, t_ok, sgb, sgh, sgt, g0, g1, g2, PER_QUERY)
    do = load_rows(DO, b, h, t, dims, ok, sdb, sdh, sdt)
    row = (b * num_heads + h) * q_len + t  # row of the contiguous outputs
    offs = row[:, None] * D + dims[None, :]
    tl.store(DC + offs, (c * do).to(DC.dtype.element_ty), mask=ok)
    tl.store(DS + offs, (s * do).to(DS.dtype.element_ty), mask=ok)
    tl.store(DW + offs, (w * do).to(DW.dtype.element_ty), mask=ok)
    if PER_QUERY:
        tl.store(DG + row * 3, tl.sum(do * load_rows(OC, b, h, t, dims, ok, scb, sch, sct), 1), mask=t_ok)
        tl.store(DG + row * 3 + 1, tl.sum(do * load_rows(OS, b, h, t, dims, ok, ssb, ssh, sst), 1), mask=t_ok)
        tl.store(DG + row * 3 + 2, tl.sum(do * load_rows(OW, b, h, t, dims, ok, swb, swh, swt), 1), mask=t_ok)


def _strides(*ts: Tensor) -> list[int]:
    return [s for t in ts for s in t.stride()[:3]]


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_cmp, o_slc, o_win, gates, consts):
        out = torch.empty(o_slc.shape, device=o_slc.device, dtype=o_slc.dtype)
        per_query = gates is not None
        g = gates if per_query else out  # a placeholder pointer when the gates are constants
        if out.numel():
            grid, kw = row_launch(out)
            fast(_combine_fwd)[grid](
                o_cmp, o_slc, o_win, g, out, *_strides(o_cmp, o_slc, o_win, g, out),
                out.shape[1], out.shape[2], *consts, PER_QUERY=per_query, **kw,
            )
        ctx.save_for_backward(o_cmp, o_slc, o_win, gates)
        ctx.consts = consts
        return out

    @staticmethod
    def backward(ctx, dout):
        o_cmp, o_slc, o_win, gates = ctx.saved_tensors
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        grads = [torch.empty(o.shape, device=o.device, dtype=o.dtype) for o in (o_cmp, o_slc, o_win)]
        per_query = gates is not None
        dg = torch.empty(*dout.shape[:3], 3, device=dout.device, dtype=torch.float32) if per_query else None
        g = gates if per_query else dout
        if dout.numel():
            grid, kw = row_launch(dout)
            fast(_combine_bwd)[grid](
                dout, o_cmp, o_slc, o_win, g, *grads, dg if per_query else dout,
                *_strides(dout, o_cmp, o_slc, o_win, g), dout.shape[1], dout.shape[2], *ctx.consts,
                PER_QUERY=per_query, **kw,
            )
        return (*grads, dg.to(gates.dtype) if per_query else None, None)


def combine_unsupported_reason(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates) -> str | None:
    """``None`` when :func:`combine_branches` can take these, else why not."""
    from .. import triton_unavailable_reason

    outs = (o_cmp, o_slc, o_win)
    if any(o.shape != o_slc.shape or o.dim() != 4 for o in outs):
        return f"the branches must share one [B, H, Tq, D] shape, got {[tuple(o.shape) for o in outs]}"
    if any(o.dtype not in (torch.float16, torch.bfloat16, torch.float32) for o in outs):
        return f"the combine kernel takes float16, bfloat16 or float32 branches, got {[o.dtype for o in outs]}"
    if any(o.device != o_slc.device for o in outs):
        return "the branches lie on different devices"
    if isinstance(gates, Tensor):
        if gates.shape != (*o_slc.shape[:3], 3):
            return f"per-query gates must be [B, H, Tq, 3] = {(*o_slc.shape[:3], 3)}, got {tuple(gates.shape)}"
        if gates.dtype not in (torch.float16, torch.bfloat16, torch.float32) or gates.device != o_slc.device:
            return f"per-query gates must be a 16- or 32-bit float tensor on {o_slc.device}"
    return triton_unavailable_reason(o_slc.device)


def combine_branches(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates) -> Tensor:
    """``g_cmp * o_cmp + g_slc * o_slc + g_win * o_win`` of ``[B, H, Tq, D]`` branches in fp32,
    returned in ``o_slc``'s dtype; ``gates``: three numbers, or a ``[B, H, Tq, 3]`` tensor
    (compressed, selected, window). Differentiable in the branches and in tensor gates; the same
    arithmetic as :func:`longattn.methods.nsa.nsa_combine`. Raises ``ValueError`` on inputs
    :func:`combine_unsupported_reason` refuses."""
    reason = combine_unsupported_reason(o_cmp, o_slc, o_win, gates)
    if reason:
        raise ValueError(f"combine_branches cannot run: {reason}")
    from .. import kernel_layout

    o_cmp, o_slc, o_win = (kernel_layout(o, n) for o, n in ((o_cmp, "o_cmp"), (o_slc, "o_slc"), (o_win, "o_win")))
    if isinstance(gates, Tensor):
        gates = gates if gates.stride(-1) == 1 else gates.contiguous()
        return _Combine.apply(o_cmp, o_slc, o_win, gates, (0.0, 0.0, 0.0))
    consts = tuple(float(g) for g in gates)
    if len(consts) != 3:
        raise ValueError(f"gates must be three numbers or a [B, H, Tq, 3] tensor, got {gates!r}")
    return _Combine.apply(o_cmp, o_slc, o_win, None, consts)
