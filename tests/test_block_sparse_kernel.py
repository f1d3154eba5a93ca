"""longattn's Triton block-sparse kernels against the dense reference, through the Triton
interpreter on CPU (TRITON_INTERPRET=1, set in conftest.py) at small sizes; on a GPU run
(LONGATTN_TEST_DEVICE=cuda) the same tests run compiled, and tests/test_conformance.py adds
its full grid.

Every selection method, forward (output and log-sum-exp) and backward (dq, dk, dv), MHA and
GQA, fp32 and bf16, causal and bidirectional, queries equal to or shorter than keys, with the
DESIGN.md tolerance: error against the fp32 reference at most twice that of plain PyTorch in
the same dtype, plus a floor."""

from __future__ import annotations

import warnings

import pytest
import torch

import longattn
from longattn.api import validate_inputs
from longattn.backends import dense_masked_attention, plain_precision
from longattn.kernels import triton_unavailable_reason
from longattn.selection import BlockSelection

from .conftest import rand_qkv, stable_seed

pytestmark = pytest.mark.skipif(
    triton_unavailable_reason(torch.device("cpu")) is not None and not torch.cuda.is_available(),
    reason=f"Triton kernels cannot run here: {triton_unavailable_reason(torch.device('cpu'))}",
)

from longattn.kernels.block_sparse import (  # noqa: E402
    _plan,
    block_sparse_attention,
    selection_unsupported_reason,
    transposed_selection,
)

FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3}

# small configs: several blocks at T <= 100, every selection layout the kernels take
CASES = {
    "window": {"window": 24, "block_size": 16},  # band, selection shared by all heads
    "sink": {"sink": 3, "window": 20, "block_size": 16},
    "bigbird": {"block_size": 16, "num_window_blocks": 3, "num_global_blocks": 1, "num_random_blocks": 1},
    "topk": {"block_size": 16, "top_k": 2},  # per query head
    "topk-shared": {"block_size": 16, "top_k": 2, "shared_kv_heads": True},  # per GQA group
    "moba": {"block_size": 32, "top_k": 2, "gate_block": 16},
    "moba-per-token": {"block_size": 32, "top_k": 2},  # the paper's per-token gate: q_block 1
}
SHAPES = [(1, 1), (50, 50), (20, 90), (1, 90)]


def _method(case: str) -> str:
    return case.split("-")[0]


def _error(a, b):
    return (a.double() - b.double()).abs().max().item()


def _selection(case, q, k, causal):
    spec = longattn.get_method(_method(case))
    return spec.selector(q, k, causal, spec.make_config(**CASES[case]))


def _reference(q, k, v, sel, causal):
    inputs = validate_inputs(q, k, v, causal=causal, scale=None)
    return dense_masked_attention(inputs, sel.to_dense_mask())


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def _fp32_and_plain(attend, q, k, v, g):
    """The two references of the tolerance rule: ``attend`` (``(q, k, v) -> (out, ...)``) on fp32
    copies of the inputs and, under :func:`plain_precision`, on the inputs themselves, each with
    its gradients for ``g``: ``(fp32 result tuple, fp32 grads, plain out, plain grads)``."""
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref = attend(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref[0], (q32, k32, v32), g.float())
    with plain_precision():
        plain = attend(q, k, v)[0]
        plain_grads = torch.autograd.grad(plain, (q, k, v), g)
    return ref, ref_grads, plain, plain_grads


def _abs_dkdv_terms(q, k, v, g, sel, scale):
    """fp64 ``(sum |dS^T Q| * scale, sum |P^T dO|)`` term by term: for each dK/dV element the sum of
    the absolute values of the products it adds up (over the query rows of every head of its KV
    head), which bounds how far two summation orders of those products can round apart."""
    q, k, v, g = (t.detach().double() for t in (q, k, v, g))
    G = q.shape[1] // k.shape[1]
    kx, vx = (t.repeat_interleave(G, dim=1) for t in (k, v))
    keep = sel.to_dense_mask().to(q.device)  # [B or 1, selection heads, Tq, Tk]
    keep = keep.repeat_interleave(q.shape[1] // keep.shape[1], dim=1)
    s = torch.where(keep, q @ kx.transpose(-1, -2) * scale, float("-inf"))
    p = torch.nan_to_num(torch.softmax(s, -1))  # rows that see nothing: 0
    ds = p * (g @ vx.transpose(-1, -2) - (g * (p @ vx)).sum(-1, keepdim=True))
    fold = lambda t: t.unflatten(1, (k.shape[1], G)).sum(2)  # noqa: E731 - heads of a KV head
    return fold(ds.abs().transpose(-1, -2) @ q.abs()) * scale, fold(p.transpose(-1, -2) @ g.abs())


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("Tq,Tk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_forward_and_backward_match_reference(case, dtype, H, Hkv, Tq, Tk):
    if case == "moba-per-token" and Tq == 50:
        Tq, Tk = 16, 40  # one program per query token: the interpreter is slow, keep it short
    dev = _device()
    spec = longattn.get_method(_method(case))
    causal_modes = [True, False] if spec.bidirectional and Tq == Tk and Tq > 1 else [True]
    for i, causal in enumerate(causal_modes):
        q, k, v = rand_qkv(1, H, Hkv, Tq, Tk, 64, dtype=dtype, device=dev, seed=stable_seed(case, Tq, i),
                           requires_grad=True)
        g = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(dev, dtype)
        sel = _selection(case, q.detach(), k.detach(), causal)
        assert selection_unsupported_reason(q, k, sel) is None

        (ref, ref_lse), ref_grads, plain, plain_grads = _fp32_and_plain(
            lambda a, b, c: _reference(a, b, c, sel, causal), q, k, v, g)

        out, lse = block_sparse_attention(q, k, v, sel, q.shape[-1] ** -0.5)
        grads = torch.autograd.grad(out, (q, k, v), g)

        assert out.shape == q.shape and out.dtype == dtype and torch.isfinite(out).all()
        bound = 2 * _error(plain, ref) + FLOOR[dtype]
        assert _error(out, ref) <= bound, (case, causal, "out", _error(out, ref), bound)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isfinite(lse), finite)
        assert _error(lse[finite], ref_lse[finite]) <= 1e-5 + (2e-2 if dtype == torch.bfloat16 else 0)
        for which, f, p, r in zip("qkv", grads, plain_grads, ref_grads):
            assert torch.isfinite(f).all(), f"d{which} has non-finite elements"
            bound = 2 * _error(p, r) + FLOOR[dtype] * max(1.0, r.abs().max().item())
            assert _error(f, r) <= bound, (case, causal, "d" + which, _error(f, r), bound)


@pytest.mark.parametrize("growth", [30.0, 3.0, -5.0])
def test_scores_that_grow_along_the_keys(growth):
    """The forward rescales its accumulator only when a row's maximum grows by more than
    ``LAZY_RESCALE_LOG2`` (2^8): keys whose scores rise by ``growth`` (log2 units) every 16 keys
    force a rescale on every step (30: without it the probabilities would pass 2^128 and
    overflow), keep a stale maximum over several steps (3, the probabilities reaching 2^8), or
    never raise it after the first (-5). Every query sees every earlier key (top-k keeps every
    block); output and log-sum-exp against an fp64 softmax, within twice plain PyTorch's fp32
    error plus the floor. fp32 only: the rescaling is fp32 arithmetic in every dtype, and in
    bf16 the interpreter's truncating casts of the probabilities dominate the error (as before
    the lazy rescale: same error at every growth)."""
    from longattn.kernels.online_softmax import LAZY_RESCALE_LOG2

    assert 3.0 < LAZY_RESCALE_LOG2 < 30.0
    dev, T, D = _device(), 96, 64
    scale = D ** -0.5
    q = torch.ones(1, 2, T, D)
    # score of key t (log2 units) ~ t * growth / 16, up to ~6 * growth over the 96 keys; keys on
    # a 2^-10 grid (< 2^14 steps), so every q.k sum is exact in fp32 in any order and the error
    # comes from the softmax and the weighted sum, as in plain PyTorch
    k = (torch.arange(T, dtype=torch.float64) * growth / 16 / (D * scale * 1.4426950408889634))
    k = (k * 1024).round() / 1024
    k = k[None, None, :, None].expand(1, 1, T, D).float().clone()
    v = torch.randn(1, 1, T, D, generator=torch.Generator().manual_seed(7))
    q, k, v = (t.to(dev) for t in (q, k, v))
    spec = longattn.get_method("topk")
    sel = spec.selector(q, k, True, spec.make_config(block_size=16, top_k=T // 16))
    assert int(sel.kv_num_blocks.max()) == T // 16
    out, lse = block_sparse_attention(q, k, v, sel, scale)
    with plain_precision():
        plain = torch.nn.functional.scaled_dot_product_attention(
            q, k.expand(1, 2, T, D), v.expand(1, 2, T, D), is_causal=True)
    # fp64 causal softmax of the same inputs
    qd, kd, vd = (t.double().cpu() for t in (q, k, v))
    sc = (qd @ kd.transpose(-1, -2)).squeeze(0) * scale  # [2, T, T]
    sc = sc.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    want = torch.softmax(sc, -1) @ vd[0]
    want_lse = torch.logsumexp(sc, -1)
    assert torch.isfinite(out).all()
    assert _error(out[0].cpu(), want) <= 2 * _error(plain[0].cpu(), want) + FLOOR[torch.float32]
    assert _error(lse[0].cpu(), want_lse) <= 1e-5 * max(1.0, want_lse.abs().max().item())


def test_forward_mode_ad_is_refused_not_dropped():
    """Dual tensors (forward-mode AD) carry no ``requires_grad``: the inference shortcut must not
    take them, or their tangents would vanish silently; the autograd Function refuses them."""
    from torch.autograd import forward_ad as fwAD

    q, k, v = rand_qkv(1, 2, 1, 32, 32, 16, device=_device(), seed=9)
    sel = _selection("topk", q, k, True)
    with torch.no_grad():
        out, _ = block_sparse_attention(q, k, v, sel, 0.25)  # the shortcut: no autograd node
    assert out.grad_fn is None
    with fwAD.dual_level():
        dq = fwAD.make_dual(q, torch.ones_like(q))
        with pytest.raises(RuntimeError, match="jvp"):
            block_sparse_attention(dq, k, v, sel, 0.25)


@pytest.mark.parametrize("D", [40, 128])
def test_other_head_dims(D):
    """D = 40 (padded to 64 inside the kernel) and D = 128, GQA, queries shorter than keys."""
    dev = _device()
    q, k, v = rand_qkv(1, 4, 2, 30, 70, D, device=dev, seed=D, requires_grad=True)
    sel = _selection("topk-shared", q.detach(), k.detach(), True)
    ref, _ = _reference(q, k, v, sel, True)
    out, _ = block_sparse_attention(q, k, v, sel, D ** -0.5)
    assert _error(out, ref) < 1e-5
    g = torch.randn_like(out)
    for f, r in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _error(f, r) < 1e-5


def test_each_program_layout_is_exercised():
    """The cases above cover: GQA-shared selections (P = group), selections shared by every
    head (P = group), per-head selections (P = 1), and per-token rows (q_block = 1)."""
    q, k, _ = rand_qkv(1, 8, 2, 50, 50, 64)
    plans = {case: _plan(q, k, _selection(case, q, k, True)) for case in CASES}
    assert plans["topk-shared"].P == 4 and plans["window"].P == 4
    assert plans["topk"].P == 1
    # per-token rows run key-major: as many tokens that chose one key block as the fp32 row cap
    # (32) allows per program, here P = 1
    assert plans["moba-per-token"].key_major and plans["moba-per-token"].BLOCK_M == 32
    assert plans["moba"].BLOCK_M == 16 and not plans["moba"].key_major
    assert not any(plan.key_major for case, plan in plans.items() if case != "moba-per-token")


def _per_token_selection(Bs, Hs, Tq, Tk, kv_block, K, H, causal, seed, dev):
    """A random per-token selection (q_block = 1): up to K distinct blocks per (sequence, head,
    token), some tokens with none, future blocks included (the causal rule masks them)."""
    gen = torch.Generator().manual_seed(seed)
    nkb = -(-Tk // kv_block)
    kvi = torch.stack([torch.randperm(nkb, generator=gen)[:K] for _ in range(Bs * Hs * Tq)]).view(Bs, Hs, Tq, K)
    kvn = torch.randint(0, K + 1, (Bs, Hs, Tq), generator=gen)
    return BlockSelection(kvn.int().to(dev), kvi.int().to(dev), q_block=1, kv_block=kv_block, q_len=Tq, kv_len=Tk,
                          num_heads=H, causal=causal)


@pytest.mark.parametrize("layout", ["shared-all-heads-B2", "per-sequence-B2", "per-head", "long-blocks-offset"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_key_major_per_token_layouts_match_reference_and_query_major(layout, causal, monkeypatch):
    """The key-major per-token forward and dQ: a selection shared by all 8 heads of 2 KV heads
    (two head groups per selection head) broadcast over a batch of 2, one selection per
    sequence, one per head, and 64-key blocks (several key chunks per block, so the causal
    chunk limit matters) with queries shorter than the keys; tokens with no block and blocks
    wholly in a token's future. It matches the fp32 reference and the query-major kernels;
    splitting the queries into chunks (a tiny KEY_MAJOR_PARTIAL_BYTES) gives the same output,
    LSE and gradients."""
    import longattn.kernels.block_sparse as bs

    dev = _device()
    B, Hs, H, Hkv = {"shared-all-heads-B2": (2, 1, 8, 2), "per-sequence-B2": (2, 2, 4, 2),
                     "per-head": (1, 4, 4, 2), "long-blocks-offset": (1, 2, 4, 2)}[layout]
    Bs = 1 if layout == "shared-all-heads-B2" else B
    Tq, Tk = (40, 40) if causal else (24, 56)
    kv_block = 16
    if layout == "long-blocks-offset":
        Tq, Tk, kv_block = 24, 200, 64
    q, k, v = rand_qkv(B, H, Hkv, Tq, Tk, 64, device=dev, seed=stable_seed(layout, causal), requires_grad=True)
    sel = _per_token_selection(Bs, Hs, Tq, Tk, kv_block, 3, H, causal, stable_seed(layout), dev)
    assert (sel.kv_num_blocks == 0).any(), "the test needs tokens that select nothing"
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dev)
    ref, ref_lse = _reference(q, k, v, sel, causal)
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)

    assert _plan(q, k, sel).key_major
    out, lse = block_sparse_attention(q, k, v, sel, 0.125)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert _error(out, ref) < 1e-5
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse)) and not torch.isfinite(lse).all()
    fin = torch.isfinite(ref_lse)
    assert _error(lse[fin], ref_lse[fin]) < 1e-5
    assert torch.equal(out[~fin], torch.zeros_like(out[~fin]))
    for which, f, r in zip("qkv", grads, ref_grads):
        assert _error(f, r) < 1e-5, ("d" + which, _error(f, r))

    monkeypatch.setattr(bs, "KEY_MAJOR_PARTIAL_BYTES", 4 * B * H * 3 * 65 * 5)  # chunks of 5 tokens
    out_c, lse_c = block_sparse_attention(q, k, v, sel, 0.125)
    assert _error(out_c, out) < 1e-6 and torch.equal(torch.isfinite(lse_c), torch.isfinite(lse))
    assert _error(lse_c[fin], lse[fin]) < 1e-6
    # chunks regroup the tokens of a tile, so fp32 sums may round differently (not bitwise)
    for f, fc in zip(grads, torch.autograd.grad(out_c, (q, k, v), g)):
        assert _error(fc, f) < 1e-5
    monkeypatch.setattr(bs, "KEY_MAJOR_PER_TOKEN", False)
    assert not _plan(q, k, sel).key_major
    out_q, _ = block_sparse_attention(q, k, v, sel, 0.125)
    grads_q = torch.autograd.grad(out_q, (q, k, v), g)
    assert _error(out_q, out) < 1e-5
    for f, fq in zip(grads, grads_q):
        assert _error(f, fq) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
def test_key_major_output_rows_are_held_in_the_input_dtype(dtype, monkeypatch):
    """The key-major forward keeps its per-block output rows in bf16 for bf16 inputs (half the
    bytes of fp32; the merge accumulates in fp32) and in fp32 for fp32 and fp16 inputs (an fp16
    row near fp16's maximum could round to inf). A row is about a convex combination of value
    rows, so rounding it moves the merged output by about one rounding of max|v| (2^-8 relative
    to nearest, 2^-7 truncated as the interpreter does), and the final rounding by one more of
    |out|: the bound 2^-7 max|v| against fp32 rows held with a 4-5x margin over three seeds."""
    import longattn.kernels.block_sparse as bs

    dev = _device()
    q, k, v = rand_qkv(1, 4, 2, 40, 40, 64, dtype=dtype, device=dev, seed=21)
    sel = _per_token_selection(1, 2, 40, 40, 16, 3, 4, True, 22, dev)
    seen = []
    real = bs._chunk_buffer

    def spy(buf, shape, n, device, fill=None, dtype=torch.float32):
        if buf is None:
            seen.append((len(shape), dtype))
        return real(buf, shape, n, device, fill, dtype)

    monkeypatch.setattr(bs, "_chunk_buffer", spy)
    assert _plan(q, k, sel).key_major
    out, lse = block_sparse_attention(q, k, v, sel, 0.125)
    rows = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    assert sorted(seen) == [(4, torch.float32), (5, rows)]  # the LSEs stay fp32
    monkeypatch.setattr(bs, "partial_dtype", lambda d: torch.float32)
    out32, lse32 = block_sparse_attention(q, k, v, sel, 0.125)
    assert sorted(seen[2:]) == [(4, torch.float32), (5, torch.float32)]
    assert _error(out, out32) <= 2**-7 * v.float().abs().max().item()
    assert torch.equal(lse, lse32)  # the LSEs do not depend on the rows' dtype
    if rows != torch.float32:
        assert not torch.equal(out, out32)  # the rows' rounding shows (the check above is not vacuous)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_per_token_query_major_kernels_still_match(dtype, monkeypatch):
    """KEY_MAJOR_PER_TOKEN = False keeps the query-major kernels for per-token selections (one
    program per token and head group); they stay correct against the reference."""
    import longattn.kernels.block_sparse as bs

    monkeypatch.setattr(bs, "KEY_MAJOR_PER_TOKEN", False)
    test_forward_and_backward_match_reference("moba-per-token", dtype, 4, 2, 16, 40)


def _split_test_selection(lists: str, dtype, dev):
    """The selection of :func:`test_dkdv_split_into_parts_matches_the_unsplit_kernel` and its
    threshold. ``R`` rows (tokens, or query blocks of 16) per sequence and 4 selection heads for 8
    query heads on 2 KV heads: P = 2, so a program walks the lists of two head groups, of the
    even and the odd selection head. In steps of ``u`` (a quarter of the rows) per list: block 0
    is 4 u (every row) + 2 u (even rows), the last block (8 keys, the rest of its block past
    ``kv_len``) u + 4 u, block 1 u + u; blocks 2 to the second last are selected by nobody. A
    per-sequence selection has block 2 in place of block 1 in sequence 1. The threshold 2 u is
    block 1's program exactly, cuts block 0's program into 3 parts, a boundary between the head
    groups, and the last block's into 3, the first straddling the groups and the last shorter."""
    from longattn.kernels.block_sparse import TILE_CAPS

    fp32 = dtype == torch.float32
    if lists == "per-token":  # a step gathers TILE_CAPS rows / P tokens: a quarter of R
        q_block, R, u = 1, 4 * (TILE_CAPS[("bwd", fp32)][0] // 2), 1
    else:  # a step is a tile of BLOCK_M tokens of a query block: 8 in fp32, 16 in bf16
        q_block, R = 16, 8
        u = (R // 4) * (2 if fp32 else 1)
    Bs, Hs, Tq = (2 if lists == "query-blocks" else 1), 4, R * q_block
    Tk = Tq + 40
    last = -(-Tk // 16) - 1
    kvi = torch.zeros(Bs, Hs, R, 3, dtype=torch.int32)
    kvn = torch.zeros(Bs, Hs, R, dtype=torch.int32)
    for b in range(Bs):
        for h in range(Hs):
            for r in range(R):
                if h % 2 == 0:
                    blocks = [0] + [last] * (r % 4 == 0) + [1 + b] * (r % 4 == 1)
                else:
                    blocks = [0] * (r % 2 == 0) + [last] + [1 + b] * (r % 4 == 1)
                kvn[b, h, r] = len(blocks)
                kvi[b, h, r, :len(blocks)] = torch.tensor(blocks)
    sel = BlockSelection(kvn.to(dev), kvi.to(dev), q_block=q_block, kv_block=16, q_len=Tq, kv_len=Tk, num_heads=8,
                         causal=lists == "per-token")
    return sel, 2 * u


@pytest.mark.parametrize("lists", ["per-token", "query-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dkdv_split_into_parts_matches_the_unsplit_kernel(lists, dtype, monkeypatch):
    """dK/dV programs longer than DKDV_STEPS_PER_ITEM steps run as parts whose fp32 partials are
    summed afterwards. With a tiny threshold (:func:`_split_test_selection`): a per-token
    selection shared by a batch of 2 (causal) and a per-sequence one of 16-token query blocks
    (bidirectional), both with 2 head groups per KV head, in fp32 and bf16, the work items are
    the expected parts (a program of exactly the threshold and one with no steps stay whole), and
    the gradients match the unsplit kernel to rounding and the fp32 reference within the file's
    tolerance; dK/dV of the unselected blocks are 0."""
    import longattn.kernels.block_sparse as bs

    dev = _device()
    B, H, Hkv = 2, 8, 2
    sel, threshold = _split_test_selection(lists, dtype, dev)
    causal = lists == "per-token"
    q, k, v = rand_qkv(B, H, Hkv, sel.q_len, sel.kv_len, 64, dtype=dtype, device=dev,
                       seed=stable_seed("dkdv-split", lists), requires_grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(dev, dtype)
    nkb = sel.num_kv_blocks
    assert _plan(q, k, sel, "bwd").P == 2 and _plan(q, k, sel, "bwd").BLOCK_N == 16  # a program per key block

    works = []
    make_work = bs._dkdv_work

    def recorded_work(*args):
        works.append(make_work(*args))
        return works[-1]

    monkeypatch.setattr(bs, "_dkdv_work", recorded_work)
    out, _ = block_sparse_attention(q, k, v, sel, 0.125)
    monkeypatch.setattr(bs, "DKDV_STEPS_PER_ITEM", threshold)
    split = torch.autograd.grad(out, (q, k, v), g, retain_graph=True)
    monkeypatch.setattr(bs, "DKDV_STEPS_PER_ITEM", 1 << 30)  # no program is cut
    whole = torch.autograd.grad(out, (q, k, v), g)

    # the work items, longest first: program (b * Hkv + kvh) * nkb + kb, each (first, end, partial?)
    lengths = works[0].items[:, 2] - works[0].items[:, 1]
    assert (lengths[:-1] >= lengths[1:]).all()
    items = {}
    for p, lo, hi, slot in works[0].items.tolist():
        items.setdefault(p, []).append((lo, hi, slot >= 0))
    T = threshold
    cut = torch.zeros(B, Hkv, nkb, dtype=torch.bool)  # the programs run in parts
    empty = torch.zeros(B, Hkv, nkb, dtype=torch.bool)  # the programs with no steps
    for b in range(B):
        exact = 1 + b if sel.kv_num_blocks.shape[0] == 2 else 1
        for kvh in range(Hkv):
            prog = (b * Hkv + kvh) * nkb
            assert sorted(items[prog]) == [(0, T, True), (T, 2 * T, True), (2 * T, 3 * T, True)]
            assert sorted(items[prog + nkb - 1]) == [(0, T, True), (T, 2 * T, True), (2 * T, 5 * T // 2, True)]
            assert items[prog + exact] == [(0, T, False)]  # exactly the threshold: whole
            cut[b, kvh, [0, nkb - 1]] = True
            for kb in set(range(1, nkb - 1)) - {exact}:
                assert items[prog + kb] == [(0, 0, False)]  # still an item: it writes the zeros
                empty[b, kvh, kb] = True
    assert sorted(works[0].split[:, 0].tolist()) == cut.flatten().nonzero().flatten().tolist()
    assert works[1].split.numel() == 0
    cut, empty = (m.repeat_interleave(16, dim=2)[:, :, :sel.kv_len].to(dev) for m in (cut, empty))

    # dQ does not depend on the cut, nor do dK/dV of the programs left whole (the same steps in
    # the same order). A program summed in parts adds the same fp32 products in another order:
    # two orders of n terms round apart by at most 2 n eps times the sum of the terms' absolute
    # values (n: the query rows of a KV head); bf16 then rounds the fp32 sums, which may land on
    # neighbouring values: one more unit in the last place of each element
    assert torch.equal(split[0], whole[0])
    n_terms = sel.q_len * H // Hkv
    abs_terms = _abs_dkdv_terms(q, k, v, g, sel, 0.125)
    for which, s, w, a in zip("kv", split[1:], whole[1:], abs_terms):
        assert torch.equal(s[empty], torch.zeros_like(s[empty])), "d" + which
        assert torch.equal(s[~cut], w[~cut]), "d" + which
        diff = (s[cut].double() - w[cut].double()).abs()
        bound = 2 * n_terms * torch.finfo(torch.float32).eps * a[cut]
        if dtype != torch.float32:
            bound = bound + torch.finfo(dtype).eps * torch.maximum(s[cut].abs(), w[cut].abs()).double()
        assert (diff <= bound).all(), ("d" + which, (diff - bound).max().item())

    _, ref_grads, _, plain_grads = _fp32_and_plain(lambda a, b, c: _reference(a, b, c, sel, causal), q, k, v, g)
    for which, f, p, r in zip("qkv", split, plain_grads, ref_grads):
        bound = 2 * _error(p, r) + FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert _error(f, r) <= bound, ("d" + which, _error(f, r), bound)


def test_unselected_key_blocks_are_never_read():
    """NaN in every key/value block that no query selects leaves the output unchanged: the
    kernel does not load what the selection excludes (a load would spread NaN through the
    softmax even where the probability is 0)."""
    dev = _device()
    q, k, v = rand_qkv(1, 4, 2, 16, 96, 64, device=dev, seed=7)  # one query block of 16
    sel = _selection("topk-shared", q, k, True)
    used = sel.block_bitmap().any(dim=2).any(dim=0)  # [Hs, nKB]: selected by some query block
    assert not used.all(), "the test needs some unselected blocks"
    out, _ = block_sparse_attention(q, k, v, sel, 0.125)
    kp, vp = k.clone(), v.clone()
    for h in range(used.shape[0]):
        for blk in (~used[h]).nonzero().flatten().tolist():
            kp[:, h, blk * 16:(blk + 1) * 16] = float("nan")
            vp[:, h, blk * 16:(blk + 1) * 16] = float("nan")
    out2, _ = block_sparse_attention(q, kp, vp, sel, 0.125)
    assert torch.equal(out, out2)


def test_a_query_with_no_key_gets_zero_and_minus_inf():
    dev = _device()
    q, k, v = rand_qkv(1, 2, 2, 32, 32, 64, device=dev)
    counts = torch.tensor([[[1, 0]]], dtype=torch.int32, device=dev).expand(1, 2, 2)
    idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32, device=dev).expand(1, 2, 2, 2)
    sel = BlockSelection(counts.contiguous(), idx.contiguous(), q_block=16, kv_block=16, q_len=32, kv_len=32,
                         num_heads=2, causal=False)
    out, lse = block_sparse_attention(q, k, v, sel, 0.125)
    assert torch.equal(out[:, :, 16:], torch.zeros_like(out[:, :, 16:]))
    assert torch.isinf(lse[:, :, 16:]).all() and (lse[:, :, 16:] < 0).all()
    ref, ref_lse = _reference(q, k, v, sel, False)
    assert _error(out, ref) < 1e-5 and torch.equal(torch.isinf(lse), torch.isinf(ref_lse))


def test_transposed_selection_lists_the_query_blocks_of_every_key_block():
    gen = torch.Generator().manual_seed(0)
    Bs, Hs, nqb, nkb, K = 2, 3, 5, 7, 4
    kvi = torch.stack([torch.randperm(nkb, generator=gen)[:K] for _ in range(Bs * Hs * nqb)]).view(Bs, Hs, nqb, K)
    kvn = torch.randint(0, K + 1, (Bs, Hs, nqb), generator=gen)
    offsets, qbs = transposed_selection(kvn.int(), kvi.int(), nkb)
    for b in range(Bs):
        for h in range(Hs):
            for kb in range(nkb):
                key = (b * Hs + h) * nkb + kb
                want = [qb for qb in range(nqb) if kb in kvi[b, h, qb, : kvn[b, h, qb]].tolist()]
                assert qbs[offsets[key]:offsets[key + 1]].tolist() == want


def test_backend_triton_through_the_api_and_its_fallbacks():
    q, k, v = rand_qkv(1, 4, 2, 40, 40, 64, device=_device())
    cfg = CASES["topk"]
    ref = longattn.attention(q, k, v, method="topk", backend="reference", **cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no fallback may happen here
        out = longattn.attention(q, k, v, method="topk", backend="triton", **cfg)
    assert _error(out, ref) < 1e-5
    # a key block that is not a multiple of 16 cannot be served: warn and give the reference
    with pytest.warns(RuntimeWarning, match="kv_block to be a multiple of 16"):
        out = longattn.attention(q, k, v, method="topk", backend="triton", block_size=8, top_k=2)
    assert _error(out, longattn.attention(q, k, v, method="topk", backend="reference", block_size=8, top_k=2)) < 1e-6


def test_unservable_selections_raise_with_the_reason():
    dev = _device()
    q, k, v = rand_qkv(1, 2, 2, 32, 32, 64, device=dev)
    counts = torch.ones(1, 2, 2, dtype=torch.int32, device=dev)
    idx = torch.zeros(1, 2, 2, 2, dtype=torch.int32, device=dev)
    idx[..., 1] = 1
    python_mod = BlockSelection(counts, idx, q_block=16, kv_block=16, q_len=32, kv_len=32, num_heads=2,
                                mask_mod=lambda b, h, qi, ki: ki <= qi)
    with pytest.raises(ValueError, match="without a TokenRule"):
        block_sparse_attention(q, k, v, python_mod, 0.125)
    with pytest.raises(ValueError, match="head dims 16..256"):
        block_sparse_attention(*(t[..., :8] for t in (q, k, v)), _selection("window", q, k, True), 0.125)
    empty = block_sparse_attention(q[:0], k[:0], v[:0], _selection("window", q, k, True), 0.125)
    assert empty[0].shape == (0, 2, 32, 64) and empty[1].shape == (0, 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_nsa_selected_and_window_branches_through_the_kernels(dtype):
    """NSA with backend='triton' (selected and window branches in the block-sparse kernels,
    one selection per GQA group) against its fp32 reference, forward and backward."""
    dev = _device()
    cfg = dict(num_selected=4, window=32, select_block=32)
    q, k, v = rand_qkv(1, 4, 2, 64, 64, 64, dtype=dtype, device=dev, seed=11, requires_grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dev, dtype)
    (ref,), ref_grads, plain, plain_grads = _fp32_and_plain(
        lambda a, b, c: (longattn.attention(a, b, c, method="nsa", backend="reference", **cfg),), q, k, v, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = longattn.attention(q, k, v, method="nsa", backend="triton", **cfg)
    grads = torch.autograd.grad(out, (q, k, v), g)
    assert _error(out, ref) <= 2 * _error(plain, ref) + FLOOR[dtype]
    for f, p, r in zip(grads, plain_grads, ref_grads):
        assert _error(f, r) <= 2 * _error(p, r) + FLOOR[dtype] * max(1.0, r.abs().max().item())


def test_key_major_buffers_are_sized_by_the_widest_row_not_the_index_width():
    """A selection's index tensor may be as wide as the number of key blocks (MoBA's is) while
    rows hold 3: the key-major per-block buffers take the widest row's count (the first run on
    the H200 sized them by the index width, 128 at 64k, and spent its time in 128 query chunks).
    Padding the index width with unused entries changes neither the slots nor the result."""
    from longattn.kernels.block_sparse import _token_lists

    dev = _device()
    q, k, v = rand_qkv(1, 4, 2, 40, 40, 64, device=dev, seed=3)
    sel = _per_token_selection(1, 4, 40, 40, 16, 2, 4, True, 9, dev)
    wide = torch.cat([sel.kv_indices, torch.zeros_like(sel.kv_indices[..., :1])], dim=-1)  # 1 unused column
    wide_sel = BlockSelection(sel.kv_num_blocks, wide.contiguous(), q_block=1, kv_block=16, q_len=40, kv_len=40,
                              num_heads=4, causal=True)
    lists = _token_lists(wide_sel.kv_num_blocks, wide_sel.kv_indices, 3, 4 * 4 * 65)
    assert lists.slots == int(sel.kv_num_blocks.max()) == 2 and lists.chunk >= 40
    out, lse = block_sparse_attention(q, k, v, sel, 0.125)
    out_w, lse_w = block_sparse_attention(q, k, v, wide_sel, 0.125)
    assert torch.equal(out, out_w) and torch.equal(lse, lse_w)


@pytest.mark.parametrize("G,hps,cap,want", [(4, 1, 128, 1), (4, 8, 128, 4), (6, 4, 128, 2), (24, 48, 16, 12),
                                            (48, 96, 32, 24), (40, 40, 32, 20), (64, 64, 128, 64)])
def test_heads_per_program_never_straddle_a_kv_head_or_selection(G, hps, cap, want):
    """A program's heads share one KV head and one selection head: P divides gcd(heads per KV
    head, heads per selection) and fits the row cap. The earlier rule capped P at the row cap
    (16 of a group of 24) and gave programs heads of two KV heads, or left heads unserved."""
    from longattn.kernels.block_sparse import heads_per_program

    P = heads_per_program(G, hps, cap)
    assert P == want and G % P == 0 and hps % P == 0 and P <= cap


@pytest.mark.parametrize("case", ["per-token-48-heads", "window-40-heads"])
def test_wide_head_groups_match_reference(case):
    """GQA groups wider than a program's rows in fp32 (row caps 32 forward, 16 backward): 24
    query heads per KV head with one per-token selection for all heads (the backward's 16-row
    cap does not divide 24), and 40 heads on one KV head with a window shared by all (the
    forward's 32 does not divide 40: heads 32-39 were never computed)."""
    dev = _device()
    if case == "per-token-48-heads":
        H, Hkv, T = 48, 2, 20
        q, k, v = rand_qkv(1, H, Hkv, T, T, 16, device=dev, seed=4, requires_grad=True)
        sel = _per_token_selection(1, 1, T, T, 16, 2, H, True, 4, dev)
        causal = True
    else:
        H, Hkv, T = 40, 1, 40
        q, k, v = rand_qkv(1, H, Hkv, T, T, 16, device=dev, seed=5, requires_grad=True)
        sel = longattn.get_method("window").selector(q, k, True, longattn.get_method("window").make_config(
            window=20, block_size=16))
        causal = True
    ref, _ = _reference(q, k, v, sel, causal)
    out, _ = block_sparse_attention(q, k, v, sel, 0.25)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(dev)
    assert _error(out, ref) < 1e-5
    for which, f, r in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
        assert _error(f, r) < 1e-5, ("d" + which, _error(f, r))


def test_kernel_layout_copies_or_refuses_views_past_int32_offsets():
    """The kernels add token and feature offsets in int32. A [B, T, H, D] view transposed to
    [B, H, T, D] spans T * H * D elements per (batch, head) slice: at 600k tokens of 32 heads of
    128 that passes 2^31, so it is copied contiguous (T * D per slice); past T * D >= 2^31 even
    that fails and the error names the argument. Meta tensors: shapes and strides, no memory."""
    from longattn.kernels import MAX_SLICE_OFFSET, kernel_layout, slice_offset_span

    view = torch.empty(1, 600_000, 32, 128, device="meta").transpose(1, 2)
    assert slice_offset_span(view) > MAX_SLICE_OFFSET
    fixed = kernel_layout(view, "q")
    assert fixed.is_contiguous() and slice_offset_span(fixed) == 600_000 * 128 - 1
    small = torch.empty(1, 4096, 32, 128, device="meta").transpose(1, 2)
    assert kernel_layout(small, "q") is small  # fits: passed through, no copy
    with pytest.raises(ValueError, match="k .*2\\^31"):
        kernel_layout(torch.empty(1, 1, 17_000_000, 128, device="meta"), "k")


def test_sparse_decode_refuses_a_cache_view_past_int32_offsets(monkeypatch):
    """Sparse decoding reads the cache in place (a contiguous copy per step would read it all),
    so a cache whose (batch, head) slice passes the kernel's int32 offsets is refused with the
    argument named. The limit is lowered here so a small [B, T, Hkv, D] view crosses it."""
    import longattn.kernels as kernels
    from longattn.decode import sparse_decode

    dev = _device()
    cache = torch.randn(1, 64, 2, 32, device=dev)  # [B, T, Hkv, D]
    k_cache = v_cache = cache.transpose(1, 2)  # [B, Hkv, T, D], token stride Hkv * D = 64
    q = torch.randn(1, 4, 1, 32, device=dev)
    lens = torch.tensor([64], dtype=torch.int32, device=dev)
    idx = torch.zeros(1, 2, 1, dtype=torch.int32, device=dev)
    cnt = torch.ones(1, 2, dtype=torch.int32, device=dev)
    out = sparse_decode(q, k_cache, v_cache, lens, idx, cnt, block_size=16, backend="triton")
    assert torch.isfinite(out).all()
    monkeypatch.setattr(kernels, "MAX_SLICE_OFFSET", 63 * 64)  # below this view's span, 63 * 64 + 31
    with pytest.raises(ValueError, match="k_cache .*2\\^31"):
        sparse_decode(q, k_cache, v_cache, lens, idx, cnt, block_size=16, backend="triton")


@pytest.mark.parametrize("kv_block,dtype,hs,want,want_bwd", [
    (64, torch.bfloat16, 8, (4, 32, 128, 64, 2), (64, 2)),  # NSA's selected branch: a 64-key block in one step
    (512, torch.bfloat16, 32, (1, 128, 128, 32, 3), (64, 2)),  # MoBA's per-token gate over 512-key blocks
    (64, torch.float32, 8, (4, 8, 32, 32, 2), (32, 2)),  # fp32 keeps its small tiles
    (48, torch.bfloat16, 8, (4, 32, 128, 16, 2), (16, 2)),  # a block that is no power of two: steps of 16
])
def test_key_major_forward_tiles_follow_the_key_block(kv_block, dtype, hs, want, want_bwd):
    """The key-major forward's tiles as measured on the H200: a 16-bit block of at most
    KEY_MAJOR_ONE_STEP keys in as few steps as divide it at 2 stages (NSA: 10.6 against 11.7 ms
    for its tile kernel at 64k), longer blocks 128 x 32 at 3 stages (MoBA: the wider tile took 26.0
    against about 21 ms at 64k). A tile change measured on one method must not leak to the other;
    the backward's plan keeps its own tiles."""
    from longattn.kernels.block_sparse import _plan

    T, H = 4 * kv_block, 32
    q, k = torch.zeros(1, H, T, 128, dtype=dtype), torch.zeros(1, 8, T, 128, dtype=dtype)
    sel = BlockSelection(torch.ones(1, hs, T, dtype=torch.int32), torch.zeros(1, hs, T, 2, dtype=torch.int32),
                         q_block=1, kv_block=kv_block, q_len=T, kv_len=T, num_heads=H, validate=False)
    fwd = _plan(q, k, sel, "fwd")
    assert fwd.key_major and (fwd.P, fwd.BLOCK_M, fwd.ROWS, fwd.BLOCK_N, fwd.num_stages) == want
    bwd = _plan(q, k, sel, "bwd")
    assert (bwd.BLOCK_N, bwd.num_stages) == want_bwd
