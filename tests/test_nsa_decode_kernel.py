"""NSA decoding kernels (longattn.kernels.nsa.decode; Native Sparse Attention, Yuan et al., 2025),
run through the Triton interpreter on CPU: the split-K compressed branch, its log-sum-exp and the
selection-block scores against an independent fp64 computation (GQA 1/3/4, Tq 1..16, row tiles,
several split counts and tile sizes, NaN garbage past every sequence, NaN-poisoned buffers); the
per-row selection (``select_blocks(kv_lens=...)``) identical to the PyTorch path's, with exact
ties, sequences that see nothing, nKB not a power of two and K >= the eligible blocks;
``nsa_decode(backend="triton")`` against ``backend="reference"`` and per-sequence
``nsa_forward``; ``validate=False`` (same result, no host sync; CUDA-graph capture on a GPU);
compilation for sm_90 (shared memory, spills); bad inputs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from longattn.backends import plain_precision
from longattn.decode_nsa import _compressed_and_selection, _rank_blocks, _valid_tokens, nsa_decode
from longattn.decode_nsa import nsa_decode_compress
from longattn.kernels import triton_unavailable_reason
from longattn.methods.nsa import NSAConfig, nsa_forward

from .sm90 import SM90_SHARED, compile_sm90_script

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_REASON = triton_unavailable_reason(torch.device(DEV))
pytestmark = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")

CFG = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=24)
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}
D = 32
TMAX = 150  # 10 selection blocks of 16 keys (not a power of two), 18 compressed tokens


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def make_inputs(B, H, Hkv, Tq, lens, *, cfg=CFG, Tmax=TMAX, dtype=torch.float32, seed=0, zero_q=()):
    """Gaussian q, caches and their compressed tokens (fp32, nsa_decode_compress), NaN in the
    caches past each length and in every compressed token no query of its sequence can see;
    ``zero_q``: sequences whose queries are all 0 (uniform probabilities: exact score ties)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tmax, D, generator=g)
    v = torch.randn(B, Hkv, Tmax, D, generator=g)
    for b in zero_q:
        q[b] = 0.0
    seqlens = torch.tensor(lens, dtype=torch.int32)
    k_cmp, v_cmp = nsa_decode_compress(k, v, seqlens, cfg)
    for b, L in enumerate(lens):
        k[b, :, L:] = float("nan")
        v[b, :, L:] = float("nan")
        n_vis = cfg.num_compressed(L)
        k_cmp[b, :, n_vis:] = float("nan")
        v_cmp[b, :, n_vis:] = float("nan")
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return [t.to(DEV) for t in (q, k, v, seqlens, k_cmp, v_cmp)]


def fp64_compressed(q, k_cmp, v_cmp, seqlens, cfg, scale, n_blocks):
    """Independent fp64 computation of the compressed branch: ``(o, lse, p_slc)``."""
    B, H, Tq, _ = q.shape
    Hkv, nC = k_cmp.shape[1], k_cmp.shape[2]
    G = H // Hkv
    l, d, ls = cfg.compress_block, cfg.compress_stride, cfg.select_block
    pos = seqlens.long()[:, None] - Tq + torch.arange(Tq, device=q.device)  # [B, Tq]
    i = torch.arange(nC, device=q.device)
    vis = (i * d + l - 1)[None, None, :] <= pos[:, :, None]  # [B, Tq, nC]
    seen = vis.any(1)[:, None, :, None]  # tokens some query of the sequence sees
    kh = torch.where(seen, k_cmp.double(), 0.0).repeat_interleave(G, 1)  # [B, H, nC, D]
    vh = torch.where(seen, v_cmp.double(), 0.0).repeat_interleave(G, 1)
    s = (q.double() @ kh.transpose(-1, -2) * scale).masked_fill(~vis[:, None], float("-inf"))  # [B, H, Tq, nC]
    lse = torch.logsumexp(s, -1)  # -inf for a row that sees nothing
    prob = torch.where(vis[:, None], torch.exp(s - lse[..., None]), 0.0)
    o = prob @ vh
    j = torch.arange(n_blocks, device=q.device)
    overlap = ((i[:, None] * d < (j[None, :] + 1) * ls) & (i[:, None] * d + l > j[None, :] * ls)).double()
    p_slc = (prob @ overlap).reshape(B, Hkv, G, Tq, n_blocks).sum(2)
    return o, lse, p_slc


def torch_path(q, k_cmp, v_cmp, seqlens, cfg, scale, Tmax=TMAX):
    """The PyTorch path of nsa_decode (backend="reference"): ``(o_cmp, idx, counts)``."""
    Tq = q.shape[2]
    pos = seqlens.long()[:, None] - Tq + torch.arange(Tq, device=q.device)
    valid = _valid_tokens(seqlens, k_cmp.shape[2], cfg)
    return _compressed_and_selection(q, k_cmp, v_cmp, pos, valid, cfg, scale, -(-Tmax // cfg.select_block))


def kernel_path(q, k_cmp, v_cmp, seqlens, cfg, scale, Tmax=TMAX, **kw):
    """The kernels: ``(o_cmp, lse, p_slc, idx, counts)``."""
    from longattn.kernels.nsa import select_blocks
    from longattn.kernels.nsa.decode import nsa_decode_compressed

    n_blocks = -(-Tmax // cfg.select_block)
    o, lse, p_slc = nsa_decode_compressed(
        q, k_cmp, v_cmp, seqlens, compress_block=cfg.compress_block, compress_stride=cfg.compress_stride,
        select_block=cfg.select_block, num_blocks=n_blocks, scale=scale, **kw)
    idx, cnt, _ = select_blocks(p_slc, kv_len=Tmax, kv_lens=seqlens, select_block=cfg.select_block,
                                num_selected=cfg.num_selected, num_init_blocks=cfg.num_init_blocks,
                                num_local_blocks=cfg.num_local_blocks)
    return o, lse, p_slc, idx, cnt


@pytest.fixture
def poisoned(monkeypatch):
    import longattn.kernels.nsa.decode as mod

    monkeypatch.setattr(mod, "POISON_BUFFERS", True)


# ---------------------------------------------------------------------------- kernels vs fp64
# (H, Hkv, Tq, lens, dtype, num_splits, block_n): GQA 1, 3, 4; the first sequence sees no
# compressed token (shorter than compress_block); with Tq > 1 the second one's first rows see
# nothing and its last ones token 0; block_n=16 splits the 18 compressed tokens into two tiles
# (a block's tokens [2j - 1, 2j + 2) then cross a tile and a split boundary); more splits than
# tiles leaves some splits empty; H=8, Hkv=1, Tq=16 has 128 rows (two row tiles)
KERNEL_CASES = [
    (2, 2, 1, (10, 17, 150), torch.float32, None, None),
    (6, 2, 4, (10, 17, 150), torch.float32, 3, 16),
    (8, 2, 3, (10, 17, 133), torch.bfloat16, 5, 16),
    (8, 2, 1, (10, 100, 150), torch.bfloat16, None, None),
    (6, 2, 16, (16, 33, 150), torch.float32, 2, 16),
    (8, 1, 16, (16, 150), torch.float32, 1, 32),
]


@pytest.mark.parametrize("H,Hkv,Tq,lens,dtype,splits,block_n", KERNEL_CASES)
def test_kernels_match_fp64(poisoned, H, Hkv, Tq, lens, dtype, splits, block_n):
    q, _, _, seqlens, k_cmp, v_cmp = make_inputs(len(lens), H, Hkv, Tq, lens, dtype=dtype, seed=H + Tq + len(lens))
    scale = 1 / math.sqrt(D)
    o, lse, p_slc, _, _ = kernel_path(q, k_cmp, v_cmp, seqlens, CFG, scale, num_splits=splits, block_n=block_n)
    assert o.shape == q.shape and o.dtype == dtype and lse.shape == q.shape[:3] and lse.dtype == torch.float32
    assert p_slc.shape == (len(lens), Hkv, Tq, 10) and p_slc.dtype == torch.float32
    ref_o, ref_lse, ref_p = fp64_compressed(q, k_cmp, v_cmp, seqlens, CFG, scale, 10)

    assert not torch.isnan(o).any() and not torch.isnan(lse).any() and not torch.isnan(p_slc).any()
    blind = torch.isinf(ref_lse)  # [B, H, Tq]: rows that see no compressed token
    assert blind[0, :, 0].all()  # the case has some
    assert torch.equal(torch.isinf(lse), blind) and torch.all(lse[blind] == float("-inf"))
    assert torch.all(o[blind] == 0) and torch.all(p_slc[blind[:, ::H // Hkv]] == 0)
    fin = torch.isfinite(ref_lse)
    assert err(lse[fin], ref_lse[fin]) < 1e-5
    assert err(p_slc, ref_p) < 1e-5
    if dtype == torch.float32:
        assert err(o, ref_o) < 1e-5
    else:  # 2x the error of the plain bf16 computation (the PyTorch path) + floor
        with plain_precision():
            plain = torch_path(q, k_cmp, v_cmp, seqlens, CFG, scale)[0]
        assert err(o, ref_o) <= 2 * err(plain, ref_o) + FLOOR[dtype]


@pytest.mark.parametrize("splits", [1, 2, 4, 7])
def test_split_count_does_not_change_the_result(splits):
    """Split-K partials merged through their LSE: any split count gives the same values (up to
    fp32 rounding), including more splits than tiles."""
    q, _, _, seqlens, k_cmp, v_cmp = make_inputs(2, 4, 2, 2, (150, 77), seed=3)
    base = kernel_path(q, k_cmp, v_cmp, seqlens, CFG, 0.2, num_splits=1, block_n=16)
    got = kernel_path(q, k_cmp, v_cmp, seqlens, CFG, 0.2, num_splits=splits, block_n=16)
    for a, b in zip(base[:3], got[:3]):
        assert err(a, b) < 1e-6
    assert torch.equal(base[3], got[3]) and torch.equal(base[4], got[4])


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (16, 16, 16), (48, 8, 16), (32, 8, 128)])
def test_other_block_geometries(l, d, ls):
    """Spill of 0, 1, 3, 5 tokens; one or several tokens per block; a block wider than a tile."""
    cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=ls, num_selected=4, window=64)
    Tmax = 300
    lens = (l - 1, 140, 300)
    q, _, _, seqlens, k_cmp, v_cmp = make_inputs(3, 4, 2, 2, lens, cfg=cfg, Tmax=Tmax, seed=l + d + ls)
    n_blocks = -(-Tmax // ls)
    o, lse, p_slc, idx, cnt = kernel_path(q, k_cmp, v_cmp, seqlens, cfg, 0.2, Tmax=Tmax, num_splits=3)
    ref_o, ref_lse, ref_p = fp64_compressed(q, k_cmp, v_cmp, seqlens, cfg, 0.2, n_blocks)
    assert err(o, ref_o) < 1e-5 and err(p_slc, ref_p) < 1e-5
    fin = torch.isfinite(ref_lse)
    assert torch.equal(fin, torch.isfinite(lse)) and err(lse[fin], ref_lse[fin]) < 1e-5
    _, ref_idx, ref_cnt = torch_path(q, k_cmp, v_cmp, seqlens, cfg, 0.2, Tmax=Tmax)
    assert torch.equal(idx, ref_idx) and torch.equal(cnt, ref_cnt)


def test_compressed_token_dtypes():
    """bf16 tokens with bf16 queries (the native 16-bit dot), fp64 tokens (computed in fp32, as
    the PyTorch path does), fp16 tokens with bf16 queries (both upcast)."""
    q, _, _, seqlens, k_cmp, v_cmp = make_inputs(3, 4, 2, 2, (10, 17, 150), dtype=torch.bfloat16, seed=8)
    for kdt in (torch.bfloat16, torch.float64, torch.float16):
        kc, vc = k_cmp.to(kdt), v_cmp.to(kdt)
        o, lse, p_slc, idx, cnt = kernel_path(q, kc, vc, seqlens, CFG, 0.2)
        ref_o, ref_lse, ref_p = fp64_compressed(q, kc, vc, seqlens, CFG, 0.2, 10)
        fin = torch.isfinite(ref_lse)
        assert err(lse[fin], ref_lse[fin]) < 1e-5 and err(p_slc, ref_p) < 1e-5
        with plain_precision():
            plain = torch_path(q, kc, vc, seqlens, CFG, 0.2)[0]
        assert err(o, ref_o) <= 2 * err(plain, ref_o) + FLOOR[torch.bfloat16], kdt


# ---------------------------------------------------------------------------- selection
# (H, Hkv, Tq, lens, cfg kwargs, zero_q)
SELECT_CASES = [
    (4, 2, 1, (10, 20, 140), {}, ()),
    (6, 2, 4, (10, 17, 150), dict(num_selected=16), ()),  # K >= every row's eligible blocks
    (8, 2, 3, (15, 64, 150), dict(num_selected=5, num_init_blocks=0, num_local_blocks=0), (1,)),
    (4, 4, 2, (40, 150, 150), dict(num_selected=6, num_init_blocks=2, num_local_blocks=1), (0, 2)),
    (6, 2, 16, (16, 100, 150), dict(num_selected=3, num_init_blocks=0, num_local_blocks=3), (1,)),
]


@pytest.mark.parametrize("H,Hkv,Tq,lens,cfg_kw,zero_q", SELECT_CASES)
def test_selection_identical_to_the_pytorch_path(H, Hkv, Tq, lens, cfg_kw, zero_q):
    """The kernels pick exactly the PyTorch path's blocks. ``zero_q`` sequences have uniform
    probabilities, so their blocks with the same number of visible tokens tie exactly in both
    paths (ties to the lower index); rows that see nothing score every block 0."""
    cfg = NSAConfig(**{**CFG.__dict__, **cfg_kw})
    q, _, _, seqlens, k_cmp, v_cmp = make_inputs(len(lens), H, Hkv, Tq, lens, cfg=cfg, seed=H * Tq, zero_q=zero_q)
    scale = 1 / math.sqrt(D)
    o, _, p_slc, idx, cnt = kernel_path(q, k_cmp, v_cmp, seqlens, cfg, scale, num_splits=2, block_n=16)
    ref_o, ref_idx, ref_cnt = torch_path(q, k_cmp, v_cmp, seqlens, cfg, scale)
    K = min(cfg.num_selected, 10)
    assert idx.shape == ref_idx.shape == (len(lens), Hkv, Tq, K) and idx.dtype == torch.int32
    assert cnt.shape == ref_cnt.shape and cnt.dtype == torch.int32
    assert torch.equal(cnt, ref_cnt)
    assert torch.equal(idx, ref_idx)
    assert err(o, ref_o) < 1e-5
    if zero_q:  # the ties are real: equal positive scores among the last row's blocks
        b = max(zero_q, key=lambda i: lens[i])
        scores = [x for x in p_slc[b, 0, -1].tolist() if x > 0]
        assert len(set(scores)) < len(scores)
    if "num_selected" in cfg_kw and cfg.num_selected >= 10:  # every eligible block is kept
        pos = seqlens.long()[:, None] - Tq + torch.arange(Tq, device=DEV)
        assert torch.equal(cnt.long(), (pos // cfg.select_block + 1)[:, None].expand_as(cnt))


def _score_rows(shape, seed, kind):
    g = torch.Generator().manual_seed(seed)
    if kind == "ties":  # integer-valued: exact ties, also at the K-th score
        s = torch.randint(0, 3, shape, generator=g).float()
    else:
        s = torch.randn(*shape, generator=g)
        u = torch.rand(shape, generator=g)
        s = torch.where(u < 0.1, float("nan"), torch.where(u < 0.2, float("inf"), torch.where(u < 0.3, -0.0, s)))
    return s.to(DEV)


@pytest.mark.parametrize("kind", ["ties", "special"])
def test_ranking_with_per_sequence_lengths(kind):
    """``select_blocks(kv_lens=...)`` on given scores equals the PyTorch ranking rule bit for
    bit, with one length per sequence (the additive change to the ranking kernel)."""
    from longattn.kernels.nsa import select_blocks

    for Tq, lens, n in [(1, (1, 16, 17, 150), 4), (3, (3, 40, 150, 100), 6), (16, (16, 150, 31, 64), 16)]:
        cfg = NSAConfig(compress_block=16, compress_stride=8, select_block=16, num_selected=n, window=16,
                        num_init_blocks=1, num_local_blocks=2)
        seqlens = torch.tensor(lens, dtype=torch.int64, device=DEV)
        p_slc = _score_rows((len(lens), 2, Tq, 10), seed=Tq + n, kind=kind)
        idx, cnt, full = select_blocks(p_slc, kv_len=TMAX, kv_lens=seqlens, select_block=16, num_selected=n,
                                       num_init_blocks=1, num_local_blocks=2)
        pos = seqlens[:, None] - Tq + torch.arange(Tq, device=DEV)
        ref_idx, ref_cnt = _rank_blocks(p_slc, pos, cfg)
        assert torch.equal(idx, ref_idx) and torch.equal(cnt, ref_cnt)
        used = torch.arange(idx.shape[-1], device=DEV) < cnt[..., None]
        assert torch.equal(full, used & ((idx + 1) * 16 - 1 <= pos[:, None, :, None]))


# ---------------------------------------------------------------------------- nsa_decode
def per_sequence(q, k, v, seqlens, cfg=CFG):
    outs = []
    for b, L in enumerate(seqlens.tolist()):
        outs.append(nsa_forward(q[b : b + 1], k[b : b + 1, :, :L], v[b : b + 1, :, :L], cfg, backend="reference"))
    return torch.cat(outs, 0)


# (dtype, H, Hkv, Tq): GQA 1, 3, 4, each with one and several queries per sequence
DECODE_CASES = [
    (torch.float32, 2, 2, 1), (torch.float32, 6, 2, 4), (torch.float32, 8, 2, 1), (torch.float32, 8, 2, 3),
    (torch.bfloat16, 2, 2, 3), (torch.bfloat16, 6, 2, 1), (torch.bfloat16, 8, 2, 1), (torch.bfloat16, 8, 2, 4),
]


@pytest.mark.parametrize("dtype,H,Hkv,Tq", DECODE_CASES)
def test_nsa_decode_triton_matches_reference_and_nsa_forward(dtype, H, Hkv, Tq):
    q, k, v, seqlens, k_cmp, v_cmp = make_inputs(3, H, Hkv, Tq, (10, 17, 150), dtype=dtype, seed=H * 7 + Tq)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the kernels serve: no fallback warning
        out = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="triton")
    assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
    ref = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="reference")
    if dtype == torch.float32:
        assert err(out, ref) < 1e-5
        assert err(out, per_sequence(q, k, v, seqlens)) < 1e-5
        return
    spec = per_sequence(q.float(), k.float(), v.float(), seqlens)
    with plain_precision():
        plain = per_sequence(q, k, v, seqlens)
    for b in range(3):  # per sequence: 2x the plain-bf16 error + floor
        bound = 2 * err(plain[b], spec[b]) + FLOOR[dtype]
        assert err(out[b], spec[b]) <= bound, (b, err(out[b], spec[b]), bound)
        assert err(ref[b], spec[b]) <= bound


def test_validate_false_gives_the_same_result_without_a_host_sync(monkeypatch):
    """``validate=False`` skips the one host sync (the length and finiteness check) and changes
    nothing else: no tensor is read back on the host during the call."""
    q, k, v, seqlens, k_cmp, v_cmp = make_inputs(3, 6, 2, 1, (10, 17, 150), seed=21)
    kw = dict(config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="triton")
    checked = nsa_decode(q, k, v, seqlens, **kw)

    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync: a tensor was read back on the host")

    if DEV == "cuda":
        torch.cuda.set_sync_debug_mode("error")  # raises on any synchronising CUDA call
        try:
            fast = nsa_decode(q, k, v, seqlens, validate=False, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    else:  # the interpreter has no device sync: refuse every read-back to the host instead
        for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
            monkeypatch.setattr(torch.Tensor, name, refuse)
        fast = nsa_decode(q, k, v, seqlens, validate=False, **kw)
        with pytest.raises(AssertionError, match="host sync"):  # the check itself does sync
            nsa_decode(q, k, v, seqlens, validate=True, **kw)
        monkeypatch.undo()
    assert torch.equal(fast, checked)


@pytest.mark.skipif(DEV != "cuda", reason="CUDA graphs need a GPU")
def test_cuda_graph_capture_and_replay():
    q, k, v, seqlens, k_cmp, v_cmp = make_inputs(3, 8, 2, 1, (10, 17, 150), dtype=torch.bfloat16, seed=4)
    kw = dict(config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="triton", validate=False)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        nsa_decode(q, k, v, seqlens, **kw)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = nsa_decode(q, k, v, seqlens, **kw)
    # a new step: other queries and lengths (within the valid keys) in the captured buffers
    q2, _, _, _, _, _ = make_inputs(3, 8, 2, 1, (10, 17, 150), dtype=torch.bfloat16, seed=5)
    q.copy_(q2)
    seqlens.copy_(torch.tensor([9, 16, 90], dtype=torch.int32))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, nsa_decode(q, k, v, seqlens, **kw))


def test_fallback_for_a_geometry_the_kernels_do_not_take(monkeypatch):
    """A selection block overlapping more compressed tokens than the score merge holds for a
    KV head's rows (here: the merge's budget lowered below this config's 2 rows x 4 tokens), or
    a merge grid past CUDA's limit (here: the limit lowered): the compressed branch and the
    selection run in PyTorch, with a RuntimeWarning; the result is unchanged."""
    import longattn.kernels.nsa.decode as mod

    q, k, v, seqlens, k_cmp, v_cmp = make_inputs(2, 4, 2, 1, (10, 150), seed=6)
    base = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="triton")
    kw = dict(compress_block=16, compress_stride=8, select_block=16)
    assert mod.decode_unsupported_reason(q, k_cmp, **kw, num_blocks=10) is None
    monkeypatch.setattr(mod, "MAX_GRID_Y", 2 + 9)  # 2 row programs + 10 one-block chunks
    monkeypatch.setattr(mod, "MERGE_ELEMENTS", 8)
    assert "grid limit of 11" in mod.decode_unsupported_reason(q, k_cmp, **kw, num_blocks=10)
    with pytest.raises(ValueError, match="grid limit"):
        mod.nsa_decode_compressed(q, k_cmp, v_cmp, seqlens, **kw, num_blocks=10, scale=0.2)
    monkeypatch.setattr(mod, "MERGE_ELEMENTS", 4)
    assert "at most 4" in mod.decode_unsupported_reason(q, k_cmp, **kw)
    with pytest.warns(RuntimeWarning, match="NSA decode kernels cannot serve"):
        out = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="triton")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" falls back silently
        auto = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="auto")
    ref = nsa_decode(q, k, v, seqlens, config=CFG, k_cmp=k_cmp, v_cmp=v_cmp, backend="reference")
    assert err(out, ref) < 1e-5 and err(out, base) < 1e-5 and torch.equal(auto, out)


# ---------------------------------------------------------------------------- GPU compilation
MAX_SPILL = 64  # bytes of ptxas spill stores tolerated (the tile table was chosen for none, 8 at most)

_COMPILE_SCRIPT = r"""
from longattn.kernels.nsa.decode import MERGE_ELEMENTS, _cmp_decode_merge, _cmp_decode_split, decode_tile_config
from longattn.kernels.nsa.kernel import _select_rank


out = {}
for k_dtype, q_dtype, D, G, Tq in [("fp32", "bf16", 128, 4, 1), ("bf16", "bf16", 128, 8, 4),
                                   ("fp32", "fp32", 256, 4, 1), ("fp32", "bf16", 64, 1, 16)]:
    cfg = decode_tile_config(G, Tq, D, fp32=k_dtype == "fp32", compress_block=32, compress_stride=16, select_block=64)
    ptr = {"Q": "*" + q_dtype, "K": "*" + k_dtype, "V": "*" + k_dtype, "Lens": "*i32"}
    ptr.update({n: "*fp32" for n in ("OP", "LP", "SR")})
    const = dict(G=G, TQ=Tq, HEAD_DIM=D, F32=k_dtype == "fp32", PREC="tf32x3", UPCAST=False,
                 **{n: cfg[n] for n in ("BLOCK_M", "BLOCK_N")})
    out[f"split[{k_dtype} K, {q_dtype} q, D={D}, G={G}, Tq={Tq}]"] = compile_sm90(
        _cmp_decode_split, ptr, const, ("qk_scale",), cfg["num_warps"], cfg["num_stages"])
for G, Tq, D, S in [(4, 1, 128, 64), (8, 16, 256, 8)]:
    GP, TQP = G, 1 << (Tq - 1).bit_length()
    ptr = {n: "*fp32" for n in ("OP", "LP", "SR", "LSE", "PS")}
    ptr.update({"Lens": "*i32", "O": "*bf16"})
    const = dict(G=G, TQ=Tq, GP=GP, TQP=TQP, HEAD_DIM=D, S_PAD=S, R=4, E=1, REP=8,
                 NBC=max(1, MERGE_ELEMENTS // (GP * TQP * 8)))
    out[f"merge[G={G}, Tq={Tq}, D={D}, S={S}]"] = compile_sm90(_cmp_decode_merge, ptr, const, warps=4 if D <= 128 else 8)
ptr = {"S": "*fp32", "IDX": "*i32", "CNT": "*i32", "FULL": "*i8", "KV_LENS": "*i32"}
# the layouts _rank_layout picks: one row per program, a warp per 512 columns
out["rank[kv_lens]"] = compile_sm90(_select_rank, ptr, dict(BLOCK_R=1, NB_PAD=1024, K_PAD=16, HAS_KV_LENS=True,
                                                             CAUSAL=True), warps=2)
# block top-k's rows (a query block each, 1024 key blocks at 128k), bidirectional
out["rank[topk, bidirectional]"] = compile_sm90(_select_rank, ptr, dict(BLOCK_R=1, NB_PAD=1024, K_PAD=16,
                                                                        HAS_KV_LENS=False, CAUSAL=False), warps=2)
# 512 blocks in one warp (block top-k at 64k); NSA's limit of 8192 blocks on 16 warps
out["rank[one warp]"] = compile_sm90(_select_rank, ptr, dict(BLOCK_R=1, NB_PAD=512, K_PAD=16, HAS_KV_LENS=False,
                                                              CAUSAL=True), warps=1)
out["rank[8192 blocks]"] = compile_sm90(_select_rank, ptr, dict(BLOCK_R=1, NB_PAD=8192, K_PAD=16, HAS_KV_LENS=False,
                                                                 CAUSAL=True), warps=16)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_within_shared_memory_without_spilling():
    """The decode kernels (and the ranking kernel with per-sequence lengths, and bidirectional
    as block top-k runs it) compile for the H200
    (sm_90) with the ptxas that ships with Triton (:mod:`tests.sm90`): each configuration
    :func:`decode_tile_config` picks fits shared memory and (almost) does not spill."""
    results = compile_sm90_script(_COMPILE_SCRIPT)
    assert len(results) == 10
    for name, (shared, spill) in results.items():
        assert 0 <= shared <= SM90_SHARED, (name, shared)
        assert spill <= MAX_SPILL, (name, spill)


# ---------------------------------------------------------------------------- bad input
def _call(q, k_cmp, v_cmp, seqlens, **kw):
    from longattn.kernels.nsa.decode import nsa_decode_compressed

    args = dict(compress_block=16, compress_stride=8, select_block=16, num_blocks=10, scale=0.2)
    args.update(kw)
    return nsa_decode_compressed(q, k_cmp, v_cmp, seqlens, **args)


def test_bad_inputs_raise():
    q, k, v, s, kc, vc = make_inputs(3, 4, 2, 2, (10, 17, 150), seed=1)
    with pytest.raises(ValueError, match="expected q"):
        _call(q[0], kc, vc, s)
    with pytest.raises(ValueError, match="v_cmp must have"):
        _call(q, kc, vc[:, :, :3], s)
    with pytest.raises(ValueError, match="batch or head dim"):
        _call(q, kc[..., :16], vc[..., :16], s)
    with pytest.raises(ValueError, match="multiple of k_cmp's heads"):
        _call(q[:, :3], kc, vc, s)
    with pytest.raises(ValueError, match="Tq=17"):
        _call(torch.zeros(3, 4, 17, D, device=DEV), kc, vc, s)
    with pytest.raises(ValueError, match="cache_seqlens"):
        _call(q, kc, vc, s.float())
    with pytest.raises(ValueError, match="cache_seqlens"):
        _call(q, kc, vc, s[:2])
    with pytest.raises(TypeError, match="k_cmp must be a torch.Tensor"):
        _call(q, None, vc, s)
    with pytest.raises(ValueError, match="num_blocks=8"):
        _call(q, kc, vc, s, num_blocks=8)
    with pytest.raises(ValueError, match="compress_stride"):
        _call(q, kc, vc, s, compress_stride=0)
    with pytest.raises(ValueError, match="float64"):
        _call(q.double(), kc, vc, s)
    with pytest.raises(ValueError, match="integer|floating"):
        _call(q, kc.long(), vc.long(), s)
    with pytest.raises(ValueError, match="multiples of compress_stride"):
        _call(q, kc, vc, s, select_block=20)
    with pytest.raises(ValueError, match="block_n"):
        _call(q, kc, vc, s, block_n=24)
    with pytest.raises(ValueError, match="block_n"):
        _call(q, kc, vc, s, block_n=2)
    with pytest.raises(ValueError, match="num_splits"):
        _call(q, kc, vc, s, num_splits=0)
    with pytest.raises(ValueError, match="scale"):
        _call(q, kc, vc, s, scale=float("nan"))
    with pytest.raises(ValueError, match="is on meta"):
        _call(q, kc, vc, s.to("meta"))
    with pytest.raises(TypeError, match="validate must be a bool"):
        nsa_decode(q, k, v, s, config=CFG, backend="triton", validate=1)

    from longattn.kernels.nsa import select_blocks

    p = torch.zeros(3, 2, 2, 10, device=DEV)
    kw = dict(kv_len=TMAX, select_block=16, num_selected=4, num_init_blocks=1, num_local_blocks=2)
    with pytest.raises(TypeError, match="kv_lens"):
        select_blocks(p, kv_lens=s.float(), **kw)
    with pytest.raises(ValueError, match="kv_lens must have shape"):
        select_blocks(p, kv_lens=s[:2], **kw)


def test_empty_batch_and_no_compressed_token():
    q, _, _, s, kc, vc = make_inputs(1, 4, 2, 2, (10,), Tmax=12, seed=2)
    assert kc.shape[2] == 0  # the cache is shorter than one compression block
    o, lse, p_slc = _call(q, kc, vc, s, num_blocks=1)
    assert torch.all(o == 0) and torch.all(lse == float("-inf")) and torch.all(p_slc == 0)
    o, lse, p_slc = _call(q[:0], kc[:0], vc[:0], s[:0], num_blocks=1)
    assert o.shape == (0, 4, 2, D) and p_slc.shape == (0, 2, 2, 1)
