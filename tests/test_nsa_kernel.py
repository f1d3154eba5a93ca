"""NSA's compressed-branch Triton kernels (longattn.kernels.nsa; Native Sparse Attention, Yuan
et al., 2025), run through the interpreter on CPU: the compressed attention against the dense
reference and an fp64 log-sum-exp, the selection scores against the chunked scan's
``block_scores``, the chosen blocks against the reference selection, the ranking kernel
(``select_blocks``) against ``select_from_scores`` (random scores, exact ties, zeros, NaN and
+-inf, ``K >= nKB``, the largest rows, the fallback beyond them), the whole method
(``backend="triton"``) against ``backend="reference"``, ties, empty rows, bad inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import longattn
from longattn.backends import plain_precision
import longattn.kernels.nsa as nsa_kernels
from longattn.kernels.nsa import compressed_attention, select_blocks, selection_scores
from longattn.methods.nsa import (
    NSAConfig,
    _masked_softmax,
    _top_k_lowest_index,
    _triton_kernels_serve,
    block_scores,
    compressed_visibility,
    nsa_compress,
    nsa_compressed_branch,
    nsa_forward,
    nsa_selection,
    overlap_ranges,
    select_from_scores,
)

from .conftest import rand_qkv

# the GPU when the suite runs with LONGATTN_TEST_DEVICE=cuda, else the interpreter on CPU
DEV = "cuda" if torch.cuda.is_available() else "cpu"

SMALL = dict(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=24)
# (Tq, Tk, H, Hkv, dtype)
CASES = [
    (64, 64, 4, 2, torch.float32),
    (64, 64, 4, 1, torch.bfloat16),
    (200, 200, 4, 2, torch.bfloat16),
    (200, 200, 4, 1, torch.float32),
    (40, 200, 4, 2, torch.float32),
    (37, 130, 4, 1, torch.bfloat16),
]
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _kw(cfg: NSAConfig) -> dict:
    return dict(compress_block=cfg.compress_block, compress_stride=cfg.compress_stride)


def _inputs(Tq, Tk, H, Hkv, dtype, cfg, seed):
    q, k, v = rand_qkv(1, H, Hkv, Tq, Tk, 64, dtype=dtype, seed=seed, device=DEV)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)  # fp32 (mean phi), or the inputs' dtype
    return q, k, v, k_cmp, v_cmp


def _scan_scores(q, k_cmp, cfg, kv_len, scale, acc=torch.float32):
    """``p_slc`` as the chunked scan computes it (softmax, group sum, block_scores; in ``acc``,
    fp32 as the scan)."""
    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    nKB = -(-kv_len // cfg.select_block)
    pos = torch.arange(Tq, device=q.device) + kv_len - Tq
    visible = compressed_visibility(pos, nC, cfg)
    logits = q.to(acc).reshape(B, Hkv, H // Hkv, Tq, D) @ k_cmp.to(acc)[:, :, None].transpose(-1, -2) * scale
    p_grp = _masked_softmax(logits, visible).sum(2)
    return block_scores(p_grp, *overlap_ranges(nC, nKB, cfg, q.device)), logits.masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("Tq,Tk,H,Hkv,dtype,cmp", [(*c, "float32") for c in CASES] + [
    (*c, "input") for c in CASES if c[-1] == torch.bfloat16])
def test_compressed_attention_and_scores_match_the_scan(Tq, Tk, H, Hkv, dtype, cmp):
    """fp32 compressed tokens (split into exact bf16 parts against bf16 queries, tf32x3 on GPUs
    against fp32 ones) and, for bf16 inputs, tokens in bf16 (one native dot: its products are
    exact in fp32) against the fp32 scan over the same tokens."""
    cfg = NSAConfig(**SMALL, compressed_dtype=cmp)
    q, _, _, k_cmp, v_cmp = _inputs(Tq, Tk, H, Hkv, dtype, cfg, seed=Tq + 3 * Tk + H * Hkv)
    assert k_cmp.dtype == (torch.float32 if cmp == "float32" else dtype)
    scale = 1 / math.sqrt(64)
    out, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=Tk, scale=scale, **_kw(cfg))
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    ref = nsa_compressed_branch(q, k_cmp, v_cmp, cfg, kv_len=Tk, scale=scale, backend="reference")
    assert err(out, ref) <= (1e-5 if dtype == torch.float32 else 1.6e-2)

    p_ref, logits = _scan_scores(q, k_cmp, cfg, Tk, scale)
    lse64 = torch.logsumexp(logits.double(), -1).reshape(lse.shape)  # -inf where nothing is seen
    assert torch.equal(torch.isinf(lse), torch.isinf(lse64))
    assert err(lse[torch.isfinite(lse)], lse64[torch.isfinite(lse64)]) < 1e-5

    p_slc = selection_scores(q, k_cmp, lse, kv_len=Tk, scale=scale, select_block=cfg.select_block, **_kw(cfg))
    assert p_slc.shape == p_ref.shape and p_slc.dtype == torch.float32
    assert err(p_slc, p_ref) < 1e-5

    sel = select_from_scores(p_slc, cfg, kv_len=Tk, num_heads=H)
    ref_sel = nsa_selection(q, k_cmp, cfg, kv_len=Tk, scale=scale)
    assert torch.equal(sel.kv_num_blocks, ref_sel.kv_num_blocks)
    assert torch.equal(sel.kv_indices, ref_sel.kv_indices)
    assert torch.equal(sel.block_full, ref_sel.block_full)
    _assert_kernel_selects_like_torch(p_slc, cfg, Tk)


@pytest.mark.parametrize("q_dtype,D", [(torch.bfloat16, 64), (torch.float16, 64), (torch.float32, 64),
                                       (torch.bfloat16, 256), (torch.float16, 256)])
def test_fp32_keys_keep_fp32_accuracy(q_dtype, D):
    """16-bit queries against fp32 compressed keys with full 24-bit mantissas and large scores:
    the LSE and the block scores stay within fp32 rounding of an fp64 computation. (bf16
    queries take the keys as three exact bf16 parts; dropping the third, a 16-bit key, puts the
    LSE off by 5.7e-4 at D = 64 and 6.4e-4 at D = 256 here, about 5x the bound.) D = 256 takes the
    tiles that fit sm_90's shared memory there; 74 compressed tokens make several of the
    forward's token steps."""
    cfg = NSAConfig(**SMALL)
    Tq, Tk, H, Hkv = 64, 600, 4, 2
    g = torch.Generator().manual_seed(77)
    q = (4 * torch.randn(1, H, Tq, D, generator=g)).to(q_dtype).to(DEV)
    nC = cfg.num_compressed(Tk)
    k_cmp = (4 * torch.randn(1, Hkv, nC, D, generator=g, dtype=torch.float64)).float().to(DEV)
    v_cmp = torch.randn(1, Hkv, nC, D, generator=g).to(DEV)
    scale = 1 / math.sqrt(D)
    # the split path serves bf16 queries only, for both kernels at once
    assert nsa_kernels._split_k(q, k_cmp) == (q_dtype == torch.bfloat16)
    nsa_kernels.LAUNCH_OVERRIDES["scores"] = {"split_k": False}
    try:
        assert not nsa_kernels._split_k(q, k_cmp)
    finally:
        nsa_kernels.LAUNCH_OVERRIDES.clear()
    _, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=Tk, scale=scale, **_kw(cfg))
    p_ref, logits = _scan_scores(q, k_cmp, cfg, Tk, scale, acc=torch.float64)
    lse64 = torch.logsumexp(logits.double(), -1).reshape(lse.shape)
    ok = torch.isfinite(lse64)
    assert torch.equal(torch.isfinite(lse), ok)
    # fp32's spacing at the larger of |lse| and the logits' sum of |products| (an fp32 dot of D
    # terms rounds in proportion to the latter: about twice as large at D = 256 as at 64 here)
    mag = (q.double().abs() * scale).reshape(1, Hkv, H // Hkv, Tq, D) @ k_cmp.double().abs()[:, :, None].transpose(-1, -2)
    mag = max(1.0, lse64[ok].abs().max().item(), mag.max().item())
    spacing = 2.0 ** (math.floor(math.log2(mag)) - 23)
    assert err(lse[ok], lse64[ok]) < 8 * spacing, (err(lse[ok], lse64[ok]), spacing)
    p_slc = selection_scores(q, k_cmp, lse, kv_len=Tk, scale=scale, select_block=cfg.select_block, **_kw(cfg))
    assert err(p_slc, p_ref) < 2e-5


def test_tuning_overrides_restore_the_fp32_dots():
    """``split_k=False`` and ``ovl_split=False`` (the sweeps' baseline: fp32 operands through
    ``tf32x3`` on GPUs, IEEE fp32 here) give the default's LSE and block scores to fp32
    rounding, and the same blocks."""
    cfg = NSAConfig(**SMALL)
    q, _, _, k_cmp, v_cmp = _inputs(90, 200, 4, 2, torch.bfloat16, cfg, seed=12)
    scale = 1 / math.sqrt(64)
    kw = dict(kv_len=200, scale=scale, **_kw(cfg))

    def run():
        _, lse = compressed_attention(q, k_cmp, v_cmp, **kw)
        return lse, selection_scores(q, k_cmp, lse, select_block=cfg.select_block, **kw)

    lse, p = run()
    nsa_kernels.LAUNCH_OVERRIDES.update(cmp_fwd={"split_k": False}, scores={"ovl_split": False})
    try:
        assert not nsa_kernels._split_k(q, k_cmp)
        lse_f, p_f = run()
    finally:
        nsa_kernels.LAUNCH_OVERRIDES.clear()
    seen = torch.isfinite(lse)
    assert torch.equal(seen, torch.isfinite(lse_f)) and err(lse[seen], lse_f[seen]) < 1e-5
    assert err(p, p_f) < 1e-5
    sel = select_from_scores(p, cfg, kv_len=200, num_heads=4)
    sel_f = select_from_scores(p_f, cfg, kv_len=200, num_heads=4)
    assert torch.equal(sel.kv_indices, sel_f.kv_indices)


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (16, 16, 16), (48, 8, 16), (32, 8, 128)])
def test_scores_for_other_block_geometries(l, d, ls):
    """Spill over tile boundaries (``l - d`` beyond a selection block, several blocks per
    tile, one block wider than a tile) against ``block_scores``."""
    cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=ls, num_selected=4, window=64)
    Tk = 300
    q, _, _, k_cmp, v_cmp = _inputs(100, Tk, 4, 2, torch.float32, cfg, seed=l + d + ls)
    _, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=Tk, scale=0.125, **_kw(cfg))
    p_slc = selection_scores(q, k_cmp, lse, kv_len=Tk, scale=0.125, select_block=ls, **_kw(cfg))
    p_ref, _ = _scan_scores(q, k_cmp, cfg, Tk, 0.125)
    assert err(p_slc, p_ref) < 1e-5


@pytest.mark.parametrize("dtype,H,Hkv,Tq,Tk,cmp", [
    (torch.float32, 4, 2, 64, 64, "float32"), (torch.bfloat16, 4, 1, 90, 200, "float32"),
    (torch.float32, 4, 1, 200, 200, "float32"), (torch.bfloat16, 4, 2, 90, 200, "input")])
def test_triton_forward_matches_reference(dtype, H, Hkv, Tq, Tk, cmp):
    kw = dict(SMALL, compressed_dtype=cmp)
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 64, dtype=dtype, seed=Tq * 7 + Tk + H * Hkv, device=DEV)
    ref = longattn.attention(q.float(), k.float(), v.float(), method="nsa", backend="reference", **kw)
    with plain_precision():
        plain = longattn.attention(q, k, v, method="nsa", backend="reference", **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels serve: no fallback warning
        out = longattn.attention(q, k, v, method="nsa", backend="triton", **kw)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    bound = 2 * err(plain, ref) + FLOOR[dtype]
    assert err(out, ref) <= bound, (err(out, ref), bound)
    if cmp == "input":  # against the reference over the same bf16 tokens: bf16 rounding of the branches only
        same = longattn.attention(q, k, v, method="nsa", backend="reference", **kw)
        assert err(out, same) <= FLOOR[dtype] * 8, err(out, same)


def test_queries_that_see_no_compressed_token():
    cfg = NSAConfig(**SMALL)
    q, k, v, k_cmp, v_cmp = _inputs(40, 40, 4, 2, torch.float32, cfg, seed=1)
    out, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=40, scale=0.125, **_kw(cfg))
    blind = cfg.compress_block - 1  # positions 0 .. l-2 see nothing
    assert torch.all(out[:, :, :blind] == 0) and torch.all(lse[:, :, :blind] == float("-inf"))
    assert torch.isfinite(lse[:, :, blind:]).all()
    p_slc = selection_scores(q, k_cmp, lse, kv_len=40, scale=0.125, select_block=16, **_kw(cfg))
    assert torch.all(p_slc[:, :, :blind] == 0)
    # keys shorter than a compression block: no compressed token at all
    q2, k2, v2 = rand_qkv(1, 4, 2, 10, 10, 64, seed=2, device=DEV)
    kc, vc = nsa_compress(k2, v2, cfg)
    out2, lse2 = compressed_attention(q2, kc, vc, kv_len=10, scale=0.125, **_kw(cfg))
    assert torch.all(out2 == 0) and torch.all(lse2 == float("-inf"))
    ref = nsa_forward(q2, k2, v2, cfg, backend="reference")
    assert err(nsa_forward(q2, k2, v2, cfg, backend="triton"), ref) < 1e-5


def test_ties_go_to_the_lower_block_like_a_stable_sort():
    g = torch.Generator().manual_seed(0)
    for n, k in [(13, 4), (40, 16), (7, 7), (5, 1)]:
        ranked = torch.randint(0, 3, (6, 9, n), generator=g).float()  # many exact ties
        ranked[ranked == 0] = float("-inf")  # ineligible
        ranked[..., 0] = float("inf")  # forced
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices[..., :k]
        count = (ranked > float("-inf")).sum(-1).clamp(max=k)
        got = _top_k_lowest_index(ranked, k)
        for row, c in zip(range(order.reshape(-1, k).shape[0]), count.reshape(-1).tolist()):
            assert sorted(order.reshape(-1, k)[row, :c].tolist()) == got.reshape(-1, k)[row, :c].tolist()


def _fp64_compressed_branch(q, k, v, cfg, kv_len, scale):
    """The compressed branch in fp64 from first principles: mean-pooled blocks, explicit
    visibility mask, softmax (a row that sees nothing gives 0)."""
    H, Hkv = q.shape[1], k.shape[1]
    l, d = cfg.compress_block, cfg.compress_stride
    nC = (kv_len - l) // d + 1 if kv_len >= l else 0
    kc = torch.stack([k[:, :, i * d:i * d + l].double().mean(2) for i in range(nC)], 2)
    vc = torch.stack([v[:, :, i * d:i * d + l].double().mean(2) for i in range(nC)], 2)
    kc, vc = (t.repeat_interleave(H // Hkv, 1) for t in (kc, vc))
    pos = torch.arange(q.shape[2], device=q.device)[:, None] + kv_len - q.shape[2]
    seen = torch.arange(nC, device=q.device)[None, :] * d + l - 1 <= pos  # [Tq, nC]
    s = (q.double() @ kc.transpose(-1, -2) * scale).masked_fill(~seen, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1), nan=0.0)  # all-masked rows -> 0
    return p @ vc


BWD_CASES = [  # (Tq, Tk, H, Hkv, D, dtype)
    (70, 70, 4, 2, 64, torch.float32),
    (40, 130, 6, 2, 40, torch.float32),  # queries at the end of a longer key sequence, odd D
    (90, 90, 3, 3, 64, torch.float32),  # no GQA
    (100, 100, 4, 1, 64, torch.bfloat16),
    (40, 70, 4, 2, 256, torch.float32),  # D = 256 in fp32: the smaller tiles that fit shared memory
]


@pytest.mark.parametrize("Tq,Tk,H,Hkv,D,dtype", BWD_CASES)
def test_compressed_attention_gradients_match_fp64(Tq, Tk, H, Hkv, D, dtype):
    """The backward kernels (dq query-major, dk/dv key-major over the GQA group) against fp64
    autograd through a first-principles compressed branch; gradients reach k and v through
    the mean pooling. The first l - 1 queries see nothing and must get dq = 0."""
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, H, Hkv, Tq, Tk, D, dtype=dtype, seed=Tq + Tk + D, requires_grad=True, device=DEV)
    g = torch.Generator().manual_seed(Tq * D)
    dout = torch.randn(q.shape, generator=g).to(device=DEV, dtype=dtype)
    scale = 1 / math.sqrt(D)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    out, _ = compressed_attention(q, k_cmp, v_cmp, kv_len=Tk, scale=scale, **_kw(cfg))
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert [t.dtype for t in grads] == [dtype] * 3

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = _fp64_compressed_branch(q64, k64, v64, cfg, Tk, scale)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), dout.double())
    if dtype == torch.float32:
        bounds = [1e-5 * max(1.0, r.abs().max().item()) for r in ref_grads]
    else:  # 2x the plain bf16 computation's error (the same branch in bf16 PyTorch) plus a floor
        qb, kb, vb = (t.detach().clone().requires_grad_() for t in (q, k, v))
        with plain_precision():
            kcb, vcb = nsa_compress(kb, vb, cfg)
            plain = nsa_compressed_branch(qb, kcb.to(dtype), vcb.to(dtype), cfg, kv_len=Tk, scale=scale)
        plain_grads = torch.autograd.grad(plain, (qb, kb, vb), dout)
        bounds = [2 * err(p, r) + FLOOR[dtype] for p, r in zip(plain_grads, ref_grads)]
    for name, got, want, bound in zip("qkv", grads, ref_grads, bounds):
        assert err(got, want) <= bound, (name, err(got, want), bound)
    blind = cfg.compress_block - 1 - (Tk - Tq)
    if blind > 0:
        assert torch.all(grads[0][:, :, :blind] == 0)


def test_compressed_attention_gradients_without_compressed_tokens():
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 10, 10, 64, seed=3, requires_grad=True, device=DEV)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)  # 10 keys < one compression block: nC = 0
    out, _ = compressed_attention(q, k_cmp, v_cmp, kv_len=10, scale=0.125, **_kw(cfg))
    dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
    assert torch.all(dq == 0)
    assert dk is None or torch.all(dk == 0)


@pytest.mark.parametrize("dtype,H,Hkv,Tq,Tk", [(torch.float32, 4, 2, 48, 48), (torch.bfloat16, 4, 1, 40, 72)])
def test_triton_training_gradients_match_reference(dtype, H, Hkv, Tq, Tk):
    """The whole method trained through ``backend="triton"`` (compressed-branch kernels with
    their backward, kernel scores and ranking, block-sparse selected and window branches):
    gradients against the fp32 reference within the DESIGN.md bound."""
    q, k, v = rand_qkv(1, H, Hkv, Tq, Tk, 64, dtype=dtype, seed=Tq + Tk, requires_grad=True, device=DEV)
    g = torch.Generator().manual_seed(5)
    dout = torch.randn(q.shape, generator=g).to(device=DEV, dtype=dtype)

    def grads(backend, inputs, precision=None):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback warning
            if precision is None:
                out = longattn.attention(*inputs, method="nsa", backend=backend, **SMALL)
            else:
                with precision():
                    out = longattn.attention(*inputs, method="nsa", backend=backend, **SMALL)
        return torch.autograd.grad(out, inputs, dout.to(inputs[0].dtype))

    ref = grads("reference", [t.detach().float().requires_grad_() for t in (q, k, v)])
    got = grads("triton", [q, k, v])
    plain = grads("reference", [t.detach().clone().requires_grad_() for t in (q, k, v)], plain_precision)
    for name, a, r, p in zip("qkv", got, ref, plain):
        assert a.dtype == dtype and torch.isfinite(a).all()
        bound = 2 * err(p, r) + FLOOR[dtype]
        assert err(a, r) <= bound, (name, err(a, r), bound)


def test_training_uses_the_kernels_and_unsupported_inputs_fall_back_with_a_warning():
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 32, 32, 64, seed=4, requires_grad=True, device=DEV)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _triton_kernels_serve(q, k_cmp, v_cmp, cfg)  # autograd too
        with torch.no_grad():
            assert _triton_kernels_serve(q, k_cmp, v_cmp, cfg)
    odd = NSAConfig(compress_block=16, compress_stride=16, select_block=384, num_selected=4, window=24)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="power of two"):
        assert not _triton_kernels_serve(q, k_cmp, v_cmp, odd)


def test_bad_inputs_raise():
    cfg = NSAConfig(**SMALL)
    q, _, _, k_cmp, v_cmp = _inputs(32, 32, 4, 2, torch.float32, cfg, seed=5)
    kw = dict(kv_len=32, scale=0.125, **_kw(cfg))
    with pytest.raises(ValueError, match="expected q"):
        compressed_attention(q[0], k_cmp, v_cmp, **kw)
    with pytest.raises(ValueError, match="expected q"):
        compressed_attention(q, k_cmp, v_cmp[:, :, :1], **kw)
    with pytest.raises(ValueError, match="head dim"):
        compressed_attention(q, k_cmp[..., :32], v_cmp[..., :32], **kw)
    with pytest.raises(ValueError, match="kv_len=16 is shorter"):
        compressed_attention(q, k_cmp, v_cmp, **{**kw, "kv_len": 16})
    with pytest.raises(ValueError, match="compressed tokens"):
        compressed_attention(q, k_cmp, v_cmp, **{**kw, "compress_stride": 16})
    with pytest.raises(ValueError, match="do not divide"):
        compressed_attention(q[:, :3], k_cmp, v_cmp, **kw)
    with pytest.raises(ValueError, match="float64"):
        compressed_attention(q.double(), k_cmp.double(), v_cmp.double(), **kw)
    _, lse = compressed_attention(q, k_cmp, v_cmp, **kw)
    with pytest.raises(ValueError, match="lse must be"):
        selection_scores(q, k_cmp, lse[:, :2], select_block=16, **kw)
    with pytest.raises(ValueError, match="power of two"):
        selection_scores(q, k_cmp, lse, select_block=24, **kw)


# ---------------------------------------------------------------------- ranking kernel
def _select_kw(cfg: NSAConfig) -> dict:
    return dict(select_block=cfg.select_block, num_selected=cfg.num_selected,
                num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks)


def _assert_kernel_selects_like_torch(p_slc, cfg, kv_len):
    """``select_blocks`` gives exactly ``select_from_scores``' selection (and a sane one)."""
    idx, cnt, full = select_blocks(p_slc, kv_len=kv_len, **_select_kw(cfg))
    ref = select_from_scores(p_slc, cfg, kv_len=kv_len, num_heads=p_slc.shape[1])
    B, Hkv, Tq, nKB = p_slc.shape
    K = min(cfg.num_selected, nKB)
    assert idx.shape == (B, Hkv, Tq, K) and idx.dtype == torch.int32 and idx.device == p_slc.device
    assert cnt.shape == (B, Hkv, Tq) and cnt.dtype == torch.int32
    assert full.shape == (B, Hkv, Tq, K) and full.dtype == torch.bool
    assert torch.equal(cnt, ref.kv_num_blocks)
    assert torch.equal(idx, ref.kv_indices)
    assert torch.equal(full, ref.block_full)
    # sanity of the shared result: ascending, eligible, unused slots 0
    pos = torch.arange(Tq, device=p_slc.device) + kv_len - Tq
    used = torch.arange(K, device=p_slc.device) < cnt[..., None]
    assert torch.all(torch.where(used, idx, 0) == idx)
    assert torch.all(idx * cfg.select_block <= pos[:, None])
    step = idx[..., 1:] - idx[..., :-1]
    assert torch.all((step > 0) | ~used[..., 1:])
    assert torch.equal(cnt, (pos // cfg.select_block + 1).clamp(max=K).to(torch.int32).expand(B, Hkv, Tq))
    return idx, cnt, full


def _scores(shape, seed, kind="randn"):
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        s = torch.randn(*shape, generator=g)
    elif kind == "ties":  # integer-valued: many exact ties, also at the k-th score
        s = torch.randint(0, 3, shape, generator=g).float()
    else:
        s = torch.rand(*shape, generator=g)
    return s.to(DEV)


# (B, Hkv, Tq, Tk, select_block, num_selected, num_init_blocks, num_local_blocks)
SELECT_CASES = [
    (1, 2, 64, 64, 16, 4, 1, 2),
    (2, 1, 40, 200, 16, 4, 1, 2),  # Tq < Tk
    (1, 3, 37, 130, 32, 5, 0, 0),  # nothing forced
    (1, 2, 50, 900, 16, 16, 2, 3),  # Tq < Tk, 57 blocks
    (2, 2, 33, 33, 16, 8, 3, 0),  # init only, K >= nKB
    (1, 1, 70, 300, 64, 2, 0, 2),  # local only, fills K
    (1, 2, 20, 1000, 128, 3, 1, 1),
]


@pytest.mark.parametrize("B,Hkv,Tq,Tk,ls,n,init,local", SELECT_CASES)
@pytest.mark.parametrize("kind", ["randn", "ties"])
def test_select_blocks_matches_select_from_scores(B, Hkv, Tq, Tk, ls, n, init, local, kind):
    cfg = NSAConfig(compress_block=ls, compress_stride=ls // 2, select_block=ls, num_selected=n, window=16,
                    num_init_blocks=init, num_local_blocks=local)
    nKB = -(-Tk // ls)
    p_slc = _scores((B, Hkv, Tq, nKB), seed=Tq * 31 + Tk + n, kind=kind)
    _assert_kernel_selects_like_torch(p_slc, cfg, Tk)


def test_select_blocks_on_all_zero_scores_and_k_at_least_the_blocks():
    """Queries that see no compressed token score every block 0: forced blocks, then the
    lowest indices. ``num_selected >= nKB``: every eligible block."""
    for n in (4, 13, 40):
        cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=n, window=16)
        p_slc = torch.zeros(1, 2, 40, 13, device=DEV)  # 200 keys, 13 blocks
        p_slc[:, :, 20:] = _scores((1, 2, 20, 13), seed=n, kind="rand")
        idx, cnt, _ = _assert_kernel_selects_like_torch(p_slc, cfg, 200)
        if n >= 13:
            pos = torch.arange(40, device=DEV) + 160
            assert torch.equal(cnt[0, 0].long(), pos // 16 + 1)
    cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=16)
    idx, cnt, _ = _assert_kernel_selects_like_torch(torch.zeros(1, 1, 64, 4, device=DEV), cfg, 64)
    assert idx[0, 0, -1].tolist() == [0, 1, 2, 3]


def test_select_blocks_with_nan_and_infinite_scores():
    """NaN ranks as -FLT_MAX and ties with it (and with -inf), +-inf as +-FLT_MAX; -0 ties
    with +0. Both paths give the same deterministic selection."""
    cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=16,
                    num_init_blocks=1, num_local_blocks=1)
    inf, nan = float("inf"), float("nan")
    row = torch.tensor([0.0, nan, 0.5, -inf, inf, 0.25, nan, -0.0, 3e38, 0.0, -1.0, 0.0])
    p_slc = row.repeat(1, 1, 16, 1).to(DEV)  # queries at 176 .. 191: every block eligible, own = 11
    idx, cnt, _ = _assert_kernel_selects_like_torch(p_slc, cfg, 192)
    assert idx[0, 0, -1].tolist() == [0, 4, 8, 11]  # forced 0 and 11, then +inf (FLT_MAX) and 3e38
    row2 = torch.tensor([0.0, nan, -inf, nan, -3.4028234663852886e38, -inf, nan, 0.0])
    p2 = row2.repeat(1, 1, 8, 1).to(DEV)
    cfg2 = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=5, window=16,
                     num_init_blocks=1, num_local_blocks=1)
    idx2, _, _ = _assert_kernel_selects_like_torch(p2, cfg2, 128)
    assert idx2[0, 0, -1].tolist() == [0, 1, 2, 3, 7]  # forced 0 and 7, then the lowest ties
    # random rows with NaN and +-inf sprinkled in
    g = torch.Generator().manual_seed(7)
    for ls, n in [(16, 4), (16, 9), (32, 3)]:
        cfg = NSAConfig(compress_block=ls, compress_stride=ls // 2, select_block=ls, num_selected=n, window=16)
        s = torch.randn(2, 2, 40, -(-300 // ls), generator=g)
        u = torch.rand(s.shape, generator=g)
        s = torch.where(u < 0.1, nan, torch.where(u < 0.2, inf, torch.where(u < 0.3, -inf, s)))
        s = torch.where((u > 0.3) & (u < 0.4), torch.randint(0, 2, s.shape, generator=g).float() * -0.0, s)
        _assert_kernel_selects_like_torch(s.to(DEV), cfg, 300)


def test_select_blocks_on_the_largest_rows_and_the_fallback_beyond(monkeypatch):
    """4096 blocks (256k keys in 64-key blocks) and the 8192 limit; beyond it ``select_blocks``
    refuses with the reason and ``backend="triton"`` ranks on the host instead."""
    cfg = NSAConfig(compress_block=32, compress_stride=16, select_block=64, num_selected=16, window=64)
    for nKB in (4096, nsa_kernels.MAX_SELECT_BLOCKS):
        kv_len = nKB * 64 - 5
        p_slc = _scores((1, 1, 3, nKB), seed=nKB, kind="ties")
        _assert_kernel_selects_like_torch(p_slc, cfg, kv_len)
    too_many = torch.zeros(1, 1, 1, nsa_kernels.MAX_SELECT_BLOCKS + 1, device=DEV)
    with pytest.raises(ValueError, match="at most 8192 blocks"):
        select_blocks(too_many, kv_len=(nsa_kernels.MAX_SELECT_BLOCKS + 1) * 64, **_select_kw(cfg))
    # the fallback: a limit the small inputs exceed gives the same output as the kernel path
    small = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 50, 120, 64, seed=9, device=DEV)
    with torch.no_grad():
        out = nsa_forward(q, k, v, small, backend="triton")
        monkeypatch.setattr(nsa_kernels, "MAX_SELECT_BLOCKS", 4)
        assert nsa_kernels.select_unsupported_reason(torch.zeros(1, 1, 1, 8, device=DEV)) is not None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            fallback = nsa_forward(q, k, v, small, backend="triton")
    assert torch.equal(out, fallback)


def test_select_blocks_bad_inputs_raise():
    cfg = NSAConfig(**SMALL)
    p_slc = torch.zeros(1, 2, 8, 4, device=DEV)
    kw = _select_kw(cfg)
    with pytest.raises(ValueError, match="expected scores"):
        select_blocks(p_slc[0], kv_len=64, **kw)
    with pytest.raises(ValueError, match="float32"):
        select_blocks(p_slc.double(), kv_len=64, **kw)
    with pytest.raises(ValueError, match="4 blocks, but 80 keys"):
        select_blocks(p_slc, kv_len=80, **kw)
    with pytest.raises(ValueError, match="shorter"):
        select_blocks(p_slc, kv_len=4, **{**kw, "select_block": 1})
    with pytest.raises(ValueError, match="num_selected"):
        select_blocks(p_slc, kv_len=64, **{**kw, "num_selected": 0})
    idx, cnt, full = select_blocks(p_slc[:, :, :0], kv_len=64, **kw)
    assert idx.shape == (1, 2, 0, 4) and cnt.shape == (1, 2, 0) and full.dtype == torch.bool


def test_gradients_do_not_depend_on_the_memory_layout_of_q_and_the_output_gradient():
    """The kernels read q, the output and its gradient through their strides: a ``q`` that is a
    transposed view (``[B, T, H, D]`` storage, so the output follows it) and an output gradient in
    yet another layout give exactly the gradients of contiguous inputs, through the compressed
    branch's kernels and through the block-sparse ones (whole method)."""
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 48, 48, 32, seed=9, device=DEV)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)).to(DEV)
    q_view = q.transpose(1, 2).contiguous().transpose(1, 2)  # same values, [B, T, H, D] storage
    g_view = g.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)  # [T, B, H, D] storage
    assert not q_view.is_contiguous() and not g_view.is_contiguous()

    def grads(qq, gg, whole):
        qq, kk, vv = (t.detach().clone().requires_grad_() if t is not qq else t.detach().requires_grad_()
                      for t in (qq, k, v))
        if whole:
            out = longattn.attention(qq, kk, vv, method="nsa", backend="triton", **SMALL)
        else:
            kc, vc = nsa_compress(kk, vv, cfg)
            out, _ = compressed_attention(qq, kc, vc, kv_len=48, scale=32 ** -0.5, **_kw(cfg))
        return torch.autograd.grad(out, (qq, kk, vv), gg)

    for whole in (False, True):
        for a, b in zip(grads(q_view, g_view, whole), grads(q, g, whole)):
            assert torch.equal(a, b), whole


@pytest.mark.parametrize("tiles", [
    {"cmp_bwd_dq": dict(rows=32, block_n=16), "cmp_bwd_dkdv": dict(rows=16, block_n=32)},
    {"cmp_bwd_dq": dict(rows=16, block_n=32), "cmp_bwd_dkdv": dict(rows=32, block_n=16, num_warps=2)},
])
def test_compressed_backward_tiles_of_each_kernel(tiles, monkeypatch):
    """Each backward kernel takes its own tile shape (``LAUNCH_OVERRIDES``, the tuning hook of
    ``benchmarks/nsa_tile_sweep.py``): other shapes than the defaults, different for the dq and
    the dk/dv kernel, give gradients within the same bounds of fp64."""
    monkeypatch.setattr(nsa_kernels, "LAUNCH_OVERRIDES", dict(tiles))
    for case in ((70, 70, 4, 2, 64, torch.float32), (100, 100, 4, 1, 64, torch.bfloat16)):
        test_compressed_attention_gradients_match_fp64(*case)


@pytest.mark.parametrize("dtype,D", [(torch.bfloat16, 128), (torch.float32, 80), (torch.float16, 64)])
def test_backward_delta_is_the_row_dot_in_fp32(dtype, D):
    """``backward_delta`` (one-pass kernel) against fp64 ``rowsum(dO * O)``: inputs as views of
    ``[B, T, H, D]`` tensors (strided along T and H), fp32 output laid out ``[B, H, Tq]``
    contiguous; the bound is fp32 summation rounding of D products."""
    from longattn.kernels.online_softmax import backward_delta

    g = torch.Generator().manual_seed(D)
    a, b = (torch.randn(2, 37, 3, D, generator=g).to(device=DEV, dtype=dtype).transpose(1, 2) for _ in range(2))
    got = backward_delta(a, b)
    want = (a.double() * b.double()).sum(-1)
    assert got.dtype == torch.float32 and got.shape == (2, 3, 37) and got.is_contiguous()
    bound = D * 2 ** -23 * (a.double() * b.double()).abs().sum(-1)
    assert torch.all((got.double() - want).abs() <= bound)
    assert backward_delta(a[:, :, :0], b[:, :, :0]).shape == (2, 3, 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("per_query", [False, True])
def test_combine_kernel_matches_nsa_combine(dtype, per_query):
    """The fused gated sum (``combine_branches``) against the specification ``nsa_combine`` and
    fp64: forward and gradients of the three branches (and of per-query gates), with strided
    branch views. The output and the branch gradients ``g_i * dO`` are rounded once to their
    dtype: within half an ulp of the exact value (one ulp for bf16 in Triton's interpreter, which
    converts fp32 to bf16 by truncation where the GPU rounds to nearest), plus fp32 accumulation
    for the sum."""
    from longattn.kernels import interpreting
    from longattn.kernels.nsa.combine import combine_branches
    from longattn.methods.nsa import nsa_combine

    g = torch.Generator().manual_seed(7)
    B, H, T, D = 2, 3, 41, 80
    outs = [torch.randn(B, T, H, D, generator=g).to(device=DEV, dtype=dtype).transpose(1, 2).requires_grad_()
            for _ in range(3)]
    gates = (torch.rand(B, H, T, 3, generator=g).to(DEV).requires_grad_() if per_query else (0.25, 0.5, 1.3))
    dout = torch.randn(B, H, T, D, generator=g).to(device=DEV, dtype=dtype)
    got = combine_branches(*outs, gates)
    want = nsa_combine(*outs, gates)
    assert got.dtype == want.dtype == dtype and got.shape == (B, H, T, D)
    rounding = {torch.bfloat16: 2 ** -8, torch.float16: 2 ** -11, torch.float32: 2 ** -24}[dtype]
    if interpreting() and dtype == torch.bfloat16:
        rounding *= 2
    tiny = 2 ** -24 if dtype == torch.float16 else 0.0  # fp16's subnormal spacing (absolute)
    o64 = [o.detach().double() for o in outs]
    # the gates as the fp32 values both the kernel and the specification multiply by
    g64 = ([gates.detach().double()[..., i, None] for i in range(3)] if per_query
           else torch.tensor(gates, dtype=torch.float32).double().tolist())
    exact = sum(gi * o for gi, o in zip(g64, o64))
    bound = exact.abs() * rounding + tiny + 8 * 2 ** -24 * sum((gi * o).abs() for gi, o in zip(g64, o64))
    assert torch.all((got.double() - exact).abs() <= bound)
    assert (got.double() - exact).abs().max() <= (want.double() - exact).abs().max() * 2  # as close as the spec

    inputs = outs + ([gates] if per_query else [])
    g_got = torch.autograd.grad(got, inputs, dout)
    for gi, grad in zip(g64, g_got[:3]):
        exact_grad = gi * dout.double()  # one product, rounded once (fp32 gates x dO)
        assert grad.dtype == dtype
        assert torch.all((grad.double() - exact_grad).abs() <= exact_grad.abs() * rounding * 1.01 + tiny)
    if per_query:  # sum over D of dO * o_i in fp32
        terms = [dout.double() * o for o in o64]
        dg_exact = torch.stack([t.sum(-1) for t in terms], -1)
        dg_bound = D * 2 ** -23 * torch.stack([t.abs().sum(-1) for t in terms], -1)
        assert g_got[3].dtype == torch.float32 and torch.all((g_got[3].double() - dg_exact).abs() <= dg_bound)


def test_combine_kernel_refuses_mismatched_branches():
    from longattn.kernels.nsa.combine import combine_branches

    a = torch.zeros(1, 2, 8, 16, device=DEV)
    with pytest.raises(ValueError, match="share one"):
        combine_branches(a, a, a[:, :, :4], (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="per-query gates"):
        combine_branches(a, a, a, torch.zeros(1, 2, 8, 2, device=DEV))
    with pytest.raises(ValueError, match="three numbers"):
        combine_branches(a, a, a, (1.0, 1.0))
