"""Sparse decoding (longattn.decode): the reference against loops written here, the Triton
split-K kernel against the reference (through the Triton interpreter on CPU at small sizes;
compiled with LONGATTN_TEST_DEVICE=cuda), the defining properties (all blocks = dense causal
attention over each valid prefix; nothing outside the selection is read), the selectors, and
one check per bad input."""

from __future__ import annotations

import math
import os

import torch

DEVICE = os.environ.get("LONGATTN_TEST_DEVICE", "cpu")
if DEVICE == "cpu" and not torch.cuda.is_available():
    # the Triton cases run through the interpreter; it must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from longattn.backends import plain_precision  # noqa: E402
from longattn.decode import (  # noqa: E402
    block_key_means,
    page_bounds,
    quest_upper_bounds,
    select_moba_blocks,
    select_quest_pages,
    select_topk_blocks,
    sparse_decode,
)
from longattn.kernels import triton_unavailable_reason  # noqa: E402

from .conftest import limit_rank_launches, poison_device_memory  # noqa: E402

TRITON_REASON = triton_unavailable_reason(torch.device(DEVICE))
needs_triton = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float16: 1e-3}


# ---------------------------------------------------------------------------- helpers
def make_inputs(B, H, Hkv, Tq, Tmax, D, *, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, Tmax, D, generator=g)
    v = torch.randn(B, Hkv, Tmax, D, generator=g)
    return [t.to(device=DEVICE, dtype=dtype) for t in (q, k, v)]


def lengths(*values):
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


def random_selection(lens, Hkv, block_size, K, *, seed=0, full=False, empty=()):
    """Random distinct blocks in random order, random counts in [0, K]; unused slots hold a
    huge index (it must be ignored). ``full``: every block of each sequence. ``empty``:
    (b, h) pairs that select nothing."""
    g = torch.Generator().manual_seed(seed)
    B = len(lens)
    idx = torch.full((B, Hkv, K), 10**6, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, dtype=torch.int32)
    for b, L in enumerate(lens.tolist()):
        nb = -(-L // block_size)
        for h in range(Hkv):
            perm = torch.randperm(nb, generator=g)
            c = nb if full else int(torch.randint(1, min(K, nb) + 1, (1,), generator=g))
            if (b, h) in empty:
                c = 0
            idx[b, h, :c] = perm[:c].int()
            cnt[b, h] = c
    return idx.to(DEVICE), cnt.to(DEVICE)


def loop_attention(q, k, v, lens, idx, cnt, block_size, scale):
    """Independent fp64 computation: per sequence, head and query, the list of keys it may
    read (selected block, below its length, at or before its own position) and a softmax."""
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    lse = torch.full((B, H, Tq), float("-inf"), dtype=torch.float64)
    q, k, v = (t.detach().double().cpu() for t in (q, k, v))
    for b, L in enumerate(lens.tolist()):
        for h in range(H):
            kv = h // G
            blocks = set(idx[b, kv, : int(cnt[b, kv])].tolist())
            for i in range(Tq):
                p = L - Tq + i
                keys = [j for j in range(L) if j // block_size in blocks and j <= p]
                if not keys:
                    continue
                s = (k[b, kv, keys] @ q[b, h, i]) * scale
                lse[b, h, i] = torch.logsumexp(s, 0)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, kv, keys]
    return out, lse


def dense_causal_prefix(q, k, v, lens, scale):
    """Plain causal attention over each sequence's valid prefix, one sequence at a time."""
    B, H, Tq, D = q.shape
    G = H // k.shape[1]
    out = torch.empty(B, H, Tq, D, dtype=torch.float64)
    for b, L in enumerate(lens.tolist()):
        kb = k[b, :, :L].double().cpu().repeat_interleave(G, 0)  # [H, L, D]
        vb = v[b, :, :L].double().cpu().repeat_interleave(G, 0)
        s = q[b].double().cpu() @ kb.transpose(-1, -2) * scale  # [H, Tq, L]
        allowed = torch.arange(L)[None, :] <= (L - Tq + torch.arange(Tq))[:, None]
        out[b] = torch.softmax(s.masked_fill(~allowed, float("-inf")), -1) @ vb
    return out


def err(a, b):
    return (a.double().cpu() - b.double().cpu()).abs().max().item()


def lse_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    assert torch.equal(torch.isfinite(a), torch.isfinite(b)), "queries that read nothing differ"
    fin = torch.isfinite(a)
    assert (a[~fin] == float("-inf")).all() and (b[~fin] == float("-inf")).all()
    return (a[fin] - b[fin]).abs().max().item() if fin.any() else 0.0


# ---------------------------------------------------------------------------- reference
@pytest.mark.parametrize("H,Hkv", [(4, 4), (8, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("Tq", [1, 3])
@pytest.mark.parametrize("block_size", [16, 64])
def test_reference_matches_loops(H, Hkv, Tq, block_size):
    q, k, v = make_inputs(3, H, Hkv, Tq, 200, 32, seed=block_size + Tq)
    lens = lengths(200, 97, Tq + 2)
    idx, cnt = random_selection(lens, Hkv, block_size, 4, seed=Tq, empty={(0, 0)})
    out, lse = sparse_decode(q, k, v, lens, idx, cnt, block_size=block_size, backend="reference", return_lse=True)
    exp_out, exp_lse = loop_attention(q, k, v, lens, idx, cnt, block_size, 1 / math.sqrt(32))
    assert out.shape == q.shape and out.dtype == q.dtype and lse.shape == (3, H, Tq) and lse.dtype == torch.float32
    assert err(out, exp_out) < 1e-5
    assert lse_err(lse, exp_lse) < 1e-5
    assert (out[0, : H // Hkv] == 0).all() and (lse[0, : H // Hkv] == float("-inf")).all()  # empty selection


def test_reference_query_before_every_selected_key_reads_nothing():
    """Tq = 3, only the last block selected, the first query sits in the block before it."""
    q, k, v = make_inputs(1, 2, 1, 3, 64, 16)
    lens = lengths(33)  # queries at 30, 31, 32; block 2 (size 16) = positions 32..47
    idx = torch.tensor([[[2]]], dtype=torch.int32, device=DEVICE)
    cnt = torch.tensor([[1]], dtype=torch.int32, device=DEVICE)
    out, lse = sparse_decode(q, k, v, lens, idx, cnt, block_size=16, backend="reference", return_lse=True)
    assert (lse[0, :, :2] == float("-inf")).all() and (out[0, :, :2] == 0).all()
    torch.testing.assert_close(out[0, :, 2], v[0, 0, 32].expand(2, -1))  # one key: its value


# ---------------------------------------------------------------------------- triton vs reference
TRITON_CASES = [  # dtype, H, Hkv, Tq, D, block_size
    (torch.float32, 4, 4, 1, 64, 16),
    (torch.float32, 8, 2, 5, 128, 64),  # G * Tq = 20 rows: two row tiles of 16 in fp32
    (torch.float32, 8, 2, 1, 32, 32),
    (torch.bfloat16, 4, 4, 3, 128, 32),
    (torch.bfloat16, 8, 2, 1, 64, 16),
    (torch.bfloat16, 8, 2, 3, 128, 64),
    (torch.float16, 4, 4, 1, 64, 32),
    (torch.bfloat16, 8, 2, 16, 64, 32),  # 64 rows in one tile, 16 causal queries
    (torch.bfloat16, 8, 2, 1, 64, 8),  # 8-key blocks: eight to a 64-key chunk
    (torch.float16, 4, 4, 3, 64, 4),  # 4-key blocks: sixteen to a chunk
]


def test_tile_config_packs_small_power_of_two_blocks():
    """Blocks smaller than the chunk cap are packed SLOTS to a chunk only when they are a power of
    two and packing is asked for; work_units counts chunks of a full selection row."""
    from longattn.kernels.decode import tile_config, work_units

    bf = torch.bfloat16
    c = tile_config(4, 1, 16, 128, bf)  # Quest's pages, one query of a GQA-4 group
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (64, 4, 1)
    assert work_units(256, c) == 64 and work_units(5, c) == 2
    c = tile_config(4, 1, 16, 128, bf, pack_slots=False)  # NSA's branch kernel
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (16, 1, 1)
    c = tile_config(4, 1, 24, 128, bf)  # not a power of two: padded, not packed
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (32, 1, 1)
    c = tile_config(16, 4, 16, 128, bf)  # 64 rows: chunks of 32 keys, two pages each
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (32, 2, 1)
    c = tile_config(4, 1, 128, 128, bf)  # top-k's blocks: two chunks each
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (64, 1, 2) and work_units(32, c) == 64
    c = tile_config(4, 1, 8, 64, torch.float32)
    assert (c["BLOCK_N"], c["SLOTS"], c["CHUNKS"]) == (64, 8, 1)


@needs_triton
@pytest.mark.parametrize("dtype,H,Hkv,Tq,D,block_size", TRITON_CASES,
                         ids=[f"{str(c[0])[6:]}-{c[1]}/{c[2]}-q{c[3]}-d{c[4]}-b{c[5]}" for c in TRITON_CASES])
def test_triton_matches_reference(dtype, H, Hkv, Tq, D, block_size):
    Tmax = 300
    q, k, v = make_inputs(3, H, Hkv, Tq, Tmax, D, dtype=dtype, seed=D + Tq + block_size)
    lens = lengths(300, 131, Tq + 5)
    idx, cnt = random_selection(lens, Hkv, block_size, 6, seed=D, empty={(1, Hkv - 1)})
    args = (lens, idx, cnt)
    ref, ref_lse = sparse_decode(q.float(), k.float(), v.float(), *args, block_size=block_size,
                                 backend="reference", return_lse=True)
    with plain_precision():
        plain, plain_lse = sparse_decode(q, k, v, *args, block_size=block_size, backend="reference", return_lse=True)
    poison_device_memory(DEVICE)
    out, lse = sparse_decode(q, k, v, *args, block_size=block_size, backend="triton", return_lse=True)
    assert out.shape == q.shape and out.dtype == dtype and lse.dtype == torch.float32
    assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
    assert not torch.isnan(lse).any()
    assert err(out, ref) <= 2 * err(plain, ref) + FLOOR[dtype], (err(out, ref), err(plain, ref))
    assert lse_err(lse, ref_lse) <= 2 * lse_err(plain_lse, ref_lse) + FLOOR[dtype]
    # auto takes the kernel when it can run
    auto = sparse_decode(q, k, v, *args, block_size=block_size, backend="auto")
    assert torch.equal(auto, out)


@needs_triton
def test_triton_reads_strided_caches():
    """Caches stored as [B, Tmax, Hkv, D] (the flash-attention layout) seen through a transpose,
    int64 indices and lengths: the kernel follows the strides."""
    q, k, v = make_inputs(3, 8, 2, 3, 120, 64, seed=17)
    k_t, v_t = k.transpose(1, 2).contiguous().transpose(1, 2), v.transpose(1, 2).contiguous().transpose(1, 2)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not k_t.is_contiguous() and not q_t.is_contiguous()
    lens = lengths(120, 50, 3).long()
    idx, cnt = random_selection(lens, 2, 16, 4, seed=3)
    ref = sparse_decode(q, k, v, lens, idx, cnt, block_size=16, backend="reference")
    out = sparse_decode(q_t, k_t, v_t, lens, idx.long(), cnt.long(), block_size=16, backend="triton", num_splits=2)
    assert err(out, ref) < 2e-5


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("H,Hkv,Tq", [(4, 4, 1), (8, 2, 3)], ids=["mha-q1", "gqa-q3"])
def test_all_blocks_equal_dense_causal_attention(backend, H, Hkv, Tq):
    """The defining property: selecting every block of each sequence is full causal attention
    over the sequence's valid prefix (ragged lengths, one partial last block)."""
    q, k, v = make_inputs(3, H, Hkv, Tq, 250, 64, seed=7)
    lens = lengths(250, 100, Tq)
    idx, cnt = random_selection(lens, Hkv, 32, 8, seed=1, full=True)
    out = sparse_decode(q, k, v, lens, idx, cnt, block_size=32, backend=backend)
    assert err(out, dense_causal_prefix(q, k, v, lens, 1 / 8)) < 1e-5


def _poison_outside_selection(x, lens, idx, cnt, block_size, fill):
    """Copy of a cache with ``fill`` at every position >= length and in every unselected block."""
    x = x.clone()
    Tmax = x.shape[2]
    pos = torch.arange(Tmax, device=x.device)
    for b, L in enumerate(lens.tolist()):
        for h in range(x.shape[1]):
            blocks = idx[b, h, : int(cnt[b, h])].long()
            keep = torch.isin(pos // block_size, blocks) & (pos < L)
            x[b, h, ~keep] = fill
    return x


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_garbage_outside_selection_is_never_read(backend, dtype):
    """NaN / Inf / huge values past each length and in every unselected block leave the output
    bit-for-bit unchanged: the kernel reads (and the reference uses) only selected keys."""
    q, k, v = make_inputs(3, 8, 2, 3, 200, 64, dtype=dtype, seed=11)
    lens = lengths(200, 77, 5)
    idx, cnt = random_selection(lens, 2, 16, 5, seed=2)
    clean = sparse_decode(q, k, v, lens, idx, cnt, block_size=16, backend=backend, return_lse=True)
    for k_fill, v_fill in ((float("nan"), float("nan")), (float("inf"), -float("inf")), (3e38 if dtype == torch.float32 else 1e38, 1e30)):
        k_bad = _poison_outside_selection(k, lens, idx, cnt, 16, k_fill)
        v_bad = _poison_outside_selection(v, lens, idx, cnt, 16, v_fill)
        dirty = sparse_decode(q, k_bad, v_bad, lens, idx, cnt, block_size=16, backend=backend, return_lse=True)
        assert torch.equal(dirty[0], clean[0]) and torch.equal(dirty[1], clean[1]), (k_fill, v_fill)


@needs_triton
@pytest.mark.skipif(DEVICE != "cpu", reason="records the addresses the Triton interpreter loads")
def test_kernel_loads_exactly_the_selected_valid_keys(monkeypatch):
    """Every byte of the caches the kernel loads lies in a selected block below the sequence's
    length, and every such key is loaded once per row tile: the kernel reads the selection and
    nothing else (equal output alone cannot show that a masked-out value was never loaded)."""
    from triton.runtime import interpreter

    q, k, v = make_inputs(3, 8, 2, 1, 200, 32, dtype=torch.bfloat16, seed=21)
    lens = lengths(200, 75, 1)
    idx, cnt = random_selection(lens, 2, 16, 5, seed=6)
    loaded = []
    original = interpreter.InterpreterBuilder.create_masked_load

    def recording(self, ptrs, mask, *rest):
        loaded.append(ptrs.data[mask.data.astype(bool)].ravel().copy())
        return original(self, ptrs, mask, *rest)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_masked_load", recording)
    sparse_decode(q, k, v, lens, idx, cnt, block_size=16, backend="triton", num_splits=3)
    monkeypatch.undo()
    addrs = torch.from_numpy(__import__("numpy").concatenate(loaded).astype("int64"))
    for cache in (k, v):
        base, size = cache.data_ptr(), cache.element_size()
        inside = addrs[(addrs >= base) & (addrs < base + cache.numel() * size)]
        flat = (inside - base) // size
        b, h, t = flat // (2 * 200 * 32), (flat // (200 * 32)) % 2, (flat // 32) % 200
        read = torch.zeros(3, 2, 200, dtype=torch.bool)
        read[b, h, t] = True
        expected = torch.zeros(3, 2, 200, dtype=torch.bool)
        for bb, L in enumerate(lens.tolist()):
            for hh in range(2):
                for j in idx[bb, hh, : int(cnt[bb, hh])].tolist():
                    expected[bb, hh, j * 16: min(j * 16 + 16, L)] = True
        assert torch.equal(read, expected)
        assert len(inside) == int(expected.sum()) * 32  # each selected element loaded exactly once


# ---------------------------------------------------------------------------- split-K
@needs_triton
def test_split_counts_agree_and_every_split_row_is_written():
    from longattn.kernels.decode import decode_partials, merge_partials

    q, k, v = make_inputs(3, 8, 2, 3, 260, 64, seed=5)
    lens = lengths(260, 90, 4)
    idx, cnt = random_selection(lens, 2, 32, 7, seed=4, empty={(2, 1)})
    ref = sparse_decode(q, k, v, lens, idx, cnt, block_size=32, backend="reference", return_lse=True)
    results = {}
    for splits in (1, 2, 5):
        out, lse = sparse_decode(q, k, v, lens, idx, cnt, block_size=32, backend="triton", return_lse=True, num_splits=splits)
        assert torch.isfinite(out).all()
        assert err(out, ref[0]) < 2e-5 and lse_err(lse, ref[1]) < 2e-5, splits
        results[splits] = (out, lse)
    for splits in (2, 5):
        assert err(results[splits][0], results[1][0]) < 2e-6
        assert lse_err(results[splits][1], results[1][1]) < 2e-6
    # the split kernel alone, into NaN-poisoned buffers: 5 splits leave some splits of short
    # selections empty -- they must still write lse = -inf and an output of 0
    S, (B, H, Tq, D) = 5, q.shape
    o_part = torch.full((S, B, H, Tq, D), float("nan"), device=DEVICE)
    lse_part = torch.full((S, B, H, Tq), float("nan"), device=DEVICE)
    decode_partials(q, k, v, lens, idx, cnt, block_size=32, scale=1 / 8, num_splits=S, o_part=o_part, lse_part=lse_part)
    assert not torch.isnan(lse_part).any() and torch.isfinite(o_part).all()
    empty = lse_part == float("-inf")
    assert empty.any() and (o_part[empty] == 0).all()
    out, lse = merge_partials(o_part, lse_part, q.dtype)
    assert err(out, ref[0]) < 2e-5 and lse_err(lse, ref[1]) < 2e-5


@needs_triton
def test_split_heuristic():
    from longattn.kernels.decode import choose_num_splits

    assert choose_num_splits(pairs=1024, row_tiles=1, max_units=64, sm_count=132) == 1  # grid already full
    s = choose_num_splits(pairs=8, row_tiles=1, max_units=64, sm_count=132)
    assert 2 <= s <= 32 and 8 * s >= 132  # a small batch spreads over the SMs
    assert choose_num_splits(pairs=1, row_tiles=1, max_units=3, sm_count=132) == 2  # bounded by the work


# ---------------------------------------------------------------------------- selectors
def test_quest_bound_is_an_upper_bound_of_every_score_in_the_page():
    q, k, _ = make_inputs(2, 8, 2, 3, 150, 32, dtype=torch.float64, seed=3)
    k[:, :, 120:] = float("nan")  # garbage past the longest length
    lens = lengths(120, 45)
    kmin, kmax = page_bounds(k, lens, 16)
    ub = quest_upper_bounds(q, kmin, kmax)  # [B, H, Tq, nP]
    assert ub.shape == (2, 8, 3, 10) and not torch.isnan(ub).any()
    for b, L in enumerate(lens.tolist()):
        for p in range(10):
            keys = list(range(p * 16, min((p + 1) * 16, L)))
            if not keys:
                assert (ub[b, :, :, p] == float("-inf")).all()
                continue
            for h in range(8):
                scores = q[b, h] @ k[b, h // 4, keys].T  # [Tq, keys]
                assert (scores.max(-1).values <= ub[b, h, :, p] + 1e-9).all()
                # the bound is attained by the corner of the box: check against an explicit sum
                corner = torch.maximum(q[b, h] * kmin[b, h // 4, p], q[b, h] * kmax[b, h // 4, p]).sum(-1)
                torch.testing.assert_close(ub[b, h, :, p], corner)
    # a page of one key: the bound is that key's score
    single = quest_upper_bounds(q[:1], k[:1, :, :1], k[:1, :, :1])[0, :, :, 0]
    torch.testing.assert_close(single, (q[0] @ k[0, :, :1].repeat_interleave(4, 0).transpose(-1, -2))[..., 0])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_quest_selection_keeps_last_page_and_top_bounds(backend):
    q, k, _ = make_inputs(3, 8, 2, 1, 160, 32, seed=8)
    lens = lengths(160, 70, 1)
    idx, cnt = select_quest_pages(q, k, lens, page_size=16, top_k=4, backend=backend)
    assert idx.dtype == torch.int32 and cnt.dtype == torch.int32 and idx.shape == (3, 2, 4)
    kmin, kmax = page_bounds(k, lens, 16)
    for b, L in enumerate(lens.tolist()):
        n_pages = -(-L // 16)
        for h in range(2):
            chosen = idx[b, h, : int(cnt[b, h])].tolist()
            assert int(cnt[b, h]) == min(4, n_pages)
            assert n_pages - 1 in chosen and len(set(chosen)) == len(chosen)
            # independent score: the per-dimension max summed over d and over the group's heads
            score = [sum(torch.maximum(q[b, g, 0] * kmin[b, h, p], q[b, g, 0] * kmax[b, h, p]).sum().item()
                         for g in range(h * 4, h * 4 + 4)) for p in range(n_pages - 1)]
            best = sorted(range(n_pages - 1), key=lambda p: -score[p])[: min(4, n_pages) - 1]
            assert set(chosen) == set(best) | {n_pages - 1}


def _independent_topk(q, key_means_b, L, block_size, top_k, sink, local, G, h):
    n = -(-L // block_size)
    qm = sum(q[h * G + g].double().mean(0) for g in range(G))
    score = [(qm @ key_means_b[h, j].double()).item() for j in range(n)]
    forced = {j for j in range(n) if j < sink or j >= n - local}
    rest = sorted((j for j in range(n) if j not in forced), key=lambda j: -score[j])
    return forced | set(rest[: max(0, min(top_k, n) - len(forced))])


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_topk_keeps_sink_and_local_blocks_and_the_right_count(backend):
    q, k, _ = make_inputs(3, 8, 2, 3, 200, 32, seed=9)
    k[0, :, 150:] = float("nan")
    lens = lengths(150, 100, 20)
    idx, cnt = select_topk_blocks(q, k, lens, block_size=16, top_k=5, sink_blocks=1, local_blocks=2, backend=backend)
    # the means must use only the valid keys of each block (the last block is partial)
    means = block_key_means(k, lens, 16)
    for b, L in enumerate(lens.tolist()):
        for j in range(-(-L // 16)):
            torch.testing.assert_close(means[b, :, j], k[b, :, j * 16: min(j * 16 + 16, L)].mean(1))
        n = -(-L // 16)
        for h in range(2):
            chosen = idx[b, h, : int(cnt[b, h])].tolist()
            assert int(cnt[b, h]) == min(5, n) and chosen == sorted(chosen)
            assert 0 in chosen and n - 1 in chosen and (n < 2 or n - 2 in chosen)
            assert set(chosen) == _independent_topk(q[b], means[b], L, 16, 5, 1, 2, 4, h)


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_selections_are_shared_by_each_gqa_group(backend):
    """One selection per (sequence, KV head): permuting the query heads inside a group changes
    nothing; changing a head of one group changes only that group's row."""
    q, k, _ = make_inputs(2, 8, 2, 1, 256, 32, seed=12)
    lens = lengths(256, 200)
    perm = torch.tensor([3, 1, 0, 2, 5, 7, 6, 4])
    for select in (
        lambda x: select_topk_blocks(x, k, lens, block_size=16, top_k=4, backend=backend),
        lambda x: select_quest_pages(x, k, lens, page_size=16, top_k=4, backend=backend),
        lambda x: select_moba_blocks(x, k, lens, block_size=16, top_k=4),
    ):
        idx, cnt = select(q)
        assert idx.shape[:2] == (2, 2) and cnt.shape == (2, 2)
        idx_p, cnt_p = select(q[:, perm])
        assert torch.equal(idx, idx_p) and torch.equal(cnt, cnt_p)
        q2 = q.clone()
        q2[:, 4:] = torch.randn(2, 4, 1, 32, generator=torch.Generator().manual_seed(99))
        idx2, _ = select(q2)
        assert torch.equal(idx2[:, 0], idx[:, 0])


SELECT_CASES = [  # (B, H, Hkv, Tq, Tmax, block, top_k, sink, local)
    (2, 4, 2, 1, 300, 16, 5, 1, 1),
    (3, 8, 2, 2, 1000, 64, 6, 2, 2),
    (1, 4, 4, 1, 40, 16, 8, 1, 1),  # top_k > blocks: every block
    (2, 8, 1, 4, 700, 32, 9, 0, 3),
    (2, 4, 2, 1, 2080, 16, 40, 1, 2),  # Quest-like: 130 pages, top_k a large share of them
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", range(len(SELECT_CASES)))
def test_selection_kernel_matches_the_reference_selectors(dtype, case):
    B, H, Hkv, Tq, T, bs, K, sink, local = SELECT_CASES[case]
    q, k, _ = make_inputs(B, H, Hkv, Tq, T, 64, dtype=dtype, seed=40 + case)
    lens = lengths(T, *[max(Tq, T - 137 * i) for i in range(1, B)])
    for b in range(1, B):
        k[b, :, int(lens[b]):] = float("nan")  # garbage past each length is never read
    for select, kw in ((select_topk_blocks, {"block_size": bs, "sink_blocks": sink, "local_blocks": local}),
                       (select_quest_pages, {"page_size": bs})):
        want = select(q, k, lens, top_k=K, backend="reference", **kw)
        got = select(q, k, lens, top_k=K, backend="triton", **kw)
        assert got[0].dtype == torch.int32 and got[1].dtype == torch.int32
        assert torch.equal(got[1], want[1]), select.__name__
        assert torch.equal(got[0], want[0]), select.__name__


@needs_triton
def test_selection_kernel_breaks_ties_toward_the_lower_block_and_ranks_nan_last():
    q, k, _ = make_inputs(1, 2, 1, 1, 128, 16, seed=5)
    lens = lengths(128)
    means = torch.zeros(1, 1, 8, 16, device=DEVICE)  # every score 0: a tie between all eight blocks
    idx, cnt = select_topk_blocks(q, k, lens, block_size=16, top_k=4, sink_blocks=0, local_blocks=1,
                                  key_means=means, backend="triton")
    assert idx[0, 0].tolist() == [0, 1, 2, 7] and int(cnt[0, 0]) == 4
    means[0, 0, 0] = float("nan")  # NaN ranks below every number: block 0 drops out
    idx, _ = select_topk_blocks(q, k, lens, block_size=16, top_k=4, sink_blocks=0, local_blocks=1,
                                key_means=means, backend="triton")
    assert idx[0, 0].tolist() == [1, 2, 3, 7]
    ref, _ = select_topk_blocks(q, k, lens, block_size=16, top_k=4, sink_blocks=0, local_blocks=1,
                                key_means=means, backend="reference")
    assert 0 not in ref[0, 0].tolist()


@needs_triton
@pytest.mark.parametrize("quest", [False, True], ids=["topk", "quest"])
def test_selection_kernel_keeps_the_lowest_indices_when_every_score_ties(quest):
    """All keys equal: every score of a row ties, and the kernel keeps the forced blocks and then
    the lowest indices. (Not a SELECT_CASES entry: the reference's ``torch.topk`` breaks ties in
    no fixed order, so only its counts and forced blocks are compared.)"""
    B, H, Hkv, T, bs, K = 2, 4, 2, 600, 16, 12
    q, _, _ = make_inputs(B, H, Hkv, 1, T, 32, seed=8)
    # multiples of 1/8: every page's score is then an exact sum whatever order a kernel (or the
    # interpreter's BLAS, whose blocking can differ from row to row) adds it in, so the ties are exact
    q = torch.round(q * 8) / 8
    k = torch.ones(B, Hkv, T, 32, device=DEVICE)
    lens = lengths(T, 333)
    if quest:
        got = select_quest_pages(q, k, lens, page_size=bs, top_k=K, backend="triton")
        want = select_quest_pages(q, k, lens, page_size=bs, top_k=K, backend="reference")
        last = [37, 20]  # the last page of each sequence
        expect = [sorted(set(range(K - 1)) | {p}) for p in last]
    else:
        got = select_topk_blocks(q, k, lens, block_size=bs, top_k=K, sink_blocks=1, local_blocks=2, backend="triton")
        want = select_topk_blocks(q, k, lens, block_size=bs, top_k=K, sink_blocks=1, local_blocks=2,
                                  backend="reference")
        expect = [sorted(set(range(K - 2)) | {p - 1, p}) for p in (37, 20)]
    assert torch.equal(got[1], want[1]) and got[1].tolist() == [[K] * Hkv] * B
    forced = [{37}, {20}] if quest else [{0, 36, 37}, {0, 19, 20}]
    for b in range(B):
        for h in range(Hkv):
            assert got[0][b, h].tolist() == expect[b]
            assert forced[b] <= set(want[0][b, h].tolist())


@needs_triton
def test_selection_kernel_keeps_the_lowest_indices_among_many_ties_at_the_threshold():
    """Scores in {0, 1} with more 1s than free slots: every kept non-forced block scores 1, and
    they are the lowest-index blocks scoring 1."""
    nb, K = 300, 40
    q = torch.zeros(1, 2, 1, 16, device=DEVICE)
    q[..., 0] = 1.0  # score of a block = its mean's first coordinate (times G = 2)
    k = torch.zeros(1, 1, nb * 16, 16, device=DEVICE)
    lens = lengths(nb * 16)
    g = torch.Generator().manual_seed(11)
    ones = torch.rand(nb, generator=g) < 0.5
    means = torch.zeros(1, 1, nb, 16, device=DEVICE)
    means[0, 0, ones.to(DEVICE), 0] = 1.0
    assert int(ones.sum()) > K
    idx, cnt = select_topk_blocks(q, k, lens, block_size=16, top_k=K, sink_blocks=1, local_blocks=1,
                                  key_means=means, backend="triton")
    forced = {0, nb - 1}
    ones_free = [i for i in range(nb) if bool(ones[i]) and i not in forced]
    expect = sorted(forced | set(ones_free[: K - len(forced)]))
    assert int(cnt[0, 0]) == K and idx[0, 0].tolist() == expect
    # a longer threshold tie: only 3 ones, the zeros fill the rest from the lowest index
    means.zero_()
    means[0, 0, [7, 100, 250], 0] = 1.0
    idx, _ = select_topk_blocks(q, k, lens, block_size=16, top_k=K, sink_blocks=1, local_blocks=1,
                                key_means=means, backend="triton")
    zeros_free = [i for i in range(1, nb - 1) if i not in (7, 100, 250)]
    assert idx[0, 0].tolist() == sorted({0, nb - 1, 7, 100, 250} | set(zeros_free[: K - 5]))


@needs_triton
def test_selection_kernel_ranks_infinite_and_nan_scores():
    """+inf scores rank like the largest number (above every finite score, ties by index), -inf
    like the lowest number, which is also where NaN ranks (so -inf and NaN tie, by index, as in
    the reference); all of them stay eligible, and the forced blocks come first whatever their
    score."""
    nb = 12
    q = torch.zeros(1, 1, 1, 16, device=DEVICE)
    q[..., 0] = 1.0
    k = torch.zeros(1, 1, nb * 16, 16, device=DEVICE)
    lens = lengths(nb * 16)
    vals = [float("nan"), 5.0, float("-inf"), float("inf"), -1.0, float("nan"), float("inf"), 2.0,
            float("-inf"), -0.0, 0.0, float("nan")]
    means = torch.zeros(1, 1, nb, 16, device=DEVICE)
    means[0, 0, :, 0] = torch.tensor(vals, device=DEVICE)
    means[0, 0, 9] = -0.0  # score -0 (every product -0): it ties with block 10's +0

    def sel(K, sink=0, local=0, backend="triton"):
        idx, cnt = select_topk_blocks(q, k, lens, block_size=16, top_k=K, sink_blocks=sink, local_blocks=local,
                                      key_means=means, backend=backend)
        return idx[0, 0, : int(cnt[0, 0])].tolist()

    # inf(3), inf(6), 5(1), 2(7), 0(9: -0 ties +0), 0(10), -1(4), then -inf and NaN by index
    order = [3, 6, 1, 7, 9, 10, 4, 0, 2, 5, 8, 11]
    for K in range(1, nb + 1):
        assert sel(K) == sorted(order[:K]), K
        if K in (2, 3, 4, 6, 7, 12):  # no tie straddles the cut: the reference keeps the same set
            assert sel(K) == sel(K, backend="reference"), K
    # forced: block 0 (NaN, sink) and block 11 (NaN, local) first
    assert sel(4, sink=1, local=1) == sorted([0, 11, 3, 6])
    assert sel(4, sink=1, local=1) == sel(4, sink=1, local=1, backend="reference")


@needs_triton
def test_quest_kernel_ranks_a_nan_query_like_the_reference():
    """A NaN in one query head makes every page bound of its group NaN (the reference's clamp
    keeps NaN): those pages rank lowest and tie, so the group keeps its last page and then the
    lowest indices; the other group is unaffected. (On GPUs max/min return the non-NaN operand,
    so the kernel must not build relu(q) from them.)"""
    q, k, _ = make_inputs(1, 4, 2, 1, 320, 32, seed=31)
    q[0, 1, 0, 5] = float("nan")  # head 1: group 0
    lens = lengths(320)
    K, pages = 6, 20
    got = select_quest_pages(q, k, lens, page_size=16, top_k=K, backend="triton")
    want = select_quest_pages(q, k, lens, page_size=16, top_k=K, backend="reference")
    assert got[0][0, 0].tolist() == sorted(set(range(K - 1)) | {pages - 1})
    assert torch.equal(got[0][0, 1], want[0][0, 1]) and torch.equal(got[1], want[1])
    assert pages - 1 in want[0][0, 0].tolist()


def test_moba_always_keeps_the_current_block():
    q, k, _ = make_inputs(3, 4, 2, 1, 256, 32, seed=13)
    lens = lengths(256, 161, 40)
    # make every current block the worst-gated block: its keys point against every query
    for b, L in enumerate(lens.tolist()):
        cur = (L - 1) // 32
        k[b, :, cur * 32: L] = -10 * q[b].sum((0, 1))
    idx, cnt = select_moba_blocks(q, k, lens, block_size=32, top_k=3)
    means = block_key_means(k, lens, 32)
    for b, L in enumerate(lens.tolist()):
        cur = (L - 1) // 32
        for h in range(2):
            chosen = idx[b, h, : int(cnt[b, h])].tolist()
            assert cur in chosen and int(cnt[b, h]) == min(3, cur + 1)
            assert all(j <= cur for j in chosen)  # never a future block
            gate = {j: sum(q[b, h * 2 + g, 0].double() @ means[b, h, j].double() for g in range(2)).item()
                    for j in range(cur)}  # complete past blocks only
            best = sorted(gate, key=lambda j: -gate[j])[: min(3, cur + 1) - 1]
            assert set(chosen) == set(best) | {cur}


def test_moba_chunk_straddling_a_block_boundary_keeps_both_current_blocks():
    q, k, _ = make_inputs(1, 2, 1, 3, 128, 16, seed=14)
    lens = lengths(65)  # queries at 62, 63 (block 1) and 64 (block 2)
    idx, cnt = select_moba_blocks(q, k, lens, block_size=32, top_k=1)
    assert int(cnt[0, 0]) == 2 and set(idx[0, 0, :2].tolist()) == {1, 2}
    idx, cnt = select_moba_blocks(q, k, lens, block_size=32, top_k=3)
    assert int(cnt[0, 0]) == 3 and set(idx[0, 0, :3].tolist()) == {0, 1, 2}


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=needs_triton)])
def test_selectors_feed_sparse_decode(backend):
    """End to end: each selector's output is a valid selection, and decoding with it equals the
    independent loop over the kept keys."""
    q, k, v = make_inputs(3, 8, 2, 1, 192, 64, seed=15)
    k[1, :, 100:] = float("nan")  # garbage past the length reaches neither selector nor kernel
    v[1, :, 100:] = float("nan")
    lens = lengths(192, 100, 1)
    for idx, cnt, bs in (
        (*select_topk_blocks(q, k, lens, block_size=32, top_k=3), 32),
        (*select_quest_pages(q, k, lens, page_size=16, top_k=4), 16),
        (*select_moba_blocks(q, k, lens, block_size=64, top_k=2), 64),
    ):
        out = sparse_decode(q, k, v, lens, idx, cnt, block_size=bs, backend=backend)
        assert err(out, loop_attention(q, k, v, lens, idx, cnt, bs, 1 / 8)[0]) < 1e-5


# ---------------------------------------------------------------------------- bad input
def _good():
    q, k, v = make_inputs(2, 4, 2, 1, 64, 16)
    lens = lengths(64, 20)
    idx = torch.tensor([[[0, 3], [1, 2]], [[0, 1], [1, 0]]], dtype=torch.int32, device=DEVICE)
    cnt = torch.tensor([[2, 2], [2, 1]], dtype=torch.int32, device=DEVICE)
    return dict(q=q, k_cache=k, v_cache=v, cache_seqlens=lens, block_indices=idx, block_counts=cnt, block_size=16)


def _call(**changes):
    kw = _good()
    kw.update(changes)
    return sparse_decode(**kw)


def _with(name, fn):
    kw = _good()
    return {name: fn(kw[name])}


def _nan_q(q):
    q = q.clone()
    q[1, 2, 0, 5] = float("nan")
    return q


BAD = [  # id, changes (built from the good inputs), error type, message pattern
    ("q-not-tensor", lambda: {"q": [1.0]}, TypeError, "q must be a torch.Tensor"),
    ("q-rank", lambda: _with("q", lambda t: t[0]), ValueError, r"q must have 4 dims"),
    ("q-int", lambda: _with("q", lambda t: t.long()), TypeError, "q has dtype torch.int64"),
    ("dtype-mismatch", lambda: _with("k_cache", lambda t: t.double()), TypeError, "share one dtype.*k_cache=torch.float64"),
    ("v-shape", lambda: _with("v_cache", lambda t: t[:, :, :32]), ValueError, "k_cache and v_cache must have the same shape"),
    ("batch", lambda: _with("q", lambda t: torch.cat([t, t])), ValueError, "batch size differs"),
    ("head-dim", lambda: _with("q", lambda t: t[..., :8]), ValueError, "head dim"),
    ("gqa", lambda: _with("q", lambda t: t[:, :3]), ValueError, r"multiple of the cache's heads Hkv=2"),
    ("tq-17", lambda: _with("q", lambda t: t.expand(-1, -1, 17, -1)), ValueError, r"Tq=17.*1\.\.16"),
    ("tmax-lt-tq", lambda: {"q": _good()["q"].expand(-1, -1, 3, -1), "k_cache": _good()["k_cache"][:, :, :2],
                            "v_cache": _good()["v_cache"][:, :, :2]}, ValueError, "Tmax=2 positions < Tq=3"),
    ("seqlens-float", lambda: _with("cache_seqlens", lambda t: t.float()), TypeError, "cache_seqlens must be int32 or int64"),
    ("seqlens-shape", lambda: _with("cache_seqlens", lambda t: t[:1]), ValueError, r"cache_seqlens must have shape \[B\]"),
    ("seqlens-device", lambda: _with("cache_seqlens", lambda t: t.to("meta")), ValueError, "cache_seqlens is on meta"),
    ("seqlens-zero", lambda: _with("cache_seqlens", lambda t: torch.zeros_like(t)), ValueError, r"cache_seqlens must lie in \[Tq=1, Tmax=64\]"),
    ("seqlens-over", lambda: _with("cache_seqlens", lambda t: t + 1), ValueError, r"cache_seqlens must lie in \[Tq=1, Tmax=64\]"),
    ("seqlens-lt-tq", lambda: {"q": _good()["q"].expand(-1, -1, 4, -1),
                               "cache_seqlens": lengths(64, 3)}, ValueError, r"cache_seqlens must lie in \[Tq=4"),
    ("indices-float", lambda: _with("block_indices", lambda t: t.float()), TypeError, "block_indices must be int32"),
    ("indices-shape", lambda: _with("block_indices", lambda t: t[:, :1]), ValueError, r"block_indices must have shape \[B, Hkv, K\]"),
    ("counts-shape", lambda: _with("block_counts", lambda t: t[:, None]), ValueError, r"block_counts must have shape \[B, Hkv\]"),
    ("counts-over-k", lambda: _with("block_counts", lambda t: t + 1), ValueError, r"block_counts must lie in \[0, K=2\]"),
    ("counts-negative", lambda: _with("block_counts", lambda t: t - 3), ValueError, r"block_counts must lie in \[0, K=2\]"),
    # sequence 1 has 20 keys = 2 blocks of 16: block 2 is past its length
    ("index-past-length", lambda: _with("block_indices", lambda t: torch.where(t == 1, 2, t)), ValueError,
     r"block_indices: .*\[0, ceil\(cache_seqlens / block_size\)\)"),
    ("index-negative", lambda: _with("block_indices", lambda t: t - 1), ValueError, "block_indices"),
    ("index-repeated", lambda: _with("block_indices", lambda t: torch.zeros_like(t)), ValueError, "block_indices repeats"),
    ("nan-q", lambda: _with("q", _nan_q), ValueError, "q contains NaN"),
    ("block-size-0", lambda: {"block_size": 0}, ValueError, "block_size must be an int >= 1"),
    ("block-size-bool", lambda: {"block_size": True}, TypeError, "block_size must be an int"),
    ("scale", lambda: {"scale": -1.0}, ValueError, "scale must be a finite positive number"),
    ("backend", lambda: {"backend": "flex"}, ValueError, r"backend must be one of \('auto', 'reference', 'triton'\)"),
    ("num-splits", lambda: {"num_splits": 0}, ValueError, "num_splits must be an int >= 1"),
    ("return-lse", lambda: {"return_lse": 1}, TypeError, "return_lse must be a bool"),
]


@pytest.mark.parametrize("changes,exc,pattern", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input(changes, exc, pattern):
    with pytest.raises(exc, match=pattern):
        _call(**changes())


def test_good_input_and_unvalidated_call_agree():
    out = _call()
    assert torch.equal(out, _call(validate=False))
    assert torch.isfinite(out).all()


def test_empty_batch_gives_empty_output():
    kw = _good()
    for name in ("q", "k_cache", "v_cache", "cache_seqlens", "block_indices", "block_counts"):
        kw[name] = kw[name][:0]
    out, lse = sparse_decode(**kw, return_lse=True)
    assert out.shape == (0, 4, 1, 16) and lse.shape == (0, 4, 1)


@needs_triton
def test_triton_refuses_what_it_cannot_serve_and_auto_falls_back():
    q, k, v = make_inputs(2, 4, 2, 1, 64, 48)  # D = 48: not a power of two
    kw = {k_: v_ for k_, v_ in _good().items() if k_ not in ("q", "k_cache", "v_cache")}
    with pytest.raises(ValueError, match=r"backend='triton' cannot serve.*power of two.*D=48"):
        sparse_decode(q, k, v, **kw, backend="triton")
    ref = sparse_decode(q, k, v, **kw, backend="reference")
    assert torch.equal(sparse_decode(q, k, v, **kw, backend="auto"), ref)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32.*float64"):
        sparse_decode(*(t.double() for t in make_inputs(2, 4, 2, 1, 64, 16)), **kw, backend="triton")
    qg = make_inputs(2, 4, 2, 1, 64, 16)[0].requires_grad_(True)
    with pytest.raises(ValueError, match="no backward"):
        sparse_decode(qg, *make_inputs(2, 4, 2, 1, 64, 16)[1:], **kw, backend="triton")


def test_triton_unavailable_is_reported(monkeypatch):
    import longattn.kernels

    monkeypatch.setattr(longattn.kernels, "triton_unavailable_reason", lambda device: "no Triton in this test")
    with pytest.raises(ValueError, match="backend='triton' cannot serve this call: no Triton in this test"):
        _call(backend="triton")
    assert torch.equal(_call(backend="auto"), _call(backend="reference"))


@pytest.mark.parametrize("call,exc,pattern", [
    (lambda q, k, L: select_topk_blocks(q, k, L, block_size=16, top_k=0), ValueError, "top_k must be an int >= 1"),
    (lambda q, k, L: select_topk_blocks(q, k, L, block_size=16, top_k=2, sink_blocks=2, local_blocks=1),
     ValueError, "sink_blocks \\+ local_blocks = 3 must be <= top_k=2"),
    (lambda q, k, L: select_topk_blocks(q, k, L, block_size=16, top_k=2, sink_blocks=-1), ValueError, "sink_blocks"),
    (lambda q, k, L: select_quest_pages(q, k, L, page_size=0, top_k=2), ValueError, "page_size must be an int >= 1"),
    (lambda q, k, L: select_quest_pages(q, k, L, page_size=16, top_k=2, bounds=page_bounds(k, L, 32)),
     ValueError, "bounds must be \\(kmin, kmax\\)"),
    (lambda q, k, L: select_moba_blocks(q[0], k, L, block_size=16, top_k=2), ValueError, "q must have 4 dims"),
    (lambda q, k, L: select_moba_blocks(q, k, L.float(), block_size=16, top_k=2), TypeError, "cache_seqlens must be int32"),
])
def test_selector_bad_input(call, exc, pattern):
    kw = _good()
    with pytest.raises(exc, match=pattern):
        call(kw["q"], kw["k_cache"], kw["cache_seqlens"])


@needs_triton
def test_selection_past_the_kernel_limit_falls_back_under_auto(monkeypatch):
    """Past the ranking kernel's blocks per row (a row of keys lives in registers),
    ``backend="triton"`` names the limit and ``"auto"`` runs the reference."""
    import longattn.kernels.decode.select as select_kernels

    q, k, _ = make_inputs(2, 4, 2, 1, 300, 32, seed=21)
    lens = lengths(300, 170)
    monkeypatch.setattr(select_kernels, "MAX_SELECT_BLOCKS", 8)
    for select, kw in ((select_topk_blocks, {"block_size": 16}), (select_quest_pages, {"page_size": 16})):
        with pytest.raises(ValueError, match=r"at most 8 blocks, this cache has 19"):
            select(q, k, lens, top_k=4, backend="triton", **kw)
        got = select(q, k, lens, top_k=4, backend="auto", **kw)
        want = select(q, k, lens, top_k=4, backend="reference", **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_selection_kernel_over_more_rows_than_one_launch_holds(monkeypatch):
    """(sequence, KV head) rows past one ranking launch's limit (CUDA's 65535, patched to 4 here:
    3 x 2 = 6 rows in two launches, of 4 and 2) give the reference's selection."""
    q, k, _ = make_inputs(3, 4, 2, 1, 300, 32, seed=22)
    lens = lengths(300, 170, 45)
    launches = limit_rank_launches(monkeypatch, 4)
    for select, kw in ((select_topk_blocks, {"block_size": 16}), (select_quest_pages, {"page_size": 16})):
        launches.clear()
        got = select(q, k, lens, top_k=4, backend="triton", **kw)
        assert launches == [4, 2], select.__name__
        want = select(q, k, lens, top_k=4, backend="reference", **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@needs_triton
def test_selection_kernel_clamps_lengths_outside_the_cache_as_the_reference():
    """The selectors do not check lengths (no host sync; ``sparse_decode`` does): a length of 0
    or past the cache ranks like the nearest valid one, 1 or ``Tmax``, in the kernel as in the
    reference, so neither the kept blocks nor the always-kept last block differ."""
    q, k, _ = make_inputs(3, 4, 2, 1, 100, 32, seed=23)
    lens = lengths(0, 130, 100)
    for select, kw in ((select_topk_blocks, {"block_size": 16, "sink_blocks": 1, "local_blocks": 1}),
                       (select_quest_pages, {"page_size": 16})):
        got = select(q, k, lens, top_k=4, backend="triton", **kw)
        want = select(q, k, lens, top_k=4, backend="reference", **kw)
        assert got[1].tolist() == want[1].tolist() == [[1, 1], [4, 4], [4, 4]], select.__name__
        assert torch.equal(got[0], want[0]), select.__name__
        clamped = select(q, k, lengths(1, 100, 100), top_k=4, backend="triton", **kw)
        assert torch.equal(got[0], clamped[0]) and torch.equal(got[1], clamped[1])  # 0 as 1, 130 as 100


@needs_triton
def test_strided_lengths_are_read_at_their_stride():
    """``cache_seqlens`` as a strided view (a column of a [B, 2] tensor): the selection and
    decoding kernels read each sequence's own length."""
    q, k, v = make_inputs(3, 4, 2, 2, 200, 32, seed=24)
    table = torch.tensor([[200, 7], [61, 7], [133, 7]], dtype=torch.int32, device=DEVICE)
    lens = table[:, 0]
    assert lens.stride(0) == 2
    for select, kw in ((select_topk_blocks, {"block_size": 16}), (select_quest_pages, {"page_size": 16})):
        got = select(q, k, lens, top_k=3, backend="triton", **kw)
        want = select(q, k, lens.contiguous(), top_k=3, backend="reference", **kw)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), select.__name__
    idx, cnt = select_topk_blocks(q, k, lens, block_size=16, top_k=3, backend="reference")
    out = sparse_decode(q, k, v, lens, idx, cnt, block_size=16, backend="triton")
    ref = sparse_decode(q, k, v, lens.contiguous(), idx, cnt, block_size=16, backend="reference")
    assert err(out, ref) < 1e-5
