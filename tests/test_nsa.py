"""NSA (Native Sparse Attention, Yuan et al., 2025): each branch against a dense-masked
reference built here with plain loops and explicit masks; the selection rule checked against
block scores computed here; reference vs flex for the whole method; the trainable module;
bad configs."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import longattn
from longattn.backends import plain_precision
from longattn.methods.nsa import (
    NSAConfig,
    nsa_compress,
    nsa_compressed_branch,
    nsa_selected_branch,
    nsa_selection,
    nsa_window_branch,
)
from longattn.nn import NativeSparseAttention

from .conftest import rand_qkv

BACKENDS = ["reference", "flex"]
# small blocks so that T of a few hundred is genuinely sparse in every branch
SMALL = dict(compress_block=16, compress_stride=8, select_block=16, num_selected=4, window=24)
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}


def attention_fp64(q, k, v, mask):
    """Softmax attention in fp64 under ``mask [B or 1, H or 1, Tq, Tk]`` (heads expanded
    here); a row with no visible key gives 0."""
    H = q.shape[1]
    k = k.double().repeat_interleave(H // k.shape[1], 1)
    v = v.double().repeat_interleave(H // v.shape[1], 1)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0)  # all-masked rows: NaN -> 0
    return p @ v


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def selected_sets(sel, b, h, t):
    n = int(sel.kv_num_blocks[b, h, t])
    return set(sel.kv_indices[b, h, t, :n].tolist())


CASES = [(90, 90, 4, 2), (40, 130, 4, 2), (77, 77, 2, 2)]  # (Tq, Tk, H, Hkv)


# ------------------------------------------------------------------ (a) compressed branch
@pytest.mark.parametrize("Tq,Tk,H,Hkv", CASES)
def test_compressed_branch_equals_mean_pooled_attention(Tq, Tk, H, Hkv):
    cfg = NSAConfig(**SMALL)
    l, d = cfg.compress_block, cfg.compress_stride
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 32, seed=Tq)
    # mean pooling by an explicit loop over blocks [i*d, i*d + l)
    nC = (Tk - l) // d + 1
    kc = torch.stack([k[:, :, i * d : i * d + l].double().mean(2) for i in range(nC)], 2)
    vc = torch.stack([v[:, :, i * d : i * d + l].double().mean(2) for i in range(nC)], 2)
    mask = torch.zeros(Tq, nC, dtype=torch.bool)
    for t in range(Tq):
        p = t + Tk - Tq
        for i in range(nC):
            mask[t, i] = i * d + l - 1 <= p
    expected = attention_fp64(q, kc, vc, mask[None, None])
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    assert k_cmp.shape == (2, Hkv, nC, 32)
    assert err(k_cmp, kc) < 1e-6 and err(v_cmp, vc) < 1e-6
    for backend in BACKENDS:
        out = nsa_compressed_branch(q, k_cmp, v_cmp, cfg, kv_len=Tk, backend=backend)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert err(out, expected) < 1e-5, backend
    # queries that see no compressed token get exactly 0
    blind = ~mask.any(1)
    if blind.any():
        assert (out[:, :, blind] == 0).all()


def test_compressed_branch_gradients_match_in_chunks(monkeypatch):
    """The chunked branch (recomputed per chunk in backward) has the dense reference's
    gradients with respect to q and the compressed keys and values."""
    import longattn.methods.nsa as nsa_mod

    monkeypatch.setattr(nsa_mod, "CHUNK_ELEMENTS", 4 * 2 * 12 * 11)  # chunks of 24 queries
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 2, 70, 100, 16, seed=12, dtype=torch.float64, requires_grad=True)
    g = torch.randn(q.shape, dtype=torch.float64)
    grads = {}
    for backend in BACKENDS:
        k_cmp, v_cmp = nsa_compress(k, v, cfg)
        out = nsa_compressed_branch(q, k_cmp, v_cmp, cfg, kv_len=100, backend=backend)
        grads[backend] = torch.autograd.grad(out, (q, k, v), g)
    for a, b in zip(grads["reference"], grads["flex"]):
        assert a.abs().max() > 0 and err(a, b) < 1e-10


def test_compressed_branch_with_keys_shorter_than_a_block():
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 2, 2, 10, 10, 16)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    assert k_cmp.shape[2] == 0
    for backend in BACKENDS:
        assert (nsa_compressed_branch(q, k_cmp, v_cmp, cfg, kv_len=10, backend=backend) == 0).all()


# ------------------------------------------------------------------ (a) selection rule
def block_scores_fp64(q, k, cfg, Tk):
    """``p_slc [B, Hkv, Tq, nKB]`` in fp64, by loops: p_cmp per query head over the visible
    compressed tokens, summed over overlapping compressed tokens and over the GQA group."""
    l, d, ls = cfg.compress_block, cfg.compress_stride, cfg.select_block
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    nC = (Tk - l) // d + 1 if Tk >= l else 0
    nKB = -(-Tk // ls)
    kc = torch.stack([k[:, :, i * d : i * d + l].double().mean(2) for i in range(nC)], 2) if nC else None
    overlap = [[i * d < (j + 1) * ls and i * d + l > j * ls for j in range(nKB)] for i in range(nC)]
    scores = torch.zeros(B, Hkv, Tq, nKB, dtype=torch.float64)
    for t in range(Tq):
        p = t + Tk - Tq
        vis = [i for i in range(nC) if i * d + l - 1 <= p]
        if not vis:
            continue
        for h in range(H):
            logits = (q[:, h, t].double()[:, None, :] * kc[:, h // G, vis]).sum(-1) / math.sqrt(D)  # [B, nv]
            p_cmp = torch.softmax(logits, -1)
            for a, i in enumerate(vis):
                for j in range(nKB):
                    if overlap[i][j]:
                        scores[:, h // G, t, j] += p_cmp[:, a]
    return scores


@pytest.mark.parametrize("Tq,Tk,H,Hkv", CASES)
def test_selection_follows_the_rule(Tq, Tk, H, Hkv):
    cfg = NSAConfig(**SMALL)
    ls, n = cfg.select_block, cfg.num_selected
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 32, seed=7 + Tq)
    k_cmp, _ = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=Tk)
    # one selection per KV head (shared by its GQA group), per query token, blocks of l'
    assert sel.kv_indices.shape[:3] == (2, Hkv, Tq)
    assert sel.q_block == 1 and sel.kv_block == ls and sel.num_heads == H
    scores = block_scores_fp64(q, k, cfg, Tk)
    nKB = scores.shape[-1]
    free_choices = 0
    for b in range(2):
        for hk in range(Hkv):
            for t in range(Tq):
                p = t + Tk - Tq
                own = p // ls
                eligible = {j for j in range(nKB) if j * ls <= p}
                forced = {j for j in eligible if j < cfg.num_init_blocks or own - cfg.num_local_blocks < j <= own}
                chosen = selected_sets(sel, b, hk, t)
                assert forced <= chosen, (b, hk, t)
                assert chosen <= eligible, (b, hk, t)
                assert len(chosen) == min(n, len(eligible)), (b, hk, t)
                rest = chosen - forced
                left = eligible - chosen
                if rest and left:
                    free_choices += 1
                    worst_kept = min(scores[b, hk, t, j].item() for j in rest)
                    best_left = max(scores[b, hk, t, j].item() for j in left)
                    assert worst_kept >= best_left - 1e-6, (b, hk, t, worst_kept, best_left)
    assert free_choices > 0  # the case really exercises the top-k


def test_selection_is_summed_over_the_gqa_group():
    """One KV head, four query heads: the selection is the top-k of the group's summed
    scores, which for some tokens differs from any single head's own top-k."""
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(1, 4, 1, 80, 80, 32, seed=11)
    k_cmp, _ = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=80)
    assert sel.kv_indices.shape[1] == 1 and sel.to_dense_mask().shape == (1, 1, 80, 80)
    group = block_scores_fp64(q, k, cfg, 80)[0, 0]  # [Tq, nKB]
    single = block_scores_fp64(q[:, :1], k, cfg, 80)[0, 0]  # head 0 alone

    def top(scores, t):
        p, ls = t, cfg.select_block
        own = p // ls
        forced = {j for j in range(own + 1) if j < cfg.num_init_blocks or own - cfg.num_local_blocks < j}
        free = sorted((j for j in range(own + 1) if j not in forced), key=lambda j: -scores[t, j].item())
        kept = free[: cfg.num_selected - len(forced)]
        gap = (scores[t, kept[-1]] - scores[t, free[len(kept)]]).item() if kept and len(free) > len(kept) else 1.0
        return forced | set(kept), gap

    differs = 0
    for t in range(80):
        want, gap = top(group, t)
        if gap > 1e-6:
            assert selected_sets(sel, 0, 0, t) == want, t
        differs += top(single, t)[0] != want
    assert differs > 0


def test_selection_ties_go_to_lower_blocks_and_chunking_does_not_matter():
    # l = 64 > l': for p < 63 no compressed token is visible, every score is 0
    cfg = NSAConfig(compress_block=64, compress_stride=16, select_block=16, num_selected=3,
                    num_init_blocks=1, num_local_blocks=1, window=16)
    q, k, v = rand_qkv(1, 2, 1, 200, 200, 16, seed=3)
    k_cmp, _ = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=200)
    for p in range(63):
        own = p // 16
        # forced: block 0 and the own block; the one free slot goes to the lowest other block
        expected = {0, own} | ({1} if own >= 2 else set())
        assert selected_sets(sel, 0, 0, p) == expected, p
    other = nsa_selection(q, k_cmp, cfg, kv_len=200, chunk=7)
    assert torch.equal(sel.to_dense_mask(), other.to_dense_mask())


# ------------------------------------------------------------------ (a) selected branch
@pytest.mark.parametrize("Tq,Tk,H,Hkv", CASES)
def test_selected_branch_equals_attention_over_selected_tokens(Tq, Tk, H, Hkv):
    cfg = NSAConfig(**SMALL)
    ls = cfg.select_block
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 32, seed=21 + Tq)
    k_cmp, _ = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=Tk)
    mask = torch.zeros(2, H, Tq, Tk, dtype=torch.bool)
    G = H // Hkv
    for b in range(2):
        for h in range(H):
            for t in range(Tq):
                p = t + Tk - Tq
                for j in selected_sets(sel, b, h // G, t):
                    for kv in range(j * ls, min((j + 1) * ls, Tk)):
                        if kv <= p:
                            mask[b, h, t, kv] = True
    assert mask.any(-1).all()  # every query reads at least one key
    assert not mask.all()  # and the case is sparse
    expected = attention_fp64(q, k, v, mask)
    for backend in BACKENDS:
        out = nsa_selected_branch(q, k, v, sel, backend=backend)
        assert err(out, expected) < 1e-5, backend


# ------------------------------------------------------------------ (a) window branch
@pytest.mark.parametrize("Tq,Tk,H,Hkv", CASES)
def test_window_branch_is_the_band(Tq, Tk, H, Hkv):
    cfg = NSAConfig(**SMALL)
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 32, seed=31 + Tq)
    mask = torch.zeros(Tq, Tk, dtype=torch.bool)
    for t in range(Tq):
        p = t + Tk - Tq
        mask[t, max(0, p - cfg.window + 1) : p + 1] = True
    expected = attention_fp64(q, k, v, mask[None, None])
    for backend in BACKENDS:
        out = nsa_window_branch(q, k, v, cfg, backend=backend)
        assert err(out, expected) < 1e-5, backend


def test_whole_method_is_the_gated_sum_of_the_branches():
    cfg = NSAConfig(**SMALL, gates=(0.2, 0.5, 0.3))
    q, k, v = rand_qkv(1, 4, 2, 70, 100, 32, seed=41)
    k_cmp, v_cmp = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=100)
    parts = (
        nsa_compressed_branch(q, k_cmp, v_cmp, cfg, kv_len=100),
        nsa_selected_branch(q, k, v, sel),
        nsa_window_branch(q, k, v, cfg),
    )
    expected = sum(g * o.double() for g, o in zip(cfg.gates, parts))
    for backend in BACKENDS:
        out = longattn.attention(q, k, v, method="nsa", backend=backend, **SMALL, gates=(0.2, 0.5, 0.3))
        assert err(out, expected) < 1e-5, backend


# ------------------------------------------------------------------ (b) reference vs flex
SHAPES = [(1, 1), (63, 63), (300, 300), (1, 300), (63, 300)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("Tq,Tk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_flex_matches_reference(dtype, H, Hkv, Tq, Tk):
    q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, 64, dtype=dtype, seed=Tq * 7 + Tk + H * Hkv)
    ref = longattn.attention(q.float(), k.float(), v.float(), method="nsa", backend="reference", **SMALL)
    with plain_precision():
        plain = longattn.attention(q, k, v, method="nsa", backend="reference", **SMALL)
    out = longattn.attention(q, k, v, method="nsa", backend="flex", **SMALL)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all()
    bound = 2 * err(plain, ref) + FLOOR[dtype]
    assert err(out, ref) <= bound, (err(out, ref), bound)


def test_flex_matches_reference_in_many_chunks(monkeypatch):
    import longattn.methods.nsa as nsa_mod

    monkeypatch.setattr(nsa_mod, "CHUNK_ELEMENTS", 2 * 4 * 40 * 13)  # chunks of 13 queries
    q, k, v = rand_qkv(2, 4, 2, 150, 320, 32, seed=13)
    ref = longattn.attention(q, k, v, method="nsa", backend="reference", **SMALL)
    out = longattn.attention(q, k, v, method="nsa", backend="flex", **SMALL)
    assert err(out, ref) < 1e-5


def test_flex_matches_reference_with_paper_defaults():
    q, k, v = rand_qkv(1, 4, 2, 200, 700, 64, seed=5)
    ref = longattn.attention(q, k, v, method="nsa", backend="reference")
    out = longattn.attention(q, k, v, method="nsa", backend="flex")
    assert err(out, ref) < 1e-5


# ------------------------------------------------------------------ (c) trainable module
NN_CFG = NSAConfig(**SMALL)


def test_module_gradients_reach_every_parameter():
    torch.manual_seed(0)
    m = NativeSparseAttention(16, 4, NN_CFG)
    q, k, v = rand_qkv(2, 4, 2, 80, 100, 16, seed=2, requires_grad=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = m(q, k, v, backend="flex")  # CPU + autograd: falls back to the reference
    assert any("falling back" in str(w.message) for w in caught)
    assert out.shape == q.shape
    out.square().mean().backward()
    for name, p in m.named_parameters():
        if name == "k_compress.fc2.bias":
            # a shift of every compressed key shifts a query's logits uniformly: softmax
            # ignores it, so its gradient is 0 up to rounding
            assert p.grad.abs().max() < 1e-4
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all() and t.grad.abs().max() > 0


def test_module_flex_forward_matches_reference():
    torch.manual_seed(1)
    m = NativeSparseAttention(16, 4, NN_CFG)
    q, k, v = rand_qkv(1, 4, 2, 60, 150, 16, seed=4)
    with torch.no_grad():
        ref = m(q, k, v, backend="reference")
        out = m(q, k, v, backend="flex")
    assert err(out, ref) < 1e-5


def test_module_gates_from_hidden_state():
    torch.manual_seed(2)
    m = NativeSparseAttention(16, 4, NN_CFG, gate_input_dim=24)
    q, k, v = rand_qkv(1, 4, 2, 50, 50, 16, seed=6)
    x = torch.randn(1, 50, 24)
    m(q, k, v, x=x).sum().backward()
    assert m.gate_proj.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="pass x"):
        m(q, k, v)


def test_module_loss_decreases():
    torch.manual_seed(3)
    m = NativeSparseAttention(16, 4, NN_CFG)
    q, k, v = rand_qkv(2, 4, 2, 64, 64, 16, seed=8)
    target = torch.randn(q.shape, generator=torch.Generator().manual_seed(9)) * 0.5
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        loss = (m(q, k, v) - target).square().mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.98, losses


def test_module_rejects_bad_inputs():
    m = NativeSparseAttention(16, 4, NN_CFG)
    q, k, v = rand_qkv(1, 4, 2, 20, 20, 16)
    bad = k.clone()
    bad[0, 0, 3, 1] = float("inf")
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        m(q, bad, v)
    with pytest.raises(ValueError, match="q must have 4 dims"):
        m(q[0], k, v)
    with pytest.raises(ValueError, match=r"q must be \[B, 4, T, 16\]"):
        m(q[:, :2], k[:, :1], v[:, :1])


# ------------------------------------------------------------------ (d) bad configs / calls
@pytest.mark.parametrize(
    "field,value",
    [
        ("compress_block", 0),
        ("compress_block", 24),  # stride 16 does not divide it
        ("compress_stride", -1),
        ("compress_stride", 3),  # does not divide compress_block 32
        ("select_block", 8),
        ("select_block", 96),  # neither divides nor is a multiple of 128
        ("num_selected", 0),
        ("num_selected", 2),  # fewer than the 3 forced blocks
        ("window", 0),
        ("window", 1.5),
        ("num_init_blocks", -1),
        ("num_local_blocks", True),
        ("gates", (0.5, 0.5)),
        ("gates", (0.5, float("nan"), 0.5)),
        ("gates", (0.5, -0.1, 0.5)),
        ("compressed_dtype", "bfloat16"),  # "float32" or "input"
    ],
)
def test_bad_config_raises_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"NSAConfig.{field}"):
        NSAConfig(**{field: value})
    q, k, v = rand_qkv(1, 4, 2, 16, 16, 8)
    with pytest.raises(ValueError, match=field):
        longattn.attention(q, k, v, method="nsa", **{field: value})


def test_compressed_tokens_in_the_input_dtype():
    """``compressed_dtype="input"``: the fp32 mean rounded once to k's / v's dtype (fp32 inputs:
    the same tokens as the default), and the reference's selection is then computed from those
    tokens."""
    cfg, cfg_in = NSAConfig(**SMALL), NSAConfig(**SMALL, compressed_dtype="input")
    q, k, v = rand_qkv(1, 4, 2, 90, 130, 32, dtype=torch.bfloat16, seed=17)
    kc32, vc32 = nsa_compress(k, v, cfg)
    kc, vc = nsa_compress(k, v, cfg_in)
    assert kc32.dtype == vc32.dtype == torch.float32 and kc.dtype == vc.dtype == torch.bfloat16
    blocks = k.double().unfold(2, 16, 8)  # [B, Hkv, nC, D, l]: keys [8i, 8i + 16)
    assert torch.equal(kc, blocks.mean(-1).float().to(torch.bfloat16))
    assert torch.equal(vc, vc32.to(torch.bfloat16))
    for a, b in zip(nsa_compress(k.float(), v.float(), cfg), nsa_compress(k.float(), v.float(), cfg_in)):
        assert a.dtype == b.dtype == torch.float32 and torch.equal(a, b)
    out = longattn.attention(q, k, v, method="nsa", backend="reference", **SMALL, compressed_dtype="input")
    expected = sum(g * o.double() for g, o in zip(cfg.gates, (
        nsa_compressed_branch(q, kc, vc, cfg, kv_len=130),
        nsa_selected_branch(q, k, v, nsa_selection(q, kc, cfg, kv_len=130)),
        nsa_window_branch(q, k, v, cfg))))
    assert err(out, expected) < 1e-2  # bf16 branch outputs
    assert err(out, longattn.attention(q, k, v, method="nsa", backend="reference", **SMALL)) > 0


def test_select_stride_must_divide_select_block():
    with pytest.raises(ValueError, match="NSAConfig.select_block=16 must be a multiple of NSAConfig.compress_stride=32"):
        NSAConfig(compress_block=64, compress_stride=32, select_block=16)


def test_bidirectional_and_lse_rejected():
    q, k, v = rand_qkv(1, 4, 2, 16, 16, 8)
    with pytest.raises(ValueError, match="causal only"):
        longattn.attention(q, k, v, method="nsa", causal=False)
    with pytest.raises(ValueError, match="no single log-sum-exp"):
        longattn.attention(q, k, v, method="nsa", return_lse=True)


def test_density_counts_every_branch():
    """Density = (compressed tokens seen + selected keys + window keys) / causal pairs,
    counted here by loops over tokens."""
    from longattn.methods.nsa import nsa_density

    cfg = NSAConfig(**SMALL)
    Tq, Tk = 70, 150
    q, k, v = rand_qkv(1, 4, 2, Tq, Tk, 16, seed=21)
    k_cmp, _ = nsa_compress(k, v, cfg)
    sel = nsa_selection(q, k_cmp, cfg, kv_len=Tk)
    mask = sel.to_dense_mask()  # [1, 2, Tq, Tk]
    total = 0
    nC = cfg.num_compressed(Tk)
    for t in range(Tq):
        p = t + Tk - Tq
        total += sum(1 for i in range(nC) if i * cfg.compress_stride + cfg.compress_block - 1 <= p)
        total += sum(1 for j in range(Tk) if p - cfg.window < j <= p)
    total += mask.sum().item() / 2  # mean over the two KV heads
    full = sum(t + Tk - Tq + 1 for t in range(Tq))
    assert abs(nsa_density(q, k, True, cfg) - total / full) < 1e-12


@pytest.mark.parametrize("l,d,ls", [(32, 16, 64), (32, 16, 32), (16, 16, 64), (48, 16, 64), (32, 32, 64)])
def test_block_scores_equal_the_overlap_matrix_product(l, d, ls):
    """The banded gather that turns compressed probabilities into block scores equals the
    product with the 0/1 overlap matrix written from its definition."""
    from longattn.methods.nsa import NSAConfig, block_overlap, block_scores, overlap_ranges

    cfg = NSAConfig(compress_block=l, compress_stride=d, select_block=ls, num_selected=4, window=64)
    for T in (ls, 5 * ls + 7, 17 * ls):
        nC, nKB = cfg.num_compressed(T), -(-T // ls)
        overlap = torch.tensor([[float(i * d < (j + 1) * ls and i * d + l > j * ls) for j in range(nKB)]
                                for i in range(nC)]).reshape(nC, nKB)
        assert torch.equal(block_overlap(nC, nKB, cfg, "cpu"), overlap)
        p = torch.rand(2, 3, nC, dtype=torch.float64)
        first, count = overlap_ranges(nC, nKB, cfg, "cpu")
        assert torch.allclose(block_scores(p, first, count), p @ overlap.double(), rtol=0, atol=1e-12)
