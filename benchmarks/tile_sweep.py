"""Sweep launch settings of the block-sparse kernels on one GPU shape and time each one.

For a method's selection at one size (default: top-k, 16 blocks of 128 keys, T = 64k, B = 1,
H = 32, Hkv = 8, D = 128, bf16), every configuration (row cap, key-tile cap, warps, stages) of
the forward, and of the backward (dQ and dK/dV kernels together), is compiled, checked against
the default configuration's output (a faster configuration that computes something else is
reported as failed), and timed (median of CUDA-event timings). One JSON line per configuration
goes to ``--out``; a table is printed at the end. Nothing here changes the defaults: the
numbers are what a choice of ``TILE_CAPS`` / ``LAUNCH_OVERRIDES`` in
``longattn.kernels.block_sparse`` rests on.

    python3 benchmarks/tile_sweep.py --out $OUT/tiles.jsonl --max-seconds 120
    python3 benchmarks/tile_sweep.py --phases fwd --configs "128,32,4,3;128,32,8,3" --out $OUT/t.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _timing import median_ms

FWD = [  # (max rows, max block_n, num_warps, num_stages)
    (128, 64, 8, 2), (128, 64, 4, 2), (128, 64, 8, 3), (128, 64, 4, 3),
    (128, 128, 8, 2), (128, 128, 8, 3), (64, 64, 4, 2), (64, 64, 4, 3),
    (64, 128, 4, 2), (256, 64, 8, 2), (128, 32, 4, 3), (64, 32, 4, 4),
]
BWD = [
    (64, 64, 8, 2), (64, 64, 4, 2), (64, 64, 8, 3), (64, 32, 4, 2),
    (32, 64, 4, 2), (32, 64, 4, 3), (64, 128, 8, 2), (128, 32, 8, 2),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tiles.jsonl")
    ap.add_argument("--T", type=int, default=65536)
    ap.add_argument("--method", default="topk")
    ap.add_argument("--hkv", type=int, default=8)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--max-seconds", type=float, default=150.0)
    ap.add_argument("--phases", default="fwd,bwd", help="which phases to sweep (fwd, bwd or both)")
    ap.add_argument("--configs", default=None,
                    help="replace the built-in lists: 'rows,block_n,warps,stages;...' (for every swept phase)")
    args = ap.parse_args()
    custom = ([tuple(int(x) for x in c.split(",")) for c in args.configs.split(";")] if args.configs else None)

    import longattn
    from longattn.kernels import block_sparse as bs

    t_start = time.time()
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    B, H, D = 1, 32, 128
    q = torch.randn(B, H, args.T, D, device=dev, dtype=torch.bfloat16, generator=g)
    k = torch.randn(B, args.hkv, args.T, D, device=dev, dtype=torch.bfloat16, generator=g)
    v = torch.randn(B, args.hkv, args.T, D, device=dev, dtype=torch.bfloat16, generator=g)
    spec = longattn.get_method(args.method)
    sel = spec.selector(q, k, True, spec.make_config())
    scale = D ** -0.5
    dout = torch.randn_like(q)
    default_caps = dict(bs.TILE_CAPS)

    def fwd():
        return bs.block_sparse_attention(q, k, v, sel, scale)

    def run_bwd(qq, kk, vv):
        out, _ = bs.block_sparse_attention(qq, kk, vv, sel, scale)
        return torch.autograd.grad(out, (qq, kk, vv), dout)

    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
    ref_out = fwd()[0].float()
    ref_grads = [x.float() for x in run_bwd(qg, kg, vg)]
    rows = []
    with open(args.out, "a") as fh:
        for phase, configs in (("fwd", custom or FWD), ("bwd", custom or BWD)):
            if phase not in args.phases.split(","):
                continue
            for rows_cap, bn_cap, warps, stages in configs:
                if time.time() - t_start > args.max_seconds:
                    print(f"budget reached; {phase} {rows_cap},{bn_cap},{warps},{stages} not run")
                    continue
                bs.TILE_CAPS.clear()
                bs.TILE_CAPS.update(default_caps)
                bs.TILE_CAPS[(phase, False)] = (rows_cap, bn_cap)
                if phase == "fwd":  # per-token selections run the key-major forward, under its own cap
                    bs.TILE_CAPS[("fwd-tokens", False)] = (rows_cap, bn_cap)
                bs.LAUNCH_OVERRIDES.clear()
                bs.LAUNCH_OVERRIDES[phase] = {"num_warps": warps, "num_stages": stages}
                rec = {"phase": phase, "T": args.T, "method": args.method, "Hkv": args.hkv,
                       "rows_cap": rows_cap, "block_n_cap": bn_cap, "num_warps": warps, "num_stages": stages}
                try:
                    t0 = time.time()
                    if phase == "fwd":
                        err = (fwd()[0].float() - ref_out).abs().max().item()
                        torch.cuda.synchronize()
                        rec["compile_s"] = time.time() - t0
                        rec["median_ms"] = median_ms(fwd, args.reps, warmup=False)
                    else:
                        grads = run_bwd(qg, kg, vg)
                        err = max((a.float() - b).abs().max().item() for a, b in zip(grads, ref_grads))
                        torch.cuda.synchronize()
                        rec["compile_s"] = time.time() - t0
                        # forward + backward minus the (default) forward
                        rec["median_ms"] = median_ms(lambda: run_bwd(qg, kg, vg), args.reps, warmup=False)
                    rec["max_abs_diff_vs_default"] = err
                    rec["status"] = "ok" if err < 0.05 else "mismatch"
                except Exception as exc:  # out of shared memory, compile errors: recorded, not fatal
                    rec["status"] = "error"
                    rec["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                fh.write(json.dumps(rec) + "\n")
                fh.flush()
                rows.append(rec)
                print(rec, flush=True)
    bs.TILE_CAPS.clear()
    bs.TILE_CAPS.update(default_caps)
    bs.LAUNCH_OVERRIDES.clear()
    print(f"\n{args.method} T={args.T} Hkv={args.hkv}: bwd rows are fwd+bwd ms (forward at its default)")
    print("phase rows  bn  warps stages   ms      status")
    for r in rows:
        ms = f"{r['median_ms']:8.3f}" if "median_ms" in r else "       -"
        print(f"{r['phase']:5} {r['rows_cap']:4} {r['block_n_cap']:4} {r['num_warps']:5} {r['num_stages']:6} {ms}  {r['status']}")


if __name__ == "__main__":
    main()
