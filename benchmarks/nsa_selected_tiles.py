"""NSA's selected branch at 64k (the key-major per-token forward over the selection of bf16
compressed tokens, paper defaults, H = 32, Hkv = 8, D = 128, bf16) under other tiles: for each
``rows:block_n:warps:stages`` (query rows = 4 heads x tokens per program, keys per inner step),
the branch's median time, its two kernels' CUPTI times (the per-block tile kernel and the slot
merge) and the output's distance from the default tiles'. The tiles are forced through
``TILE_CAPS[("fwd-tokens", False)]`` and ``LAUNCH_OVERRIDES["fwd"]``, with
``KEY_MAJOR_ONE_STEP`` set to 0 meanwhile (it would otherwise widen a 64-key block's steps).

    python3 benchmarks/nsa_selected_tiles.py 128:32:4:3,64:32:4:3,128:64:8:3   # $OUT/nsa_selected_tiles.json
"""
import json
import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, "benchmarks")
from _inputs import nsa_selected_inputs  # noqa: E402
from _timing import median_ms  # noqa: E402

import longattn.kernels.block_sparse as bs  # noqa: E402
from longattn.methods import nsa as m  # noqa: E402


def kernel_ms(fn) -> dict[str, float]:
    """CUPTI milliseconds per kernel name of one call."""
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    times: dict[str, float] = {}
    for e in prof.events():
        if e.device_time > 0 and e.name.startswith("_"):
            times[e.name] = times.get(e.name, 0.0) + e.device_time / 1e3
    return {n: round(t, 3) for n, t in times.items()}


def main() -> None:
    configs = [tuple(int(x) for x in c.split(":")) for c in sys.argv[1].split(",")]
    q, k, v, sel, scale = nsa_selected_inputs(65536)
    f = lambda: m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton")  # noqa: E731
    caps, one_step = dict(bs.TILE_CAPS), bs.KEY_MAJOR_ONE_STEP
    rows = []
    with torch.no_grad():
        ref = f()
        for n_rows, block_n, warps, stages in configs:
            bs.TILE_CAPS[("fwd-tokens", False)] = (n_rows, block_n)
            bs.LAUNCH_OVERRIDES["fwd"] = {"num_warps": warps, "num_stages": stages}
            bs.KEY_MAJOR_ONE_STEP = 0
            try:
                out = f()
                r = dict(rows=n_rows, block_n=block_n, warps=warps, stages=stages, ms=round(median_ms(f, 5), 3),
                         kernels=kernel_ms(f), diff=(out.float() - ref.float()).abs().max().item())
            except Exception as e:  # a tile that does not fit: recorded, the sweep goes on
                r = dict(rows=n_rows, block_n=block_n, warps=warps, stages=stages, err=str(e)[:200])
            finally:
                bs.TILE_CAPS.clear()
                bs.TILE_CAPS.update(caps)
                bs.LAUNCH_OVERRIDES.clear()
                bs.KEY_MAJOR_ONE_STEP = one_step
            rows.append(r)
            print(json.dumps(r), flush=True)
    json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "nsa_selected_tiles.json"), "w"), indent=0)


if __name__ == "__main__":
    main()
