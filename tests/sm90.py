"""Compile Triton kernels for the H200 (sm_90) on the CPU machine, for the tests that check the
real compiler's verdict: the interpreter that runs the numeric tests accepts code the compiler
rejects (a Python global read inside a kernel, for one) and checks neither shared memory nor
registers. :func:`compile_sm90_script` runs a script in a subprocess without
``TRITON_INTERPRET`` (in the test process the kernels are interpreter objects), with ptxas'
log on and an empty cache, so ptxas runs and reports every time; the script calls
``compile_sm90(fn, pointers, constexprs, floats, warps, stages, ones) -> [shared bytes, spill
bytes]`` and prints one JSON object last. Arguments are specialised as the launcher specialises
them at aligned shapes: the integers named in ``ones`` (unit strides) as the constant 1, every
other pointer and integer as divisible by 16."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

SM90_SHARED = 232448  # bytes of shared memory one sm_90 block may use (227 KiB)

PRELUDE = r'''
import contextlib, io, json, re
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_sm90(fn, pointers, constexprs, floats=(), warps=4, stages=2, ones=()):
    """Compile ``fn`` to a cubin for sm_90; arguments: ``pointers`` (name -> "*bf16"...),
    ``constexprs``, ``floats`` (fp32 scalars), ``ones`` (integers that are 1 at launch: unit
    strides), the rest int32. Returns [shared bytes, spill store bytes from ptxas -v]."""
    # as Triton's launcher specialises at the benchmarks' power-of-two shapes: an integer equal
    # to 1 becomes the constant 1, and every other pointer and integer is divisible by 16. Both
    # let the compiler vectorise and pipeline the loads, which then stage more in shared memory
    # (without the hints an sm_90 _cmp_fwd compiled to 192 KiB that launched needing 256 KiB)
    constexprs = {**constexprs, **{n: 1 for n in ones}}
    sig = {n: "constexpr" if n in constexprs else pointers.get(n, "fp32" if n in floats else "i32")
           for n in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
               if n not in constexprs and n not in floats}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
                    attrs=aligned)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):  # TRITON_DUMP_PTXAS_LOG=1: ptxas -v prints here
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
    text = log.getvalue()
    if "registers" not in text:
        raise RuntimeError("no ptxas log captured: " + text[-500:])
    return [k.metadata.shared, sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", text))]
'''


def compile_sm90_script(body: str, timeout: int = 400) -> dict:
    """Run ``PRELUDE + body`` in a fresh interpreter and return the JSON object it prints last;
    fails the calling test with the subprocess' stderr when it does not exit cleanly."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DUMP_PTXAS_LOG"] = "1"
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    with tempfile.TemporaryDirectory() as cache:  # an empty cache: ptxas runs (and logs) every time
        env["TRITON_CACHE_DIR"] = cache
        res = subprocess.run([sys.executable, "-c", PRELUDE + body], env=env, capture_output=True, text=True,
                             timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])
