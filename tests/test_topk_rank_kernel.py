"""Block top-k selection with the ranking kernel (``select_topk_ranked``, the path ``select_topk``
takes on a GPU) against the PyTorch specification ``select_topk_reference``: the same
``kv_num_blocks``, ``kv_indices`` and ``block_full``, bit for bit, over causal and bidirectional
selections, chunked prefill (queries ending with the keys), group-shared scores, ``top_k`` on both
sides of the reference's two ranking routes and beyond the number of blocks, partial last blocks,
non-finite scores; exact ties against an independent Python ranking; the fallback where the
query blocks do not line up with the key blocks; bad input. CPU runs use the Triton interpreter."""

from __future__ import annotations

import pytest
import torch

from longattn.methods.topk import (
    TopKConfig,
    ranking_kernel_unsupported_reason,
    select_topk,
    select_topk_ranked,
    select_topk_reference,
)
from longattn.methods._common import MAX_PASSES_K

from .conftest import limit_rank_launches, rand_qkv, stable_seed

DEV = "cuda" if torch.cuda.is_available() else "cpu"

# (Tq, Tk, H, Hkv, block_size, top_k, shared, causal)
CASES = [
    (256, 256, 4, 2, 16, 4, False, True),  # k <= MAX_PASSES_K: the reference's passes of max
    (256, 256, 4, 2, 16, 11, True, True),  # k > MAX_PASSES_K: the reference's stable sort
    (200, 200, 4, 1, 16, 5, True, True),  # a partial last block
    (64, 256, 4, 2, 16, 6, False, True),  # chunked prefill: 64 queries ending with 256 keys
    (48, 208, 2, 2, 16, 12, False, True),  # chunk of three blocks, a partial last key block
    (256, 256, 4, 2, 16, 10, False, False),  # bidirectional
    (64, 256, 4, 1, 32, 3, True, False),  # bidirectional, fewer queries than keys
    (64, 64, 2, 1, 16, 8, False, True),  # top_k beyond the 4 blocks: K = nKB, every eligible block kept
    (64, 64, 2, 1, 16, 9, False, False),  # the same, bidirectional
]


def _assert_same(got, want):
    assert got.q_block == want.q_block and got.kv_block == want.kv_block
    assert (got.q_len, got.kv_len, got.num_heads, got.causal) == (want.q_len, want.kv_len, want.num_heads, want.causal)
    assert got.kv_num_blocks.dtype == want.kv_num_blocks.dtype == torch.int32
    assert got.kv_indices.dtype == want.kv_indices.dtype == torch.int32
    assert torch.equal(got.kv_num_blocks, want.kv_num_blocks)
    assert torch.equal(got.kv_indices, want.kv_indices)
    assert torch.equal(got.block_full, want.block_full)
    assert (got.mask_mod is None) == (want.mask_mod is None)
    assert torch.equal(got.to_dense_mask(), want.to_dense_mask())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}-bs{c[4]}-k{c[5]}-{'shared' if c[6] else 'head'}-"
                                             f"{'causal' if c[7] else 'bidir'}" for c in CASES])
def test_ranked_selection_equals_the_reference(case, dtype):
    Tq, Tk, H, Hkv, bs, top_k, shared, causal = case
    q, k, _ = rand_qkv(2, H, Hkv, Tq, Tk, 32, dtype=dtype, device=DEV, seed=stable_seed(case, str(dtype)))
    cfg = TopKConfig(block_size=bs, top_k=top_k, shared_kv_heads=shared)
    assert ranking_kernel_unsupported_reason(q, k, cfg) is None
    want = select_topk_reference(q, k, causal, cfg)
    got = select_topk_ranked(q, k, causal, cfg)
    _assert_same(got, want)
    # what the rows had to do: keep top_k of more eligible blocks (some rows at least), or,
    # where top_k reaches the number of blocks, keep every eligible one
    n_kb = -(-Tk // bs)
    rows = torch.arange(want.kv_num_blocks.shape[2]) + (Tk - Tq) // bs  # absolute query blocks
    eligible = (rows + 1).clamp(max=n_kb) if causal else torch.full_like(rows, n_kb)
    counts = want.kv_num_blocks.cpu()
    assert torch.equal(counts, eligible.clamp(max=top_k).to(torch.int32).expand_as(counts))
    if top_k < n_kb:
        assert (eligible > top_k).any()  # a real choice in those rows


def _tie_inputs(Tq, Tk, bs, levels, dtype):
    """q all ones and key block ``j`` all ``levels[j]``: the score of block ``j`` is exactly
    ``levels[j] * D`` (small integers: exact in fp32 whatever the summation order), so
    blocks with equal levels tie exactly."""
    D = 16
    q = torch.ones(1, 2, Tq, D, dtype=dtype, device=DEV)
    lv = torch.tensor(levels, dtype=torch.float32).repeat_interleave(bs)[:Tk]
    k = lv[None, None, :, None].expand(1, 1, Tk, D).to(dtype=dtype, device=DEV).contiguous()
    return q, k


def _python_topk(levels, row, top_k, causal):
    """Independent ranking of one query block ``row``: its own block, then the others by
    level, equal levels to the lower index; returned ascending."""
    n = len(levels)
    cand = [j for j in range(n) if (j <= row or not causal) and j != row]
    cand.sort(key=lambda j: (-levels[j], j))
    kept = [row] + cand[: min(top_k, n) - 1]
    return sorted(kept)


@pytest.mark.parametrize("top_k", [3, MAX_PASSES_K + 3])
@pytest.mark.parametrize("causal", [True, False])
def test_exact_ties_go_to_the_lower_block_index(top_k, causal):
    bs, Tq = 16, 320
    levels = [j % 3 for j in range(Tq // bs)]  # 20 blocks, levels 0, 1, 2 repeating: many ties
    q, k = _tie_inputs(Tq, Tq, bs, levels, torch.bfloat16)
    cfg = TopKConfig(block_size=bs, top_k=top_k)
    ref = select_topk_reference(q, k, causal, cfg)
    got = select_topk_ranked(q, k, causal, cfg)
    for sel in (ref, got):
        for row in range(len(levels)):
            want = _python_topk(levels, row, top_k, causal)
            n = int(sel.kv_num_blocks[0, 0, row])
            assert n == len(want), (row, n, want)
            assert sel.kv_indices[0, 0, row, :n].tolist() == want, row
            assert sel.kv_indices[0, 0, row, n:].eq(0).all()
    _assert_same(got, ref)


@pytest.mark.parametrize("kind", ["block top-k", "per token", "decoding"])
def test_gpu_and_interpreter_layouts_rank_alike(monkeypatch, kind):
    """The ranking kernel's two layouts (``_rank_layout``: one row per program on GPUs, many rows
    per program under the interpreter) give the same indices, counts and flags bit for bit, with
    exact ties, NaN and infinities among the scores."""
    import longattn.kernels.nsa as nsa

    g = torch.Generator().manual_seed(11)
    B, Hs, R, nKB = {"block top-k": (1, 2, 12, 24), "per token": (1, 1, 12, 600), "decoding": (5, 1, 4, 1100)}[kind]
    s = torch.randint(0, 4, (B, Hs, R, nKB), generator=g).float()  # many exact ties
    u = torch.rand(s.shape, generator=g)
    s = torch.where(u < 0.05, float("nan"), torch.where(u < 0.1, float("inf"), torch.where(u < 0.15, -float("inf"), s)))
    kw = {"block top-k": dict(first_position=0, row_stride=16, block=16, top_k=5, num_init_blocks=1,
                              num_local_blocks=1, causal=True),
          "per token": dict(first_position=9000, row_stride=1, block=16, top_k=16, num_init_blocks=1,
                            num_local_blocks=2, causal=True),
          "decoding": dict(first_position=-4, row_stride=1, block=64, top_k=16, num_init_blocks=1,
                           num_local_blocks=2, causal=True,
                           kv_lens=torch.tensor([4, 64, 65, 30000, 70400], device=DEV))}[kind]
    s = s.to(DEV)
    interp = nsa.rank_blocks(s, **kw)
    rows_per_program = nsa._rank_layout(max(16, 1 << (nKB - 1).bit_length()), R)[0]
    assert rows_per_program == 1 if DEV == "cuda" else rows_per_program > 1  # the interpreter packs rows
    monkeypatch.setattr(nsa, "_rank_layout", lambda nb_pad, rows: (1, max(1, nb_pad // 512)))
    gpu = nsa.rank_blocks(s, **kw)
    for a, b in zip(interp, gpu):
        assert torch.equal(a, b)
    assert (interp[1] > 0).any()


def test_non_finite_scores_rank_like_the_reference():
    """An infinite query entry makes scores of +-inf and NaN (inf * 0): NaN ranks last among the
    eligible blocks, +-inf as the largest / smallest finite float, in both paths."""
    q, k, _ = rand_qkv(1, 2, 1, 128, 128, 16, device=DEV, seed=3)
    k[:, :, 32:48] = 0.0  # block 2: mean 0, so inf * 0 = NaN scores
    q[0, 0, 70, 3] = float("inf")
    q[0, 1, 100, 5] = float("-inf")
    cfg = TopKConfig(block_size=16, top_k=4)
    from longattn.methods._common import pooled_block_scores

    s = pooled_block_scores(q, k, 16, 16)
    assert s.isnan().any() and s.isinf().any()
    _assert_same(select_topk_ranked(q, k, True, cfg), select_topk_reference(q, k, True, cfg))


def test_unaligned_query_blocks_fall_back_to_the_reference():
    """37 queries ending with 200 keys: the query blocks straddle the key blocks (each query gets
    its own row), which the ranking kernel does not take: ``select_topk`` uses the reference and
    ``select_topk_ranked`` says why it cannot run."""
    q, k, _ = rand_qkv(1, 2, 1, 37, 200, 16, device=DEV, seed=4)
    cfg = TopKConfig(block_size=16, top_k=4)
    reason = ranking_kernel_unsupported_reason(q, k, cfg)
    assert reason is not None and "line up" in reason
    with pytest.raises(ValueError, match="select_topk_ranked cannot run.*line up"):
        select_topk_ranked(q, k, True, cfg)
    sel = select_topk(q, k, True, cfg)
    ref = select_topk_reference(q, k, True, cfg)
    assert sel.q_block == 1
    assert torch.equal(sel.kv_indices, ref.kv_indices) and torch.equal(sel.kv_num_blocks, ref.kv_num_blocks)


def test_select_topk_takes_the_kernel_on_a_gpu_only(monkeypatch):
    """On CUDA tensors ``select_topk`` runs the ranking kernel; on CPU the reference (the
    interpreter would be far slower than PyTorch)."""
    import longattn.methods.topk as mod

    calls = []
    real = mod._ranked_selection
    monkeypatch.setattr(mod, "_ranked_selection", lambda *a: calls.append(1) or real(*a))
    q, k, _ = rand_qkv(1, 2, 1, 64, 64, 16, device=DEV, seed=5)
    cfg = TopKConfig(block_size=16, top_k=2)
    sel = select_topk(q, k, True, cfg)
    assert calls == ([1] if DEV == "cuda" else [])
    _assert_same(sel, select_topk_reference(q, k, True, cfg))


def test_more_slices_than_one_launch_holds_run_in_several_launches(monkeypatch):
    """The ranking launch puts batch x heads on its grid's second axis (at most 65535 on CUDA):
    more slices run in several launches, each offset by the slices before it. With the limit
    patched to 3, the 2 x 4 slices here take three launches (3, 3, 2) and give the reference's
    selection, bit for bit."""
    q, k, _ = rand_qkv(2, 4, 2, 96, 96, 16, device=DEV, seed=stable_seed("slices"))
    cfg = TopKConfig(block_size=16, top_k=3)
    assert ranking_kernel_unsupported_reason(q, k, cfg) is None
    launches = limit_rank_launches(monkeypatch, 3)
    _assert_same(select_topk_ranked(q, k, True, cfg), select_topk_reference(q, k, True, cfg))
    assert launches == [3, 3, 2]


def test_a_failing_kernel_falls_back_to_the_reference_with_a_warning(monkeypatch):
    """A GPU Triton cannot compile for (or any other kernel failure): ``select_topk`` warns and
    selects with the reference; running out of memory is raised, not hidden."""
    import longattn.methods.topk as mod

    monkeypatch.setattr(mod, "_kernel_device", lambda q: True)
    q, k, _ = rand_qkv(1, 2, 1, 64, 64, 16, device=DEV, seed=8)
    cfg = TopKConfig(block_size=16, top_k=2)

    def broken(*args):
        raise RuntimeError("no kernel image is available for this GPU")

    monkeypatch.setattr(mod, "_ranked_selection", broken)
    with pytest.warns(RuntimeWarning, match="ranking kernel failed.*no kernel image"):
        sel = select_topk(q, k, True, cfg)
    _assert_same(sel, select_topk_reference(q, k, True, cfg))

    def oom(*args):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(mod, "_ranked_selection", oom)
    with pytest.raises(torch.cuda.OutOfMemoryError):
        select_topk(q, k, True, cfg)
