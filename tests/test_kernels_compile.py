"""The NSA prefill kernels (compressed branch forward and backward) and the block-sparse dK/dV
kernel's per-token mode compile for the H200 (sm_90) on this CPU machine with the ptxas that
ships with Triton (:mod:`tests.sm90`), within the shared memory one block may use. The first GPU
run of the NSA backward kernels failed to compile (a Python global read inside a kernel) although
every interpreter test had passed: this catches that class of error in CI. Spills are not
bounded here: ptxas reports some for these tiles (a few hundred bytes for the bf16 dK/dV kernel, more
for the rarely used fp32 one at 4 warps), and the warp counts were chosen by measured time on
the H200 (``benchmarks/nsa_tile_sweep.py``), not by spills."""

from __future__ import annotations

import pytest

from .sm90 import SM90_SHARED, compile_sm90_script

pytest.importorskip("triton")

_SCRIPT = r"""
from longattn.kernels.nsa import (BWD_BLOCK_N, BWD_ROWS, CMP_BLOCK_N, CMP_BWD_NUM_WARPS, CMP_NUM_WARPS, NUM_STAGES,
                                  ROW_CAP, SLC_NUM_WARPS, SLC_BLOCK_N, SPLIT_NUM_WARPS, WIDE_FP32_BWD_BLOCK_N,
                                  WIDE_FP32_ROWS, WIDE_SPLIT_BLOCK_N)
from longattn.kernels.nsa.backward import _cmp_bwd_dkdv, _cmp_bwd_dq
from longattn.kernels.nsa.kernel import _cmp_fwd, _slc_scores
from longattn.kernels.block_sparse.kernel import _bwd_dkdv

out = {}
for k_dtype in ("fp32", "bf16"):
    fp32 = k_dtype == "fp32"
    ptr = {n: f"*{k_dtype}" for n in ("K", "V", "DK", "DV")}
    ptr.update({n: "*fp32" for n in ("LSE", "DELTA")})
    ptr.update({n: "*bf16" for n in ("Q", "DO", "DQ")})
    rows = BWD_ROWS[fp32]
    const = dict(D=128, HEAD_DIM=128, G=4, BLOCK_M=rows // 4, ROWS=rows, BLOCK_N=BWD_BLOCK_N[fp32], F32=fp32,
                 PREC="tf32x3", UPCAST=False)
    for fn in (_cmp_bwd_dq, _cmp_bwd_dkdv):
        out[f"{fn.__name__}[{k_dtype}]"] = compile_sm90(fn, ptr, const, ("sm_scale_log2", "sm_scale"),
                                                        CMP_BWD_NUM_WARPS)
# fp32 training at D = 256 (fp32 queries and tokens): the smaller backward tiles
ptr = {n: "*fp32" for n in ("K", "V", "DK", "DV", "LSE", "DELTA", "Q", "DO", "DQ")}
const = dict(D=256, HEAD_DIM=256, G=4, BLOCK_M=WIDE_FP32_ROWS // 4, ROWS=WIDE_FP32_ROWS,
             BLOCK_N=WIDE_FP32_BWD_BLOCK_N, F32=True, PREC="tf32x3", UPCAST=False)
for fn in (_cmp_bwd_dq, _cmp_bwd_dkdv):
    out[f"{fn.__name__}[fp32, D=256]"] = compile_sm90(fn, ptr, const, ("sm_scale_log2", "sm_scale"),
                                                      CMP_BWD_NUM_WARPS)
# the forward with fp32 compressed keys and 16-bit values, and the score kernel: against bf16 queries the
# keys split into bf16 parts (128 rows, SPLIT_NUM_WARPS, as launched at D = 128), against fp16 ones tf32x3
# (fp32 q tiles: ROW_CAP[True] rows)
rows16 = ROW_CAP[False]
nb = SLC_BLOCK_N // 4  # select_block / compress_stride = 64 / 16
for q_dtype, split in (("bf16", True), ("fp16", False)):
    rows, w_cmp, w_slc = (rows16, SPLIT_NUM_WARPS, SPLIT_NUM_WARPS) if split else (ROW_CAP[True], CMP_NUM_WARPS,
                                                                                   SLC_NUM_WARPS)
    out[f"_cmp_fwd[fp32 K, {q_dtype} Q]"] = compile_sm90(
        _cmp_fwd, {"Q": f"*{q_dtype}", "K": "*fp32", "V": f"*{q_dtype}", "O": f"*{q_dtype}", "LSE": "*fp32"},
        dict(D=128, HEAD_DIM=128, G=4, BLOCK_M=rows // 4, ROWS=rows, BLOCK_N=CMP_BLOCK_N, F32=True,
             PREC="tf32x3", UPCAST=False, F32_V=False, UPCAST_V=False, SPLIT_K=split, SPLIT_UPCAST=False),
        ("sm_scale_log2",), w_cmp)
    out[f"_slc_scores[fp32 K, {q_dtype} Q]"] = compile_sm90(
        _slc_scores, {"Q": f"*{q_dtype}", "K": "*fp32", "LSE": "*fp32", "S": "*fp32"},
        dict(D=128, HEAD_DIM=128, G=4, GP=4, BLOCK_M=rows // 4, BLOCK_N=nb * 4, NB=nb, NBP=max(16, nb), E=1,
             F32=True, PREC="tf32x3", UPCAST=False, OVL_SPLIT=True, SPLIT_UPCAST=False, SPLIT_K=split),
        ("sm_scale_log2",), w_slc)
# D = 256 with fp32 tokens: split against bf16 queries (64 rows: the split's wide tiles are for D <= 128;
# the forward steps WIDE_SPLIT_BLOCK_N tokens), tf32x3 against fp16 ones (fp32 q tiles: WIDE_FP32_ROWS)
for q_dtype, split in (("bf16", True), ("fp16", False)):
    rows, stages = (ROW_CAP[True] if split else WIDE_FP32_ROWS), NUM_STAGES
    out[f"_cmp_fwd[fp32 K, {q_dtype} Q, D=256]"] = compile_sm90(
        _cmp_fwd, {"Q": f"*{q_dtype}", "K": "*fp32", "V": f"*{q_dtype}", "O": f"*{q_dtype}", "LSE": "*fp32"},
        dict(D=256, HEAD_DIM=256, G=4, BLOCK_M=rows // 4, ROWS=rows,
             BLOCK_N=WIDE_SPLIT_BLOCK_N if split else CMP_BLOCK_N, F32=True,
             PREC="tf32x3", UPCAST=False, F32_V=False, UPCAST_V=False, SPLIT_K=split, SPLIT_UPCAST=False),
        ("sm_scale_log2",), CMP_NUM_WARPS, stages)
    out[f"_slc_scores[fp32 K, {q_dtype} Q, D=256]"] = compile_sm90(
        _slc_scores, {"Q": f"*{q_dtype}", "K": "*fp32", "LSE": "*fp32", "S": "*fp32"},
        dict(D=256, HEAD_DIM=256, G=4, GP=4, BLOCK_M=rows // 4, BLOCK_N=nb * 4, NB=nb, NBP=max(16, nb), E=1,
             F32=True, PREC="tf32x3", UPCAST=False, OVL_SPLIT=True, SPLIT_UPCAST=False, SPLIT_K=split),
        ("sm_scale_log2",), SLC_NUM_WARPS, stages)
# 16-bit compressed tokens (compressed_dtype="input"): 128 rows
out["_slc_scores[bf16 K]"] = compile_sm90(
    _slc_scores, {"Q": "*bf16", "K": "*bf16", "LSE": "*fp32", "S": "*fp32"},
    dict(D=128, HEAD_DIM=128, G=4, GP=4, BLOCK_M=rows16 // 4, BLOCK_N=nb * 4, NB=nb, NBP=max(16, nb), E=1,
         F32=False, PREC="tf32x3", UPCAST=False, OVL_SPLIT=True, SPLIT_UPCAST=False, SPLIT_K=False),
    ("sm_scale_log2",), SLC_NUM_WARPS)
ptr = {n: "*bf16" for n in ("Q", "K", "V", "DO", "DK", "DV")}
ptr.update({"LSE": "*fp32", "DELTA": "*fp32", "T_OFF": "*i32", "T_QB": "*i32", "ITEMS": "*i32", "DKP": "*fp32",
            "DVP": "*fp32"})
const = dict(D=128, HEAD_DIM=128, P=4, BLOCK_M=16, ROWS=64, KV_BLOCK=64, BLOCK_N=64, CAUSAL=True,
             HAS_WINDOW=False, TWO_SIDED=False, IEEE=False, UPCAST=False, TOKEN_LIST=True)
out["_bwd_dkdv[token list]"] = compile_sm90(_bwd_dkdv, ptr, const, ("sm_scale",))
# the sum of the partials of the dK/dV programs cut into parts
from longattn.kernels.block_sparse.kernel import _sum_dkdv_parts
out["_sum_dkdv_parts"] = compile_sm90(
    _sum_dkdv_parts, {"DKP": "*fp32", "DVP": "*fp32", "DK": "*bf16", "DV": "*bf16", "SPLIT": "*i32"},
    dict(D=128, HEAD_DIM=128, BLOCK_N=64, SUM_ROWS=16), ("sm_scale",))
# the key-major per-token path: the per-block forward, its slot merge and the per-block dQ
from longattn.kernels.block_sparse.kernel import _bwd_dq_tokens, _fwd_tokens, _merge_slots
ptr = {"Q": "*bf16", "K": "*bf16", "V": "*bf16", "DO": "*bf16", "OP": "*fp32", "LP": "*fp32", "DQP": "*fp32",
       "LSE": "*fp32", "DELTA": "*fp32"}
ptr.update({n: "*i32" for n in ("ITEM_START", "ITEM_STOP", "T_TOK", "T_SLOT")}, ITEM_KEY="*i64")
rule = dict(D=128, HEAD_DIM=128, P=4, KV_BLOCK=64, CAUSAL=True, HAS_WINDOW=False, TWO_SIDED=False, IEEE=False,
            UPCAST=False)
# the query-major forward at its bf16 default (128 rows, 64 keys per step, 4 warps, 3 stages; ptxas
# reports 832 bytes of spill stores for it, and it was still the fastest tile measured)
from longattn.kernels.block_sparse.kernel import _fwd
out["_fwd[bf16]"] = compile_sm90(_fwd, {n: "*bf16" for n in ("Q", "K", "V", "O")} | {"LSE": "*fp32", "KVN": "*i32",
                                 "KVI": "*i32"}, dict(rule, P=4, BLOCK_M=32, ROWS=128, KV_BLOCK=128, BLOCK_N=64),
                                 ("sm_scale_log2",), 4, 3)
# the key-major forward over 64-key blocks (NSA: the block in one step, 2 stages) and 512-key ones (MoBA)
out["_fwd_tokens[bf16]"] = compile_sm90(_fwd_tokens, ptr, dict(rule, BLOCK_M=32, ROWS=128, BLOCK_N=64),
                                        ("sm_scale_log2",), 4, 2)
out["_fwd_tokens[bf16, 512-key blocks]"] = compile_sm90(
    _fwd_tokens, ptr, dict(rule, KV_BLOCK=512, P=1, BLOCK_M=128, ROWS=128, BLOCK_N=32), ("sm_scale_log2",), 4, 3)
out["_fwd_tokens[bf16, D=256]"] = compile_sm90(
    _fwd_tokens, ptr, dict(rule, D=256, HEAD_DIM=256, BLOCK_M=32, ROWS=128, BLOCK_N=64), ("sm_scale_log2",), 4, 2)
out["_bwd_dq_tokens[bf16]"] = compile_sm90(_bwd_dq_tokens, ptr, dict(rule, BLOCK_M=16, ROWS=64, BLOCK_N=64),
                                           ("sm_scale_log2",), 4, 2)
from longattn.kernels.block_sparse.kernel import _sum_slots
out["_sum_slots"] = compile_sm90(_sum_slots, {"DQP": "*fp32", "KVN": "*i32", "DQ": "*bf16"},
                                 dict(D=128, HEAD_DIM=128, BLOCK_T=32), ("scale",))
out["_merge_slots"] = compile_sm90(_merge_slots, {"OP": "*fp32", "LP": "*fp32", "O": "*bf16", "LSE": "*fp32"},
                                   dict(D=128, HEAD_DIM=128, BLOCK_T=32))
from longattn.kernels.online_softmax import _row_dot
out["_row_dot"] = compile_sm90(_row_dot, {"A": "*bf16", "B": "*bf16", "OUT": "*fp32"},
                               dict(D=128, HEAD_DIM=128, BLOCK_T=64))
from longattn.kernels.nsa.combine import _combine_bwd, _combine_fwd
ptr = {n: "*bf16" for n in ("OC", "OS", "OW", "OUT", "DO", "DC", "DS", "DW")}
ptr.update(GATES="*fp32", DG="*fp32")
for per_query in (False, True):
    for fn in (_combine_fwd, _combine_bwd):
        out[f"{fn.__name__}[per_query={per_query}]"] = compile_sm90(
            fn, ptr, dict(D=128, HEAD_DIM=128, BLOCK_T=64, PER_QUERY=per_query), ("g0", "g1", "g2"))
print(json.dumps(out))
"""


def test_new_kernels_compile_for_sm90_within_shared_memory():
    results = compile_sm90_script(_SCRIPT)
    assert len(results) == 29
    for name, (shared, _spill) in results.items():
        # the matmul kernels stage tiles in shared memory; the slot and part sums, the row dot and
        # the branch combine are not matmuls
        low = 0 if name.startswith(("_sum_slots", "_sum_dkdv_parts", "_row_dot", "_combine")) else 1
        assert low <= shared <= SM90_SHARED, (name, shared)
