"""Defining properties from METHODS.md, each checked against an independent computation
written here (plain loops or explicit masks), not against the library's own helpers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import longattn

from .conftest import rand_qkv

BACKENDS = ["reference", "sdpa", "flex"]


def masked_attention_fp64(q, k, v, mask):
    """Plain fp64 attention with an explicit ``[.., Tq, Tk]`` boolean mask (heads expanded)."""
    H = q.shape[1]
    k = k.double().repeat_interleave(H // k.shape[1], 1)
    v = v.double().repeat_interleave(H // v.shape[1], 1)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v


def causal_mask(Tq, Tk):
    return torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)


def selection_mask(name, q, k, causal, **config):
    spec = longattn.get_method(name)
    m = spec.selector(q, k, causal, spec.make_config(**config)).to_dense_mask()
    return m.repeat_interleave(q.shape[1] // m.shape[1], 1) if m.shape[1] not in (1, q.shape[1]) else m


# ---------------------------------------------------------------------------- full
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (77, 77), (20, 77)])
def test_full_equals_sdpa_fp64(causal, Tq, Tk):
    q, k, v = rand_qkv(2, 4, 2, Tq, Tk, 32, dtype=torch.float64, seed=Tq)
    mask = causal_mask(Tq, Tk) if causal else None
    expected = F.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=mask
    )
    for backend in ["reference", "sdpa"]:
        out = longattn.attention(q, k, v, method="full", causal=causal, backend=backend)
        assert (out - expected).abs().max().item() < 1e-12, backend


def test_sdpa_under_a_mask_with_empty_rows_matches_fp64():
    # the dense-mask SDPA path of the sparse methods: rows that see no key give 0 (not NaN),
    # and gradients are finite and equal to plain fp64 attention's (empty rows contribute 0)
    from longattn.backends import sdpa_masked_attention
    from longattn.registry import AttnInputs

    q, k, v = rand_qkv(2, 4, 2, 40, 56, 16, dtype=torch.float64, seed=3, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, 2, 40, 56, generator=g) < 0.3  # per KV-head group (Hs = 2 of H = 4)
    mask[:, :, ::7] = False  # every 7th query sees nothing
    out, lse = sdpa_masked_attention(AttnInputs(q=q, k=k, v=v, causal=False, scale=16 ** -0.5), mask)
    assert lse is None
    full_mask = mask.repeat_interleave(2, 1)
    empty = ~full_mask.any(-1, keepdim=True)
    expected = torch.where(empty, 0.0, masked_attention_fp64(q, k, v, full_mask | empty))
    assert (out - expected).abs().max().item() < 1e-12
    assert (out[:, :, ::7] == 0).all()
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(expected, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert torch.isfinite(a).all(), name
        assert (a - b).abs().max().item() < 1e-12, name
    assert (got[0][:, :, ::7] == 0).all()  # an empty row's query gets no gradient


# ---------------------------------------------------------------------------- window
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_window_at_least_t_equals_full(backend, causal):
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 64, seed=1)
    full = longattn.attention(q, k, v, method="full", causal=causal, backend="reference")
    for w in (300, 301, 10_000):
        out = longattn.attention(q, k, v, method="window", window=w, causal=causal, backend=backend)
        assert (out - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(200, 200), (50, 200)])
def test_window_mask_is_the_band(causal, Tq, Tk):
    q, k, _ = rand_qkv(1, 2, 2, Tq, Tk, 16)
    w = 37
    mask = selection_mask("window", q, k, causal, window=w, block_size=32)[0, 0]
    for i in range(Tq):
        p = i + Tk - Tq
        for j in range(Tk):
            expected = (p - w < j <= p) if causal else abs(p - j) < w
            assert bool(mask[i, j]) == expected, (i, j)


# ---------------------------------------------------------------------------- sink
@pytest.mark.parametrize("backend", BACKENDS)
def test_sink_tokens_always_attended(backend):
    Tq = Tk = 400
    q, k, v = rand_qkv(1, 2, 2, Tq, Tk, 32, seed=2)
    s, w = 4, 50
    mask = selection_mask("sink", q, k, True, sink=s, window=w, block_size=64)[0, 0]
    for i in range(Tq):
        expected = [(j < s and j <= i) or (i - w < j <= i) for j in range(Tk)]
        assert mask[i].tolist() == expected
    # the last query is far past the window: changing a sink value must change its output,
    # and changing a value between the sinks and the window must not
    base = longattn.attention(q, k, v, method="sink", sink=s, window=w, backend=backend)
    v_sink, v_mid = v.clone(), v.clone()
    v_sink[:, :, 2] += 1.0
    v_mid[:, :, 100] += 1.0
    out_sink = longattn.attention(q, k, v_sink, method="sink", sink=s, window=w, backend=backend)
    out_mid = longattn.attention(q, k, v_mid, method="sink", sink=s, window=w, backend=backend)
    assert (out_sink[:, :, -1] - base[:, :, -1]).abs().max() > 1e-4
    assert (out_mid[:, :, -1] - base[:, :, -1]).abs().max() == 0


# ---------------------------------------------------------------------------- bigbird
def test_bigbird_random_blocks_reproducible_from_seed():
    q, k, _ = rand_qkv(1, 4, 4, 1024, 1024, 16)
    a = selection_mask("bigbird", q, k, False, seed=7)
    b = selection_mask("bigbird", q, k, False, seed=7)
    c = selection_mask("bigbird", q, k, False, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # heads draw different random blocks
    assert not torch.equal(a[0, 0], a[0, 1])
    # causal: length-independent, so the first 512 queries see the same keys at T=512 and
    # T=1024 (a decode step sees the blocks the prefill saw)
    long = selection_mask("bigbird", q, k, True, seed=7)
    short = selection_mask("bigbird", q[:, :, :512], k[:, :, :512], True, seed=7)
    assert torch.equal(short[0], long[0, :, :512, :512])
    # and a single decoding query at position 700 sees row 700 of the prefill mask
    dec = selection_mask("bigbird", q[:, :, 700:701], k[:, :, :701], True, seed=7)
    assert torch.equal(dec[0, :, 0], long[0, :, 700, :701])


@pytest.mark.parametrize("causal", [False, True])
def test_bigbird_structure(causal):
    T, bs, g, r, wb = 1024, 64, 2, 3, 3
    q, k, _ = rand_qkv(1, 4, 4, T, T, 16)
    mask = selection_mask(
        "bigbird", q, k, causal, block_size=bs, num_global_blocks=g, num_random_blocks=r, num_window_blocks=wb
    )[0]
    nb = T // bs
    cm = causal_mask(T, T) if causal else torch.ones(T, T, dtype=torch.bool)
    glob = g * bs
    # global tokens are attended by every query and attend to every key (causality permitting)
    assert torch.equal(mask[:, :, :glob], cm[:, :glob].expand(4, T, glob))
    assert torch.equal(mask[:, :glob, :], cm[:glob].expand(4, glob, T))
    # block structure: per (head, query block) window + global + exactly r random blocks
    blocks = mask.view(4, nb, bs, nb, bs).any(4).any(2)  # [H, nb, nb]
    for h in range(4):
        for a in range(g, nb):
            cols = set(torch.nonzero(blocks[h, a]).flatten().tolist())
            window = {c for c in range(a - 1, a + 2) if 0 <= c < nb and (not causal or c <= a)}
            fixed = window | set(range(g))
            assert fixed <= cols
            eligible = [c for c in range(nb) if c not in fixed and (not causal or c < a)]
            assert len(cols - fixed) == min(r, len(eligible)), (h, a)
    if causal:
        assert not (mask & ~cm).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_bigbird_attention_matches_mask(backend):
    q, k, v = rand_qkv(1, 4, 2, 640, 640, 32, seed=4)
    mask = selection_mask("bigbird", q, k, False)
    out = longattn.attention(q, k, v, method="bigbird", causal=False, backend=backend)
    assert (out.double() - masked_attention_fp64(q, k, v, mask)).abs().max() < 1e-5


# ---------------------------------------------------------------------------- topk
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
def test_topk_budget_at_least_t_equals_full(backend, causal):
    q, k, v = rand_qkv(1, 4, 2, 500, 500, 64, seed=6)
    full = longattn.attention(q, k, v, method="full", causal=causal, backend="reference")
    for top_k in (4, 5, 100):  # 4 * 128 = 512 >= 500
        out = longattn.attention(q, k, v, method="topk", top_k=top_k, causal=causal, backend=backend)
        assert (out - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("shared", [False, True])
def test_topk_selection_is_brute_force_top_k(shared):
    T, bs, kk, H, Hkv = 256, 32, 3, 4, 2
    q, k, v = rand_qkv(1, H, Hkv, T, T, 16, seed=8)
    mask = selection_mask("topk", q, k, True, block_size=bs, top_k=kk, shared_kv_heads=shared)[0]
    nb = T // bs
    for h in range(H):
        for a in range(nb):
            qm = q[0, h, a * bs : (a + 1) * bs].double().mean(0)
            heads = range((h // 2) * 2, (h // 2) * 2 + 2) if shared else [h]
            scores = []
            for c in range(a + 1):
                km = k[0, h // 2, c * bs : (c + 1) * bs].double().mean(0)
                if shared:
                    scores.append(sum(q[0, hh, a * bs : (a + 1) * bs].double().mean(0) @ km for hh in heads))
                else:
                    scores.append(qm @ km)
            others = sorted(range(a), key=lambda c: -scores[c])[: kk - 1]
            expected = set(others) | {a}
            got = set(torch.nonzero(mask[h, a * bs].view(nb, bs).any(1)).flatten().tolist())
            assert got == expected, (h, a)


# ---------------------------------------------------------------------------- moba
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_block", [1, 64])
@pytest.mark.parametrize("causal", [True, False])
def test_moba_all_blocks_equals_full(backend, gate_block, causal):
    q, k, v = rand_qkv(1, 4, 2, 600, 600, 64, seed=9)
    full = longattn.attention(q, k, v, method="full", causal=causal, backend="reference")
    out = longattn.attention(
        q, k, v, method="moba", block_size=128, top_k=5, gate_block=gate_block, causal=causal, backend=backend
    )
    assert (out - full).abs().max().item() < 1e-5


@pytest.mark.parametrize("Tq,Tk", [(192, 192), (70, 192)])
def test_moba_selection_follows_the_paper_per_token(Tq, Tk):
    """Per token: own block always, future blocks never, the k-1 best past blocks by
    q . mean(K_block)."""
    bs, kk, H, Hkv = 32, 3, 2, 1
    q, k, _ = rand_qkv(1, H, Hkv, Tq, Tk, 16, seed=10)
    mask = selection_mask("moba", q, k, True, block_size=bs, top_k=kk, gate_block=1)[0]
    nb = Tk // bs
    means = [k[0, 0, c * bs : (c + 1) * bs].double().mean(0) for c in range(nb)]
    for h in range(H):
        for i in range(Tq):
            p = i + Tk - Tq
            own = p // bs
            gates = {c: float(q[0, h, i].double() @ means[c]) for c in range(own)}
            best = sorted(gates, key=lambda c: -gates[c])[: kk - 1]
            expected = torch.zeros(Tk, dtype=torch.bool)
            for c in best:
                expected[c * bs : (c + 1) * bs] = True
            expected[own * bs : p + 1] = True
            assert torch.equal(mask[h, i], expected), (h, i)


@pytest.mark.parametrize("name,cfg", [
    ("moba", {"block_size": 32, "top_k": 3, "gate_block": 1}),
    ("moba", {"block_size": 32, "top_k": 2, "gate_block": 16}),
    ("moba", {"block_size": 32, "top_k": 9}),  # more than there are blocks
    ("topk", {"block_size": 16, "top_k": 3}),
    ("topk", {"block_size": 16, "top_k": 2, "shared_kv_heads": True}),
    ("topk", {"block_size": 16, "top_k": 9}),  # above MAX_PASSES_K: torch.topk
])
@pytest.mark.parametrize("Tq,Tk", [(160, 160), (70, 165), (1, 165)])
@pytest.mark.parametrize("causal", [True, False])
def test_index_selection_equals_the_bitmap_selection(name, cfg, Tq, Tk, causal):
    """MoBA and block top-k build their selection from the top indices directly, ``top_k``
    wide (index_selection; k passes of max up to MAX_PASSES_K); the bitmap route
    (topk_blocks + pattern_selection: a full-width row per query block, torch.topk) is its
    specification. Same blocks, same full blocks, same rule, for
    queries equal to or shorter than the keys (offsets that do and do not align with the gate
    blocks), causal and not."""
    from longattn.methods._common import gate_block_positions, pattern_selection, pooled_block_scores, topk_blocks

    spec = longattn.get_method(name)
    config = spec.make_config(**cfg)
    q, k, _ = rand_qkv(1, 4, 2, Tq, Tk, 16, seed=Tq + Tk)
    sel = spec.selector(q, k, causal, config)
    # the bitmap route, spelled out
    bs = config.block_size
    g = getattr(config, "gate_block", bs)
    rows = gate_block_positions(Tq, Tk, g, q.device)
    scores = pooled_block_scores(q, k, g, bs)
    if getattr(config, "shared_kv_heads", False):
        scores = scores.view(1, 2, 2, *scores.shape[2:]).sum(2)
    c = torch.arange(scores.shape[-1])
    own = c[None, :] == rows[:, None] * g // bs
    if name == "moba":
        eligible = c[None, :] < rows[:, None] * g // bs if causal else ~own
    else:
        eligible = c[None, :] <= rows[:, None] if causal else torch.ones_like(own)
    pattern = topk_blocks(scores, eligible.expand_as(scores), own.expand_as(scores), config.top_k)
    ref = pattern_selection(pattern, gate_block=g, kv_block=bs, q_len=Tq, kv_len=Tk, num_heads=4, causal=causal)

    assert sel.kv_indices.shape[-1] == min(config.top_k, sel.num_kv_blocks)  # the bitmap's is num_kv_blocks
    assert (sel.q_block, sel.kv_block, sel.q_offset) == (ref.q_block, ref.kv_block, ref.q_offset)
    assert torch.equal(sel.kv_num_blocks, ref.kv_num_blocks)
    assert torch.equal(sel.block_bitmap(), ref.block_bitmap())
    assert torch.equal(sel.block_bitmap(full_only=True), ref.block_bitmap(full_only=True))
    assert torch.equal(sel.to_dense_mask(), ref.to_dense_mask())
    sel._check_values()  # built unvalidated: in range, no block twice in a row
    n = sel.kv_num_blocks.long()[..., None]
    kept = sel.kv_indices.long().masked_fill(torch.arange(sel.kv_indices.shape[-1]) >= n, 1 << 30)
    assert torch.equal(kept, kept.sort(-1).values), "a row's blocks come first, ascending"


# ---------------------------------------------------------------------------- density
@pytest.mark.parametrize("name,config", [
    ("window", {"window": 50, "block_size": 32}),
    ("sink", {"sink": 4, "window": 40, "block_size": 64}),
    ("bigbird", {"block_size": 32}),
    ("topk", {"block_size": 32, "top_k": 2}),
    ("moba", {"block_size": 64, "top_k": 2}),
])
@pytest.mark.parametrize("causal", [True, False])
def test_density_counts_kept_pairs(name, config, causal):
    q, k, _ = rand_qkv(2, 4, 2, 150, 300, 16, seed=11)
    if not causal:
        q = torch.randn(2, 4, 300, 16)
    spec = longattn.get_method(name)
    sel = spec.selector(q, k, causal, spec.make_config(**config))
    mask = sel.to_dense_mask()
    Tq, Tk = q.shape[2], k.shape[2]
    full = causal_mask(Tq, Tk).sum().item() if causal else Tq * Tk
    expected = mask.sum(dim=(-1, -2)).double() / full
    assert torch.allclose(sel.kept_pairs().double() / full, expected)
    assert abs(sel.density() - expected.mean().item()) < 1e-12
    assert 0 < sel.density() < 1


@pytest.mark.parametrize("k", [3, 10])
def test_block_topk_ranks_non_finite_scores_last_and_keeps_forced_blocks(k):
    """An overflowed gate (NaN, +-inf scores) still selects k blocks: the forced block first,
    then the scores with +-inf clamped to the largest floats, NaN last (tied with -inf); the
    index form (k passes of max up to MAX_PASSES_K, else torch.topk) and the bitmap form agree
    up to ties. Before, NaN dropped blocks from the index form (max returns NaN first) while
    torch.topk ranked NaN first."""
    from longattn.methods._common import topk_block_indices, topk_blocks

    nan, inf = float("nan"), float("inf")
    scores = torch.tensor([[0.5, nan, 0.2, 0.1, 0.3, -inf, inf, 0.0, nan, 0.4, 0.6, -0.1],
                           [nan] * 12])
    eligible = torch.ones(2, 12, dtype=torch.bool)
    eligible[:, 11] = False
    forced = torch.zeros(2, 12, dtype=torch.bool)
    forced[:, 4] = True
    idx, keep = topk_block_indices(scores, eligible, forced, k)
    chosen = [set(idx[r][keep[r]].tolist()) for r in range(2)]
    spec = [set(row.nonzero().flatten().tolist()) for row in topk_blocks(scores, eligible, forced, k)]
    for c, want in zip(chosen, spec):
        assert len(c) == len(want) == k and 4 in c and 4 in want and 11 not in c | want
    tied = {1, 5, 8}  # NaN, -inf, NaN: all rank as the lowest float
    assert chosen[0] - tied == spec[0] - tied
    if k == 3:
        assert chosen[0] == {4, 6, 10}  # forced, +inf (the largest float), 0.6
    else:  # every other eligible block, then two of the three tied lowest
        assert chosen[0] - tied == {0, 2, 3, 4, 6, 7, 9, 10} and len(chosen[0] & tied) == 2
