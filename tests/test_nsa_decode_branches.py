"""NSA decoding's selected and window branches and gated sum in two launches
(longattn.kernels.nsa.decode_branches; Native Sparse Attention, Yuan et al., 2025), through the
Triton interpreter on CPU, against an independent fp64 computation written here: per query row,
softmax over the keys of its selected blocks up to the query, softmax over its window, gated sum
with the compressed output.

Every key that is neither in a row's selected blocks nor in its window -- for any row of its
``(sequence, KV head)`` -- is NaN in the cache, as is everything past each length, and unused
selection slots repeat a used block: a read outside the branches' keys, or of a slot past the
count, changes the result. Cases: GQA 1/4/32 (two row tiles), Tq 1/3/16, windows shorter and
longer than the sequences and not a multiple of the key chunk, selection blocks that are not a
power of two, split counts from one per branch to more splits than chunks, NaN-poisoned
partial buffers, fp32 and bf16 (bound derived from bf16's unit roundoff)."""

from __future__ import annotations

import pytest
import torch

from longattn.kernels import interpreting, triton_unavailable_reason

from .sm90 import SM90_SHARED, compile_sm90_script

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_REASON = triton_unavailable_reason(torch.device(DEV))
pytestmark = pytest.mark.skipif(TRITON_REASON is not None, reason=f"Triton cannot run here: {TRITON_REASON}")

GATES = (0.2, 0.5, 0.3)
TMAX = 150
U_BF16 = 2.0 ** -8  # bf16's unit roundoff (round to nearest)


def make_case(B, H, Hkv, Tq, lens, *, block, window, K, dtype, seed, D=32):
    """Random q, caches, compressed output and per-row selections; NaN in every cache key no
    row of its (sequence, KV head) may read. Returns the kernel's inputs and the allowed keys
    ``[B, Hkv, Tmax]`` (bool)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Tq, D, generator=g)
    k = torch.randn(B, Hkv, TMAX, D, generator=g)
    v = torch.randn(B, Hkv, TMAX, D, generator=g)
    o_cmp = torch.randn(B, H, Tq, D, generator=g)
    idx = torch.zeros(B, Hkv, Tq, K, dtype=torch.int32)
    cnt = torch.zeros(B, Hkv, Tq, dtype=torch.int32)
    allowed = torch.zeros(B, Hkv, TMAX, dtype=torch.bool)
    for b, L in enumerate(lens):
        for h in range(Hkv):
            for t in range(Tq):
                p = L - Tq + t
                eligible = p // block + 1  # blocks starting at or before the query
                c = int(torch.randint(1, min(K, eligible) + 1, (1,), generator=g))
                chosen = torch.randperm(eligible, generator=g)[:c].to(torch.int32)
                idx[b, h, t, :c] = chosen
                idx[b, h, t, c:] = chosen[0]  # a slot past the count, if read, counts a block twice
                cnt[b, h, t] = c
                for j in chosen.tolist():
                    allowed[b, h, j * block : min((j + 1) * block, p + 1)] = True
                allowed[b, h, max(0, p - window + 1) : p + 1] = True
    k = torch.where(allowed[..., None], k, float("nan"))
    v = torch.where(allowed[..., None], v, float("nan"))
    seqlens = torch.tensor(lens, dtype=torch.int32)
    q, k, v, o_cmp = (t.to(dtype) for t in (q, k, v, o_cmp))
    return [t.to(DEV) for t in (q, k, v, seqlens, idx, cnt, o_cmp)]


def fp64_branches(q, k, v, seqlens, idx, cnt, o_cmp, *, block, window, scale):
    """Independent fp64 computation: ``(out, o_slc, o_win)``, each ``[B, H, Tq, D]``."""
    B, H, Tq, D = q.shape
    Hkv = k.shape[1]
    G = H // Hkv
    o_slc = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    o_win = torch.zeros_like(o_slc)
    for b, L in enumerate(seqlens.tolist()):
        for h in range(H):
            kv = h // G
            for t in range(Tq):
                p = L - Tq + t
                sel = sorted({j * block + i for j in idx[b, kv, t, : cnt[b, kv, t]].tolist() for i in range(block)
                              if j * block + i <= p})
                win = list(range(max(0, p - window + 1), p + 1))
                for keys, dst in ((sel, o_slc), (win, o_win)):
                    kk = k[b, kv, keys].double().cpu()
                    vv = v[b, kv, keys].double().cpu()
                    w = torch.softmax(kk @ q[b, h, t].double().cpu() * scale, 0)
                    dst[b, h, t] = w @ vv
    gc, gs, gw = GATES
    out = gc * o_cmp.double().cpu() + gs * o_slc + gw * o_win
    return out, o_slc, o_win


CASES = [  # B, H, Hkv, Tq, lens, block, window, K
    (3, 4, 4, 1, (10, 40, 150), 16, 24, 4),
    (3, 8, 2, 3, (5, 70, 150), 16, 24, 4),
    (2, 32, 1, 1, (33, 150), 16, 40, 3),  # G = 32: two row tiles at fp32
    (2, 8, 2, 16, (16, 150), 24, 400, 5),  # block not a power of two, window longer than any sequence
    (1, 4, 1, 1, (150,), 64, 512, 3),
]


FP32, BF16 = torch.float32, torch.bfloat16
# every case in both dtypes with the split heuristic; explicit splits (one per branch, a few, more
# splits than chunks) on the Tq = 16 case with odd blocks (fp32) and a GQA-4 case with Tq = 3 (bf16)
SPLIT_CASES = [(dt, case, None) for dt in (FP32, BF16) for case in range(len(CASES))] + [
    # many: more splits than either branch of the case has chunks
    (dt, case, splits) for dt, case, many in ((FP32, 3, (8, 7)), (BF16, 1, (24, 11)))
    for splits in ((1, 1), (3, 2), many)]


@pytest.mark.parametrize("dtype,case,splits", SPLIT_CASES,
                         ids=[f"{'fp32' if dt == FP32 else 'bf16'}-{c}-{sp}" for dt, c, sp in SPLIT_CASES])
def test_branches_match_fp64(monkeypatch, dtype, case, splits):
    import longattn.kernels.nsa.decode as dec
    from longattn.kernels.nsa.decode_branches import nsa_decode_branches

    monkeypatch.setattr(dec, "POISON_BUFFERS", True)  # a partial left unwritten shows as NaN
    B, H, Hkv, Tq, lens, block, window, K = CASES[case]
    q, k, v, seqlens, idx, cnt, o_cmp = make_case(B, H, Hkv, Tq, lens, block=block, window=window, K=K,
                                                  dtype=dtype, seed=case * 5 + 1)
    scale = 0.2
    out = nsa_decode_branches(q, k, v, seqlens, idx, cnt, o_cmp, select_block=block, window=window,
                              gates=GATES, scale=scale, num_splits=splits)
    assert out.shape == q.shape and out.dtype == dtype
    ref, o_slc, o_win = fp64_branches(q, k, v, seqlens, idx, cnt, o_cmp, block=block, window=window, scale=scale)
    got = out.double().cpu()
    assert torch.isfinite(got).all()
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() < 1e-5
        return
    # bf16: P rounded for P @ V (<= u * max|v| per branch), each branch rounded (u * |o_b|), the
    # sum rounded (u * |out|); (1 + u)^2 covers the second-order terms (each rounding acts on an
    # already rounded value); scores and sums in fp32 add ~1e-6. u is the relative error of one
    # conversion to bf16: 2^-8 rounding to nearest on GPUs, 2^-7 where the interpreter truncates
    vmax = torch.nan_to_num(v.double().cpu(), nan=0.0).abs().amax(dim=(2, 3))  # [B, Hkv]
    vmax = vmax.repeat_interleave(H // Hkv, 1)[:, :, None, None]
    gc, gs, gw = GATES
    u = 2 * U_BF16 if interpreting() else U_BF16
    first = ref.abs() + gs * (o_slc.abs() + vmax) + gw * (o_win.abs() + vmax)
    bound = u * (1 + u) ** 2 * first + 1e-5
    excess = (got - ref).abs() - bound
    assert excess.max().item() <= 0, excess.max().item()


def test_more_query_heads_than_one_tile_and_auto_splits_on_a_long_window():
    """fp32 caps a program at 16 rows: 64 query heads per KV head take four row tiles."""
    from longattn.kernels.nsa.decode_branches import nsa_decode_branches

    q, k, v, seqlens, idx, cnt, o_cmp = make_case(2, 64, 1, 2, (90, 150), block=16, window=100, K=4,
                                                  dtype=torch.float32, seed=9)
    out = nsa_decode_branches(q, k, v, seqlens, idx, cnt, o_cmp, select_block=16, window=100, gates=GATES,
                              scale=0.15)
    ref, _, _ = fp64_branches(q, k, v, seqlens, idx, cnt, o_cmp, block=16, window=100, scale=0.15)
    assert (out.double().cpu() - ref).abs().max().item() < 1e-5


def test_strided_caches_are_read_in_place():
    """Caches stored token-major (``[B, T, Hkv, D]`` viewed as ``[B, Hkv, T, D]``) or with a
    head-dim stride of 2 give the same output bit for bit as contiguous ones."""
    from longattn.kernels.nsa.decode_branches import nsa_decode_branches

    q, k, v, seqlens, idx, cnt, o_cmp = make_case(2, 8, 2, 3, (70, 150), block=16, window=24, K=4,
                                                  dtype=torch.float32, seed=4)
    kw = dict(select_block=16, window=24, gates=GATES, scale=0.2, num_splits=(3, 2))
    base = nsa_decode_branches(q, k, v, seqlens, idx, cnt, o_cmp, **kw)
    token_major = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in (k, v)]
    wide = [torch.stack([t, torch.full_like(t, float("nan"))], -1).flatten(-2)[..., ::2] for t in (k, v)]
    assert token_major[0].stride(2) == 2 * 32 and wide[0].stride(-1) == 2  # Hkv * D; every other element
    for kk, vv in (token_major, wide):
        assert not kk.is_contiguous() and torch.allclose(kk, k, equal_nan=True)  # same values, other strides
        assert torch.equal(nsa_decode_branches(q, kk, vv, seqlens, idx, cnt, o_cmp, **kw), base)


def test_bad_num_splits():
    from longattn.kernels.nsa.decode_branches import nsa_decode_branches

    q, k, v, seqlens, idx, cnt, o_cmp = make_case(1, 4, 1, 1, (40,), block=16, window=24, K=2,
                                                  dtype=torch.float32, seed=2)
    for bad in ((0, 2), (2, 0), (1,), [1, 1], (1.0, 1), (True, 1)):
        with pytest.raises(ValueError, match="num_splits"):
            nsa_decode_branches(q, k, v, seqlens, idx, cnt, o_cmp, select_block=16, window=24, gates=GATES,
                                scale=0.2, num_splits=bad)


def test_branch_splits_share_in_proportion():
    from longattn.kernels.nsa.decode_branches import branch_splits

    assert branch_splits(24, 16, 8) == (16, 8)
    assert branch_splits(2, 100, 1) == (1, 1)  # one each at least
    assert branch_splits(10, 1, 100) == (1, 9)
    for total in range(2, 70):
        s, w = branch_splits(total, 16, 8)
        assert s >= 1 and w >= 1 and s + w == total


_COMPILE_SCRIPT = r"""
import torch
from longattn.kernels.nsa.decode_branches import _branches_combine, _branches_split, branches_tile_config

out = {}
for dtype, tname, D, G in [(torch.bfloat16, "bf16", 128, 4), (torch.bfloat16, "bf16", 128, 64),
                           (torch.float32, "fp32", 256, 4), (torch.bfloat16, "bf16", 256, 16)]:
    cfg = branches_tile_config(G, 64, D, dtype)
    ptr = {"Q": "*" + tname, "K": "*" + tname, "V": "*" + tname, "Lens": "*i32", "Idx": "*i32", "Cnt": "*i32",
           "OP": "*fp32", "LP": "*fp32"}
    const = dict(G=G, TQ=1, BLOCK_SIZE=64, CHUNKS=cfg["CHUNKS"], HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], DOT_MODE=1 if tname == "fp32" else 0)
    out[f"split[{tname}, D={D}, G={G}]"] = compile_sm90(_branches_split, ptr, const, ("qk_scale",),
                                                        cfg["num_warps"], cfg["num_stages"], ones=("skd", "svd"))
ptr = {"OP": "*fp32", "LP": "*fp32", "OC": "*bf16", "O": "*bf16"}
for D, S in [(128, 32), (128, 64), (256, 64)]:  # the warps nsa_decode_branches picks
    out[f"combine[D={D}, S={S}]"] = compile_sm90(_branches_combine, ptr, dict(HEAD_DIM=D, S_PAD=S),
                                                 ("g_cmp", "g_slc", "g_win"), 4 if S * D <= 32 * 128 else 8)
print(json.dumps(out))
"""


def test_kernels_compile_for_sm90_within_shared_memory_without_spilling():
    """The two kernels compile for the H200 (sm_90) with the ptxas that ships with Triton, at the
    tiles :func:`~longattn.kernels.nsa.decode_branches.branches_tile_config` picks: shared memory
    fits and nothing spills, compiled as the launcher specialises them (unit strides constant, the
    rest 16-aligned; compiled with the unit strides as runtime integers, the split kernel at 16
    bf16 rows, D = 128, 4 warps reported 40-88 bytes of spills it does not have when launched)."""
    results = compile_sm90_script(_COMPILE_SCRIPT)
    assert len(results) == 7
    for name, (shared, spill) in results.items():
        assert 0 <= shared <= SM90_SHARED, (name, shared)
        assert spill == 0, (name, spill)
