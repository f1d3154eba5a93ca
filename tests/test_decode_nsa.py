"""NSA decoding (longattn.decode_nsa.nsa_decode, Native Sparse Attention, Yuan et al., 2025):
its specification is the per-sequence ``nsa_forward(..., backend="reference")`` over each valid
cache prefix; checked for both backends (the Triton one through the interpreter on CPU),
MHA/GQA, fp32/bf16, Tq in {1, 3}, with NaN garbage past every length; precomputed compressed
tokens; bounded reads; one check per bad input. The Triton path's own kernels (compressed
branch, block scores, ranking, ``validate=False``) are tested in test_nsa_decode_kernel.py."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from longattn.backends import plain_precision
from longattn.decode_nsa import nsa_decode, nsa_decode_compress
from longattn.kernels import triton_unavailable_reason
from longattn.methods.nsa import NSAConfig, nsa_forward

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_REASON = triton_unavailable_reason(torch.device(DEV))
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")
CFG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=24)
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}
TMAX = 150
# shorter than compress_block, shorter than window, more blocks (9) than num_selected (4)
LENS = (10, 20, 140)
D = 64


def make_inputs(B, H, Hkv, Tq, Tmax=TMAX, *, dtype=torch.float32, seed=0, lens=LENS, garbage=float("nan")):
    """Gaussian q and caches (generated on the CPU in fp32, then moved), ``garbage`` past each
    sequence's length."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tmax, D, generator=g)
    v = torch.randn(B, Hkv, Tmax, D, generator=g)
    for b, L in enumerate(lens):
        k[b, :, L:] = garbage
        v[b, :, L:] = garbage
    seqlens = torch.tensor(lens, dtype=torch.int32)
    return [t.to(DEV) for t in (q.to(dtype), k.to(dtype), v.to(dtype), seqlens)]


def per_sequence(q, k, v, seqlens, cfg=CFG, **kw):
    """The specification: nsa_forward over each valid prefix, concatenated over the batch."""
    outs = []
    for b, L in enumerate(seqlens.tolist()):
        outs.append(nsa_forward(q[b : b + 1], k[b : b + 1, :, :L], v[b : b + 1, :, :L], cfg,
                                backend="reference", **kw))
    return torch.cat(outs, 0)


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


BACKENDS = ["reference", pytest.param("triton", marks=needs_triton)]


# ---------------------------------------------------------------------------- equality
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("Tq", [1, 3])
def test_equals_per_sequence_nsa_forward(backend, dtype, H, Hkv, Tq):
    q, k, v, seqlens = make_inputs(3, H, Hkv, Tq, dtype=dtype, seed=Tq * 10 + H + Hkv)
    out = nsa_decode(q, k, v, seqlens, config=CFG, backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    if dtype == torch.float32:
        ref = per_sequence(q, k, v, seqlens)
        assert err(out, ref) < 1e-5
        return
    ref = per_sequence(q.float(), k.float(), v.float(), seqlens)
    with plain_precision():
        plain = per_sequence(q, k, v, seqlens)
    for b in range(3):  # per sequence: 2x the plain-bf16 error + floor
        bound = 2 * err(plain[b], ref[b]) + FLOOR[dtype]
        assert err(out[b], ref[b]) <= bound, (b, err(out[b], ref[b]), bound)


def test_sixteen_queries_and_auto_backend():
    q, k, v, seqlens = make_inputs(3, 4, 2, 16, lens=(16, 33, 150), seed=5)
    ref = per_sequence(q, k, v, seqlens)
    assert err(nsa_decode(q, k, v, seqlens, config=CFG, backend="reference"), ref) < 1e-5
    out = nsa_decode(q, k, v, seqlens, config=CFG)  # backend="auto"
    assert err(out, ref) < 1e-5


def test_custom_scale_and_default_config():
    cfg = NSAConfig()  # the paper's defaults: 512-token window, 64-key blocks
    q, k, v, seqlens = make_inputs(2, 2, 1, 2, Tmax=600, lens=(40, 600), seed=3)
    ref = per_sequence(q, k, v, seqlens, cfg, scale=0.07)
    out = nsa_decode(q, k, v, seqlens, scale=0.07, backend="reference")
    assert err(out, ref) < 1e-5


# ---------------------------------------------------------------------------- compressed tokens
@pytest.mark.parametrize("backend", BACKENDS)
def test_precomputed_compressed_tokens_give_the_same_result(backend):
    q, k, v, seqlens = make_inputs(3, 4, 2, 3, seed=7)
    k_cmp, v_cmp = nsa_decode_compress(k, v, seqlens, CFG)
    assert k_cmp.shape == (3, 2, CFG.num_compressed(TMAX), D) and k_cmp.dtype == torch.float32
    assert torch.isfinite(k_cmp).all() and torch.isfinite(v_cmp).all()  # garbage tokens zeroed
    base = nsa_decode(q, k, v, seqlens, config=CFG, backend=backend)
    out = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend=backend)
    assert torch.equal(out, base)

    # what a cache maintains incrementally: a new token every compress_stride keys, the mean
    # of the last compress_block keys; tokens past a sequence's end hold garbage (ignored)
    l, d = CFG.compress_block, CFG.compress_stride
    inc_k = torch.full_like(k_cmp, float("nan"))
    inc_v = torch.full_like(v_cmp, float("nan"))
    for b, L in enumerate(seqlens.tolist()):
        for t in range(1, L + 1):  # append key t-1
            if t >= l and (t - l) % d == 0:
                i = (t - l) // d
                inc_k[b, :, i] = k[b, :, t - l : t].float().mean(1)
                inc_v[b, :, i] = v[b, :, t - l : t].float().mean(1)
    out = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=inc_k, v_cmp=inc_v, backend=backend)
    assert err(out, base) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_compressed_tokens_in_the_input_dtype(backend):
    """``compressed_dtype="input"``: the cache's compressed tokens are the fp32 means rounded to
    bf16, and a step equals ``nsa_forward`` over the same tokens (the reference computes in fp32
    inside, so the two differ by the rounding of bf16 outputs only)."""
    cfg = dataclasses.replace(CFG, compressed_dtype="input")
    q, k, v, seqlens = make_inputs(3, 4, 2, 1, dtype=torch.bfloat16, seed=11)
    k_cmp, v_cmp = nsa_decode_compress(k, v, seqlens, cfg)
    k32, v32 = nsa_decode_compress(k, v, seqlens, CFG)
    assert k_cmp.dtype == v_cmp.dtype == torch.bfloat16
    assert torch.equal(k_cmp, k32.to(torch.bfloat16)) and torch.equal(v_cmp, v32.to(torch.bfloat16))
    out = nsa_decode(q, k, v, seqlens, config=cfg, backend=backend)
    assert torch.equal(out, nsa_decode(q, k, v, seqlens, config=cfg, k_cmp=k_cmp, v_cmp=v_cmp, backend=backend))
    ref = per_sequence(q, k, v, seqlens, cfg)
    # bf16 spacing at the outputs' magnitude; an output's rounding (or a branch's, before the
    # gated sum) may land one spacing apart when fp32 sums run in another order
    spacing = 2.0 ** (math.floor(math.log2(max(1.0, ref.abs().max().item()))) - 7)
    assert err(out, ref) <= 2 * spacing, (err(out, ref), spacing)


# ---------------------------------------------------------------------------- garbage, reads
@pytest.mark.parametrize("backend", BACKENDS)
def test_garbage_past_each_length_is_never_read(backend):
    q, k, v, seqlens = make_inputs(3, 4, 2, 3, seed=11, garbage=0.0)
    _, kn, vn, _ = make_inputs(3, 4, 2, 3, seed=11, garbage=float("nan"))
    _, ki, vi, _ = make_inputs(3, 4, 2, 3, seed=11, garbage=float("inf"))
    clean = nsa_decode(q, k, v, seqlens, config=CFG, backend=backend)
    assert torch.isfinite(clean).all()
    assert torch.equal(nsa_decode(q, kn, vn, seqlens, config=CFG, backend=backend), clean)
    assert torch.equal(nsa_decode(q, ki, vi, seqlens, config=CFG, backend=backend), clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_reads_are_bounded_by_selection_and_window(monkeypatch, backend):
    """Past the compressed tokens, a step reads only each query row's selected blocks (up to the
    query) and its window: every other key of the cache -- valid ones included -- is set to NaN
    for its (sequence, KV head) and the output does not change by a bit. The selection is the
    backend's own (``backend="triton"``: the NSA decode kernels and the ranking kernel; the
    PyTorch compressed branch must not run)."""
    import longattn.decode_nsa as mod

    q, k, v, seqlens = make_inputs(3, 4, 2, 3, seed=13)
    k_cmp, v_cmp = nsa_decode_compress(k, v, seqlens, CFG)  # from the clean cache
    kw = dict(config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend=backend)
    clean = nsa_decode(q, k, v, seqlens, **kw)
    assert torch.isfinite(clean).all()

    B, H, Tq, _ = q.shape
    Hkv, Tmax = k.shape[1], k.shape[2]
    pos = seqlens.long()[:, None] - Tq + torch.arange(Tq, device=q.device)
    n_blocks = -(-Tmax // CFG.select_block)
    if backend == "triton":
        _, idx, cnt = mod._compressed_and_selection_triton(q, k_cmp, v_cmp, seqlens, CFG, 0.125, n_blocks, Tmax)
    else:
        valid = mod._valid_tokens(seqlens, k_cmp.shape[2], CFG)
        _, idx, cnt = mod._compressed_and_selection(q, k_cmp, v_cmp, pos, valid, CFG, 0.125, n_blocks)
    allowed = torch.zeros(B, Hkv, Tmax, dtype=torch.bool)
    for b in range(B):
        for h in range(Hkv):
            for t in range(Tq):
                p = int(pos[b, t])
                for j in idx[b, h, t, : int(cnt[b, h, t])].tolist():
                    allowed[b, h, j * CFG.select_block : min((j + 1) * CFG.select_block, p + 1)] = True
                allowed[b, h, max(0, p - CFG.window + 1) : p + 1] = True
    assert (~allowed).sum() > allowed.sum()  # most of the cache is off limits
    allowed = allowed.to(DEV)[..., None]
    kp, vp = torch.where(allowed, k, float("nan")), torch.where(allowed, v, float("nan"))

    def refuse(*args, **kwargs):
        raise AssertionError("the PyTorch compressed branch ran on the triton path")

    if backend == "triton":
        monkeypatch.setattr(mod, "_compressed_and_selection", refuse)
    assert torch.equal(nsa_decode(q, kp, vp, seqlens, **kw), clean)


# ---------------------------------------------------------------------------- bad input
def _good():
    return make_inputs(3, 4, 2, 2, seed=1)


def test_bad_tq_too_many_queries():
    q, k, v, s = make_inputs(3, 4, 2, 17, lens=(20, 20, 20))
    with pytest.raises(ValueError, match="Tq=17"):
        nsa_decode(q, k, v, s, config=CFG)


def test_bad_length_shorter_than_tq():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="cache_seqlens"):
        nsa_decode(q, k, v, torch.tensor([1, 20, 30], dtype=torch.int32, device=DEV), config=CFG)


def test_bad_length_longer_than_cache():
    q, k, v, _ = _good()
    with pytest.raises(ValueError, match="cache_seqlens"):
        nsa_decode(q, k, v, torch.tensor([10, 20, TMAX + 1], dtype=torch.int32, device=DEV), config=CFG)


def test_bad_seqlens_dtype():
    q, k, v, s = _good()
    with pytest.raises(TypeError, match="cache_seqlens"):
        nsa_decode(q, k, v, s.float(), config=CFG)


def test_bad_seqlens_shape():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="cache_seqlens"):
        nsa_decode(q, k, v, s[:2], config=CFG)


def test_bad_q_rank():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="q must have 4 dims"):
        nsa_decode(q[0], k, v, s, config=CFG)


def test_bad_gqa_heads():
    q, k, v, s = make_inputs(3, 3, 2, 2)
    with pytest.raises(ValueError, match="heads"):
        nsa_decode(q, k, v, s, config=CFG)


def test_bad_v_cache_shape():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="v_cache"):
        nsa_decode(q, k, v[:, :, :100], s, config=CFG)


def test_bad_dtype_mismatch():
    q, k, v, s = _good()
    with pytest.raises(TypeError, match="dtype"):
        nsa_decode(q, k.double(), v.double(), s, config=CFG)


def test_bad_integer_cache_dtype():
    q, k, v, s = _good()
    with pytest.raises(TypeError, match="k_cache"):
        nsa_decode(q, k.long(), v, s, config=CFG)


def test_bad_device():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="cache_seqlens is on meta"):
        nsa_decode(q, k, v, s.to("meta"), config=CFG)


def test_bad_k_cmp_shape():
    q, k, v, s = _good()
    k_cmp, v_cmp = nsa_decode_compress(k, v, s, CFG)
    with pytest.raises(ValueError, match="k_cmp must have shape"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp[:, :, :-1], v_cmp=v_cmp)


def test_bad_v_cmp_shape():
    q, k, v, s = _good()
    k_cmp, v_cmp = nsa_decode_compress(k, v, s, CFG)
    with pytest.raises(ValueError, match="v_cmp must have shape"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp[..., :32])


def test_bad_k_cmp_alone():
    q, k, v, s = _good()
    k_cmp, _ = nsa_decode_compress(k, v, s, CFG)
    with pytest.raises(ValueError, match="v_cmp is missing"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp)


def test_bad_k_cmp_dtype():
    q, k, v, s = _good()
    k_cmp, v_cmp = nsa_decode_compress(k, v, s, CFG)
    with pytest.raises(TypeError, match="k_cmp"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp.long(), v_cmp=v_cmp)


def test_bad_k_cmp_device():
    q, k, v, s = _good()
    k_cmp, v_cmp = nsa_decode_compress(k, v, s, CFG)
    with pytest.raises(ValueError, match="k_cmp is on meta"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp.to("meta"), v_cmp=v_cmp)


def test_bad_k_cmp_from_another_config():
    q, k, v, s = _good()
    other = NSAConfig(compress_block=32, compress_stride=16, select_block=16, num_selected=4, window=24)
    k_cmp, v_cmp = nsa_decode_compress(k, v, s, other)
    with pytest.raises(ValueError, match="k_cmp must have shape"):
        nsa_decode(q, k, v, s, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp)


def test_bad_config_type():
    q, k, v, s = _good()
    with pytest.raises(TypeError, match="config"):
        nsa_decode(q, k, v, s, config=dict(window=24))


def test_bad_compress_config_type():
    _, k, v, s = _good()
    with pytest.raises(TypeError, match="config"):
        nsa_decode_compress(k, v, s, "nsa")


def test_bad_backend_name():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="backend"):
        nsa_decode(q, k, v, s, config=CFG, backend="flex")


def test_bad_backend_triton_for_fp64():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="backend='triton'"):
        nsa_decode(q.double(), k.double(), v.double(), s, config=CFG, backend="triton")


def test_bad_scale():
    q, k, v, s = _good()
    with pytest.raises(ValueError, match="scale"):
        nsa_decode(q, k, v, s, config=CFG, scale=-1.0)


def test_bad_nonfinite_q():
    q, k, v, s = _good()
    q[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="q contains NaN"):
        nsa_decode(q, k, v, s, config=CFG)
