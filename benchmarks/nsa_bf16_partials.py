"""Experiment (not a code path of the library): the key-major forward's per-slot partial outputs
held in bf16 instead of fp32 (the buffer of NSA's selected branch swapped by a wrapper around
``_chunk_buffer``), with the error at 4k against the fp32 reference for both token dtypes
(beside the plain bf16 computation's), then the NSA forward at 64k with each buffer, twice,
interleaved.

    python3 benchmarks/nsa_bf16_partials.py > $OUT/nsa_bf16_partials.txt
"""
import json, sys, torch, longattn
sys.path.insert(0, "benchmarks")
from _timing import median_ms
from _inputs import prefill_qkv
import longattn.kernels.block_sparse as bsp
real = bsp._chunk_buffer
def bf16_op(buf, shape, n, device, fill=None):
    if buf is None and len(shape) == 5 and fill is None:
        buf = torch.empty(shape, device=device, dtype=torch.bfloat16)
    return real(buf, shape, n, device, fill)
def err(a, b): return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()
with torch.no_grad():
    for T in (4096,):
        q, k, v = prefill_qkv(T)
        for cmp in ("float32", "input"):
            ref = longattn.attention(q.float(), k.float(), v.float(), method="nsa", backend="reference", compressed_dtype=cmp)
            plain = longattn.attention(q, k, v, method="nsa", backend="reference", compressed_dtype=cmp)
            bsp._chunk_buffer = real; o32 = longattn.attention(q, k, v, method="nsa", backend="triton", compressed_dtype=cmp)
            bsp._chunk_buffer = bf16_op; o16 = longattn.attention(q, k, v, method="nsa", backend="triton", compressed_dtype=cmp)
            bsp._chunk_buffer = real
            print(json.dumps(dict(T=T, cmp=cmp, err_fp32_parts=err(o32, ref), err_bf16_parts=err(o16, ref), err_plain=err(plain, ref))), flush=True)
    q, k, v = prefill_qkv(65536)
    for cmp in ("input", "float32"):
        f = lambda: longattn.attention(q, k, v, method="nsa", backend="triton", compressed_dtype=cmp)
        res = {}
        for rep in range(2):
            for tag, cb in (("fp32", real), ("bf16", bf16_op)):
                bsp._chunk_buffer = cb
                res.setdefault(tag, []).append(round(median_ms(f, 5), 2))
        bsp._chunk_buffer = real
        a = f(); bsp._chunk_buffer = bf16_op; b = f(); bsp._chunk_buffer = real
        print(json.dumps(dict(T=65536, cmp=cmp, ms=res, max_diff=(a.float() - b.float()).abs().max().item())), flush=True)
