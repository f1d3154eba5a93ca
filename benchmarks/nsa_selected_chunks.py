"""NSA selected branch at 64k (key-major kernel over the selection of bf16 compressed tokens)
against the size of the per-chunk fp32 partial buffer, ``KEY_MAJOR_PARTIAL_BYTES`` (MiB, comma
list), with the outputs compared to the first size; then the whole NSA call at 1 GiB, 64 and 32
MiB.

    python3 benchmarks/nsa_selected_chunks.py 1024,256,64,32   # writes $OUT/kmchunk.json
"""
import json, os, sys, torch
sys.path.insert(0, "benchmarks")
from _inputs import nsa_selected_inputs
from _timing import median_ms
import longattn
from longattn.methods import nsa as m
import longattn.kernels.block_sparse as bs
T = 65536
q, k, v, sel, scale = nsa_selected_inputs(T)
rows = []
with torch.no_grad():
    f = lambda: m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton")
    ref = f()
    for mb in [int(x) for x in sys.argv[1].split(",")]:
        bs.KEY_MAJOR_PARTIAL_BYTES = mb << 20
        out = f()
        r = dict(partial_mib=mb, ms=median_ms(f, 5), same=bool(torch.equal(out, ref)))
        rows.append(r); print(json.dumps(r), flush=True)
    whole = lambda: longattn.attention(q, k, v, method="nsa", backend="triton", compressed_dtype="input")
    for mb in (1024, 64, 32):
        bs.KEY_MAJOR_PARTIAL_BYTES = mb << 20
        r = dict(whole_call=True, partial_mib=mb, ms=median_ms(whole, 5)); rows.append(r); print(json.dumps(r), flush=True)
json.dump(rows, open(os.environ.get("OUT", ".") + "/kmchunk.json", "w"))
