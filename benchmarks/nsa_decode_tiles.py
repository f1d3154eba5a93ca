"""NSA decoding (H = 32, Hkv = 8, D = 128, bf16, bf16 compressed tokens, every sequence at T), per
batch size: dense SDPA and the step under CUDA graphs (cold L2) with each kernel's CUPTI time,
then the step under other launch settings, each checked against the default's output:

* ``tiles``: tiles of the compressed split kernel (warps x stages x tokens per tile) and of the
  branch split kernel;
* ``splits``: split counts (programs per sequence and KV head) of the compressed split kernel,
  then of the branch kernel (selected + window splits in all), in place of
  ``choose_num_splits``'s pick.

    python3 benchmarks/nsa_decode_tiles.py 16,32                    # 64k, tile sweeps; $OUT/nsa16.json
    python3 benchmarks/nsa_decode_tiles.py 1,4,16,32 --sweeps splits --name nsa_splits.json
    python3 benchmarks/nsa_decode_tiles.py 16 --T 131072 --sweeps splits
"""
import argparse, json, os, sys, itertools, torch
sys.path.insert(0, "benchmarks")
from _timing import graph_median_ms
from decode_profile import kernel_times
from longattn import decode_nsa as dn
from longattn.methods.nsa import NSAConfig
import longattn.kernels.nsa.decode as dec
import longattn.kernels.nsa.decode_branches as br

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("batches", help="batch sizes, comma-separated")
ap.add_argument("--T", type=int, default=65536, help="cached keys per sequence")
ap.add_argument("--sweeps", default="tiles", help="comma-separated: tiles, splits (or none)")
ap.add_argument("--name", default="nsa16.json", help="results file under $OUT")
args = ap.parse_args()
sweeps = set(args.sweeps.split(","))
OUT = os.environ.get("OUT", ".")
dev = "cuda"; T = args.T; H, Hkv, D = 32, 8, 128
cfg = NSAConfig()
flush = torch.empty(256 << 20, dtype=torch.uint8, device=dev)
rows = []
def rec(**r):
    rows.append(r); print(json.dumps(r), flush=True)
with torch.no_grad():
  for B in [int(x) for x in args.batches.split(",")]:
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
    rec(B=B, T=T, what="dense", us=1e3 * graph_median_ms(dense, flush=flush))
    rec(B=B, T=T, what="step_default", us=1e3 * graph_median_ms(step, flush=flush),
        kernels=[(n, round(t, 2)) for n, t in kernel_times(step, flush)])

    def patched_run(what, module, name, make, settings, fields):
        """The step with ``module.name`` replaced by ``make(real, setting)`` for each setting; its
        time, its kernels' times and its output's distance from the default's."""
        real = getattr(module, name)
        for s in settings:
            setattr(module, name, make(real, s))
            try:
                diff = (step().float() - ref.float()).abs().max().item()
                rec(B=B, T=T, what=what, **fields(s), diff=diff, us=1e3 * graph_median_ms(step, flush=flush),
                    kernels=[(n, round(t, 2)) for n, t in kernel_times(step, flush)])
            except Exception as e:
                rec(B=B, T=T, what=what, **fields(s), err=str(e)[:200])
            finally:
                setattr(module, name, real)

    def tiles(extra=lambda bn: {}):
        def make(real, s):
            w, st, bn = s
            def patched(*a, **kw):
                c = real(*a, **kw)
                c.update(num_warps=w, num_stages=st, BLOCK_N=bn, **extra(bn))
                return c
            return patched
        return make
    tile_fields = lambda s: dict(w=s[0], st=s[1], bn=s[2])
    if "tiles" in sweeps:
        patched_run("cmp_tile", dec, "decode_tile_config", tiles(), itertools.product((2, 4), (2, 3, 4), (32, 64, 128)),
                    fields=tile_fields)
        patched_run("br_tile", br, "branches_tile_config", tiles(lambda bn: {"CHUNKS": 64 // bn}),
                    itertools.product((2, 4), (2, 3, 4), (32, 64)), fields=tile_fields)
    if "splits" in sweeps:
        fixed = lambda real, n: (lambda *a, **kw: n)
        patched_run("cmp_splits", dec, "choose_num_splits", fixed, (1, 2, 3, 4, 5, 6, 8, 12, 16),
                    fields=lambda n: dict(splits=n))
        patched_run("br_splits", br, "choose_num_splits", fixed, (2, 3, 4, 6, 8, 12), fields=lambda n: dict(splits=n))
    del k, v, kc, vc
    torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(OUT, args.name), "w"), indent=0)
for B in sorted({r["B"] for r in rows}):
    rs = [r for r in rows if r["B"] == B]
    d = next(r for r in rs if r["what"] == "dense")["us"]; s = next(r for r in rs if r["what"] == "step_default")
    print("B", B, "T", T, "dense", round(d, 1), "default", round(s["us"], 1), round(d / s["us"], 2), s["kernels"])
    for what in ("cmp_tile", "br_tile", "cmp_splits", "br_splits"):
        ok = sorted([r for r in rs if r["what"] == what and "us" in r], key=lambda r: r["us"])[:5]
        if ok:
            print(" ", what, [({k: r[k] for k in ("w", "st", "bn", "splits") if k in r}, round(r["us"], 1),
                               round(d / r["us"], 2), r["diff"]) for r in ok])
