"""NSA's compressed-branch Triton kernels (longattn.kernels.nsa; Native Sparse Attention, Yuan
et al., 2025), run through the interpreter on CPU: the compressed attention against the dense
reference and an fp64 log-sum-exp, the selection scores against the chunked scan's
``block_scores``, the chosen blocks against the reference selection, the whole method
(``backend="triton"``) against ``backend="reference"``, ties, empty rows, bad inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import longattn
from longattn.backends import plain_precision
from longattn.kernels.nsa import compressed_attention, selection_scores
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
    k_cmp, v_cmp = nsa_compress(k, v, cfg)  # fp32 (mean phi)
    return q, k, v, k_cmp, v_cmp


def _scan_scores(q, k_cmp, cfg, kv_len, scale):
    """``p_slc`` as the chunked scan computes it (fp32 softmax, group sum, block_scores)."""
    B, H, Tq, D = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    nKB = -(-kv_len // cfg.select_block)
    pos = torch.arange(Tq, device=q.device) + kv_len - Tq
    visible = compressed_visibility(pos, nC, cfg)
    logits = q.float().reshape(B, Hkv, H // Hkv, Tq, D) @ k_cmp.float()[:, :, None].transpose(-1, -2) * scale
    p_grp = _masked_softmax(logits, visible).sum(2)
    return block_scores(p_grp, *overlap_ranges(nC, nKB, cfg, q.device)), logits.masked_fill(~visible, float("-inf"))


@pytest.mark.parametrize("Tq,Tk,H,Hkv,dtype", CASES)
def test_compressed_attention_and_scores_match_the_scan(Tq, Tk, H, Hkv, dtype):
    cfg = NSAConfig(**SMALL)
    q, _, _, k_cmp, v_cmp = _inputs(Tq, Tk, H, Hkv, dtype, cfg, seed=Tq + 3 * Tk + H * Hkv)
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


@pytest.mark.parametrize("dtype,H,Hkv,Tq,Tk", [(torch.float32, 4, 2, 64, 64), (torch.bfloat16, 4, 1, 90, 200),
                                               (torch.float32, 4, 1, 200, 200)])
def test_triton_forward_matches_reference(dtype, H, Hkv, Tq, Tk):
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 64, dtype=dtype, seed=Tq * 7 + Tk + H * Hkv, device=DEV)
    ref = longattn.attention(q.float(), k.float(), v.float(), method="nsa", backend="reference", **SMALL)
    with plain_precision():
        plain = longattn.attention(q, k, v, method="nsa", backend="reference", **SMALL)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels serve: no fallback warning
        out = longattn.attention(q, k, v, method="nsa", backend="triton", **SMALL)
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    bound = 2 * err(plain, ref) + FLOOR[dtype]
    assert err(out, ref) <= bound, (err(out, ref), bound)


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


def test_training_keeps_the_scan_and_unsupported_inputs_fall_back_with_a_warning():
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 32, 32, 64, seed=4, requires_grad=True, device=DEV)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not _triton_kernels_serve(q, k_cmp, v_cmp, cfg)  # autograd: the scan, silently
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
