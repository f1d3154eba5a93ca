"""The key-major forward's per-block output rows in the input's 16-bit dtype (the default,
``longattn.kernels.block_sparse.partial_dtype``) against fp32 rows (``partial_dtype`` patched to
return fp32): the error at 4k against the fp32 reference for both compressed-token dtypes
(beside the PyTorch bf16 computation's), then NSA's forward and MoBA's at 64k with each, twice,
interleaved in one process.

    python3 benchmarks/nsa_bf16_partials.py > $OUT/nsa_bf16_partials.txt
"""
import json
import sys

import torch

import longattn
import longattn.kernels.block_sparse as bsp

sys.path.insert(0, "benchmarks")
from _inputs import prefill_qkv  # noqa: E402
from _timing import median_ms  # noqa: E402

default = bsp.partial_dtype
ROWS = {"fp32 rows": lambda dtype: torch.float32, "16-bit rows": default}


def err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


with torch.no_grad():
    q, k, v = prefill_qkv(4096)
    for cmp in ("float32", "input"):
        ref = longattn.attention(q.float(), k.float(), v.float(), method="nsa", backend="reference", compressed_dtype=cmp)
        plain = longattn.attention(q, k, v, method="nsa", backend="reference", compressed_dtype=cmp)
        res = dict(T=4096, cmp=cmp, err_plain=err(plain, ref))
        for tag, fn in ROWS.items():
            bsp.partial_dtype = fn
            res["err " + tag] = err(longattn.attention(q, k, v, method="nsa", backend="triton", compressed_dtype=cmp), ref)
        bsp.partial_dtype = default
        print(json.dumps(res), flush=True)
    q, k, v = prefill_qkv(65536)
    cases = {"nsa bf16 tokens": dict(method="nsa", compressed_dtype="input"),
             "nsa fp32 tokens": dict(method="nsa", compressed_dtype="float32"), "moba": dict(method="moba")}
    for name, kw in cases.items():
        f = lambda: longattn.attention(q, k, v, backend="triton", **kw)  # noqa: E731
        res = {}
        for rep in range(2):
            for tag, fn in ROWS.items():
                bsp.partial_dtype = fn
                res.setdefault(tag, []).append(round(median_ms(f, 5), 2))
        bsp.partial_dtype = default
        print(json.dumps(dict(T=65536, case=name, ms=res)), flush=True)
