"""The sparse decoding kernels compile for the H200 (sm_90) on this CPU machine with the ptxas that
ships with Triton (:mod:`tests.sm90`), at the tiles :func:`longattn.kernels.decode.tile_config`
and the selection's ``SCORE_TILE`` pick: the split kernel with 16-token pages packed four to a
64-key chunk (Quest) and with 128-token blocks (top-k), and the scoring kernel in both modes,
for a GQA group of 4 (one query) and for 64 rows (16 heads x 4 queries) at D = 256."""

from __future__ import annotations

import pytest

from .sm90 import SM90_SHARED, compile_sm90_script

pytest.importorskip("triton")

_SCRIPT = r"""
import torch
from longattn.kernels.decode.kernel import _decode_split_kernel, tile_config
from longattn.kernels.decode.select import SCORE_TILE, _score_kernel, score_warps

out = {}
ptr = {n: "*bf16" for n in ("Q", "K", "V")}
ptr.update({"Lens": "*i32", "Idx": "*i32", "Cnt": "*i32", "O": "*fp32", "L": "*fp32"})
for G, TQ, bs, D in ((4, 1, 16, 128), (4, 1, 128, 128), (16, 4, 16, 256)):
    cfg = tile_config(G, TQ, bs, D, torch.bfloat16)
    const = dict(G=G, TQ=TQ, BLOCK_SIZE=bs, CHUNKS=cfg["CHUNKS"], HEAD_DIM=D, BLOCK_M=cfg["BLOCK_M"],
                 BLOCK_N=cfg["BLOCK_N"], DOT_MODE=0, SLOTS=cfg["SLOTS"])
    out[f"split[G={G},TQ={TQ},bs={bs},D={D},slots={cfg['SLOTS']}]"] = compile_sm90(
        _decode_split_kernel, ptr, const, ("qk_scale",), cfg["num_warps"], cfg["num_stages"],
        ones=("stride_qd", "stride_kd", "stride_vd"))
block_nb, warps = SCORE_TILE
sptr = {"Q": "*bf16", "KM": "*fp32", "KMIN": "*bf16", "KMAX": "*bf16", "Lens": "*i32", "Scratch": "*fp32"}
for quest in (False, True):
    for rows, D in ((16, 128), (64, 256)):
        G, TQ = (4, 1) if rows == 16 else (16, 4)
        const = dict(G=G, TQ=TQ, HEAD_DIM=D, ROWS=rows, BLOCK_NB=block_nb, QUEST=quest)
        w = score_warps(rows, D, quest, block_nb, warps)
        out[f"score[quest={quest},rows={rows},D={D},warps={w}]"] = compile_sm90(_score_kernel, sptr, const, (), w,
                                                                                           ones=("stride_qd", "stride_md"))
print(json.dumps(out))
"""


def test_decode_kernels_compile_for_sm90():
    results = compile_sm90_script(_SCRIPT)
    assert len(results) == 7
    for name, (shared, spill) in results.items():
        assert 0 < shared <= SM90_SHARED, (name, shared)
        # compiled as launched (unit strides constant) neither kernel spills; with the unit
        # strides as runtime integers the split kernel's bf16 tiles reported 4-64 bytes
        assert spill == 0, (name, spill)
