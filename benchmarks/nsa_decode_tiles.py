"""NSA decoding at 64k (H = 32, Hkv = 8, D = 128, bf16, bf16 compressed tokens, every sequence at
T), per batch size: dense SDPA and the step under CUDA graphs (cold L2) with each kernel's CUPTI
time, then the step under other tiles of the compressed split kernel (warps x stages x tokens per
tile) and of the branch split kernel, each checked against the default's output.

    python3 benchmarks/nsa_decode_tiles.py 16,32   # batch sizes; writes $OUT/nsa16.json
"""
import json, os, sys, itertools, statistics, torch
sys.path.insert(0, "benchmarks")
from _timing import graph_median_ms, capture_graph
from decode_profile import kernel_times
from longattn import decode_nsa as dn
from longattn.methods.nsa import NSAConfig
import longattn.kernels.nsa.decode as dec
import longattn.kernels.nsa.decode_branches as br
OUT = os.environ.get("OUT", ".")
dev = "cuda"; T = 65536; H, Hkv, D = 32, 8, 128
cfg = NSAConfig()
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
rows = []
def rec(**r):
    rows.append(r); print(json.dumps(r), flush=True)
with torch.no_grad():
  for B in [int(x) for x in sys.argv[1].split(",")]:
    g = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn_like(k)
    lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    kc, vc = dn.nsa_decode_compress(k, v, lens, cfg)
    kc, vc = kc.bfloat16(), vc.bfloat16()
    step = lambda: dn.nsa_decode(q, k, v, lens, k_cmp=kc, v_cmp=vc, backend="triton", validate=False)
    dense = lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    ref = step()
    rec(B=B, what="dense", us=1e3 * graph_median_ms(dense, flush=flush))
    rec(B=B, what="step_default", us=1e3 * graph_median_ms(step, flush=flush),
        kernels=[(n, round(t, 2)) for n, t in kernel_times(step, flush)])
    def try_tiles(what, module, name, combos, extra=lambda bn: {}):
        """The step with ``module.name`` (a tile-config function) patched to each (warps, stages,
        tokens per tile) of ``combos``; its time and its output's distance from the default's."""
        real = getattr(module, name)
        for w, st, bn in combos:
            def patched(*a, **kw):
                c = real(*a, **kw)
                c.update(num_warps=w, num_stages=st, BLOCK_N=bn, **extra(bn))
                return c
            setattr(module, name, patched)
            try:
                diff = (step().float() - ref.float()).abs().max().item()
                rec(B=B, what=what, w=w, st=st, bn=bn, diff=diff, us=1e3 * graph_median_ms(step, flush=flush))
            except Exception as e:
                rec(B=B, what=what, w=w, st=st, bn=bn, err=str(e)[:200])
            finally:
                setattr(module, name, real)

    try_tiles("cmp_tile", dec, "decode_tile_config", itertools.product((2, 4), (2, 3, 4), (32, 64, 128)))
    try_tiles("br_tile", br, "branches_tile_config", itertools.product((2, 4), (2, 3, 4), (32, 64)),
              lambda bn: {"CHUNKS": 64 // bn})
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(rows, open(OUT + "/nsa16.json", "w"), indent=0)
for B in sorted({r["B"] for r in rows}):
    rs = [r for r in rows if r["B"] == B]
    d = next(r for r in rs if r["what"] == "dense")["us"]; s = next(r for r in rs if r["what"] == "step_default")
    print("B", B, "dense", round(d, 1), "default", round(s["us"], 1), round(d / s["us"], 2), s["kernels"])
    for what in ("cmp_tile", "br_tile"):
        ok = sorted([r for r in rs if r["what"] == what and "us" in r], key=lambda r: r["us"])[:5]
        print(" ", what, [(r["w"], r["st"], r["bn"], round(r["us"], 1), round(d / r["us"], 2), r["diff"]) for r in ok])
