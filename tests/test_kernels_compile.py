"""The Triton kernels compile for the H200 (sm_90) on this CPU machine: the interpreter that runs
the numeric tests accepts code the compiler rejects (a Python global read inside a kernel, for
one), and does not check shared memory. This compiles representative configurations of the
kernels changed most recently all the way to a cubin with the ptxas that ships with Triton, and
checks each fits the 227 KiB of shared memory one sm_90 block may use."""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

SM90_SHARED = 232448  # bytes of shared memory per block on sm_90 (227 KiB)


def _compile(fn, pointers: dict, constexprs: dict, floats: tuple = (), warps: int = 4, stages: int = 2):
    """Compile ``fn`` for sm_90; arguments are ``pointers`` (name -> "*bf16"...), ``constexprs``,
    ``floats`` (fp32 scalars), the rest int32 scalars."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        else:
            sig[name] = "fp32" if name in floats else "i32"
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()})
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))


@pytest.fixture(autouse=True)
def _compiled_not_interpreted(monkeypatch):
    # triton.compile does not consult TRITON_INTERPRET, but keep the environment honest
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("k_dtype", ["fp32", "bf16"])
def test_nsa_compressed_backward_kernels_compile(k_dtype):
    from longattn.kernels.nsa import BWD_BLOCK_N, BWD_ROWS
    from longattn.kernels.nsa.backward import _cmp_bwd_dkdv, _cmp_bwd_dq

    fp32 = k_dtype == "fp32"
    ptr = {n: f"*{k_dtype}" for n in ("K", "V", "DK", "DV")}
    ptr.update({n: "*fp32" for n in ("LSE", "DELTA")})
    ptr.update({n: "*bf16" for n in ("Q", "DO", "DQ")})
    rows = BWD_ROWS[fp32]
    const = dict(D=128, HEAD_DIM=128, G=4, BLOCK_M=rows // 4, ROWS=rows, BLOCK_N=BWD_BLOCK_N[fp32], F32=fp32,
                 PREC="tf32x3", UPCAST=False)
    for fn in (_cmp_bwd_dq, _cmp_bwd_dkdv):
        kernel = _compile(fn, ptr, const, ("sm_scale_log2", "sm_scale"), warps=8)
        assert 0 < kernel.metadata.shared <= SM90_SHARED, (fn.__name__, kernel.metadata.shared)


def test_block_sparse_token_list_backward_compiles():
    from longattn.kernels.block_sparse.kernel import _bwd_dkdv

    ptr = {n: "*bf16" for n in ("Q", "K", "V", "DO", "DK", "DV")}
    ptr.update({"LSE": "*fp32", "DELTA": "*fp32", "T_OFF": "*i32", "T_QB": "*i32"})
    const = dict(D=128, HEAD_DIM=128, P=4, BLOCK_M=16, ROWS=64, KV_BLOCK=64, BLOCK_N=64, CAUSAL=True,
                 HAS_WINDOW=False, TWO_SIDED=False, IEEE=False, UPCAST=False, TOKEN_LIST=True)
    kernel = _compile(_bwd_dkdv, ptr, const, ("sm_scale",))
    assert 0 < kernel.metadata.shared <= SM90_SHARED
