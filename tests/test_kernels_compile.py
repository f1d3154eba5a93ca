"""The Triton kernels compile for the H200 (sm_90) on this CPU machine: the interpreter that runs
the numeric tests accepts code the compiler rejects (a Python global read inside a kernel, for
one), and does not check shared memory. This compiles representative configurations of the
kernels changed most recently all the way to a cubin with the ptxas that ships with Triton, and
checks each fits the 227 KiB of shared memory one sm_90 block may use. The compilation runs in a
subprocess without ``TRITON_INTERPRET`` (in this process the kernels are interpreter objects)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SM90_SHARED = 232448  # bytes of shared memory per block on sm_90 (227 KiB)

_SCRIPT = r'''
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, pointers, constexprs, floats=(), warps=4, stages=2):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    return k.metadata.shared


from longattn.kernels.nsa import BWD_BLOCK_N, BWD_ROWS, CMP_BLOCK_N, CMP_BWD_NUM_WARPS, CMP_NUM_WARPS, ROW_CAP
from longattn.kernels.nsa.backward import _cmp_bwd_dkdv, _cmp_bwd_dq
from longattn.kernels.nsa.kernel import _cmp_fwd
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
                                                        warps=CMP_BWD_NUM_WARPS)
# the forward with fp32 compressed keys and 16-bit values (bf16 queries)
rows = ROW_CAP[True]
out["_cmp_fwd[fp32 K, bf16 V]"] = compile_sm90(
    _cmp_fwd, {"Q": "*bf16", "K": "*fp32", "V": "*bf16", "O": "*bf16", "LSE": "*fp32"},
    dict(D=128, HEAD_DIM=128, G=4, BLOCK_M=rows // 4, ROWS=rows, BLOCK_N=CMP_BLOCK_N, F32=True, PREC="tf32x3",
         UPCAST=False, F32_V=False, UPCAST_V=False), ("sm_scale_log2",), warps=CMP_NUM_WARPS)
ptr = {n: "*bf16" for n in ("Q", "K", "V", "DO", "DK", "DV")}
ptr.update({"LSE": "*fp32", "DELTA": "*fp32", "T_OFF": "*i32", "T_QB": "*i32"})
const = dict(D=128, HEAD_DIM=128, P=4, BLOCK_M=16, ROWS=64, KV_BLOCK=64, BLOCK_N=64, CAUSAL=True,
             HAS_WINDOW=False, TWO_SIDED=False, IEEE=False, UPCAST=False, TOKEN_LIST=True)
out["_bwd_dkdv[token list]"] = compile_sm90(_bwd_dkdv, ptr, const, ("sm_scale",))
print(json.dumps(out))
'''


def test_new_kernels_compile_for_sm90_within_shared_memory():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-3000:]
    shared = json.loads(res.stdout.strip().splitlines()[-1])
    assert len(shared) == 6
    for name, nbytes in shared.items():
        assert 0 < nbytes <= SM90_SHARED, (name, nbytes)
