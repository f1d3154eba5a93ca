"""NSA prefill at 64k (B = 1, H = 32, Hkv = 8, D = 128, bf16 queries, fp32 compressed tokens):
the compressed-branch and selection-score kernels with the fp32 keys scored by tf32x3 against
three exact bf16 parts (the default for bf16 queries), their times (CUDA events, median of 5)
and how far the results differ (outputs, block scores, rows whose selected blocks differ).

    python3 benchmarks/nsa_split_ab.py   # writes $OUT/splitk.json (or ./splitk.json)
"""
import json, os, sys, torch
sys.path.insert(0, "benchmarks")
from _inputs import prefill_qkv
from _timing import median_ms
import longattn.kernels.nsa as K
from longattn.methods import nsa as m
dev = "cuda"; T = 65536; H, Hkv, D = 32, 8, 128
q, k, v = prefill_qkv(T, H, Hkv, D, device=dev)
cfg = m.NSAConfig(); scale = D ** -0.5
kw = dict(kv_len=T, compress_block=32, compress_stride=16, scale=scale)
rows = []
with torch.no_grad():
    kc, vc = m.nsa_compress(k, v, cfg)
    res = {}
    for name, tune in (("tf32x3", {"split_k": False}), ("split3", {})):
        K.LAUNCH_OVERRIDES.clear(); K.LAUNCH_OVERRIDES["cmp_fwd"] = dict(tune); K.LAUNCH_OVERRIDES["scores"] = dict(tune)
        o, lse = K.compressed_attention(q, kc, vc, **kw)
        p = K.selection_scores(q, kc, lse, select_block=64, **kw)
        idx = K.select_blocks(p, kv_len=T, select_block=64, num_selected=16, num_init_blocks=1, num_local_blocks=2)[0]
        t_c = median_ms(lambda: K.compressed_attention(q, kc, vc, **kw), 5)
        t_s = median_ms(lambda: K.selection_scores(q, kc, lse, select_block=64, **kw), 5)
        res[name] = (o, lse, p, idx)
        r = dict(mode=name, cmp_ms=t_c, scores_ms=t_s); rows.append(r); print(json.dumps(r), flush=True)
    K.LAUNCH_OVERRIDES.clear()
    a, b = res["tf32x3"], res["split3"]
    r = dict(out_max_diff=(a[0].float() - b[0].float()).abs().max().item(), lse_max_diff=(a[1] - b[1]).abs().max().item(),
             p_max_diff=(a[2] - b[2]).abs().max().item(), same_rows=(a[3] == b[3]).all(-1).float().mean().item())
    rows.append(r); print(json.dumps(r), flush=True)
json.dump(rows, open(os.environ.get("OUT", ".") + "/splitk.json", "w"))
