"""GPU check and timing of the FlexAttention paths against dense SDPA, in one process.

    python benchmarks/flex_gpu.py --out $OUT [--lengths 32768,65536] [--check-len 4096]

1. Correctness at ``--check-len`` (B=1, H=32, Hkv=8, D=128, bf16): each method's ``flex`` path
   against the fp32 reference, forward and backward, with the DESIGN.md tolerance (twice the
   error of the reference's math run in bf16, plus a floor).
2. Timing at each of ``--lengths``: SDPA cuDNN and FlashAttention (dense causal), and every
   listed method through ``longattn.attention(..., backend="flex")`` end to end (selection +
   attention) and kernel only (FlexAttention with the BlockMask built once), forward and
   forward+backward, with peak memory. The compiled path is enforced: a recompile-limit hit
   raises instead of running the dense eager fallback, and peak memory is checked to stay far
   below one ``T x T`` score matrix.

Results are appended to ``$OUT/flex_gpu.jsonl`` as each case finishes (a crash loses nothing);
a markdown table is written to ``$OUT/flex_gpu.md`` and printed last.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import longattn  # noqa: E402
from longattn.api import validate_inputs  # noqa: E402
from longattn.backends import flex_call, plain_precision  # noqa: E402

H, HKV, D = 32, 8, 128

# name -> (method, config); paper defaults unless the label says otherwise
CASES = {
    "moba (paper: block 512, top-3, per-token gate)": ("moba", {}),
    "moba (block 512, top-3, gate per 128 queries)": ("moba", {"gate_block": 128}),
    "nsa (paper defaults)": ("nsa", {}),
    "topk (top-16 of 128-token blocks)": ("topk", {"block_size": 128, "top_k": 16}),
    "topk GQA-shared (top-16 of 128)": ("topk", {"block_size": 128, "top_k": 16, "shared_kv_heads": True}),
    "window 4096": ("window", {"window": 4096}),
}
CHECK_METHODS = ["moba", "nsa", "topk", "window", "sink", "bigbird", "full"]


def env_info() -> dict:
    import triton

    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:  # the device copy of the tree may lack git objects: pass it in
        commit = os.environ.get("LONGATTN_COMMIT", "unknown")
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": commit,
        "command": " ".join(sys.argv),
    }


def inputs(T: int, dtype=torch.bfloat16, seed=0, requires_grad=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, H, T, D, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(1, HKV, T, D, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(1, HKV, T, D, device="cuda", dtype=dtype, generator=g)
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def bench(fn, warmup=3, rep=10) -> float:
    """Median milliseconds over ``rep`` timed runs (CUDA events), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(rep):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def peak_of(fn) -> int:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def max_err(a, b) -> float:
    return (a.double() - b.double()).abs().max().item()


def check(T: int, log, wanted=None) -> None:
    for name in CHECK_METHODS:
        if name not in longattn.list_methods() or (wanted is not None and name not in wanted):
            continue
        spec = longattn.get_method(name)
        config = {"nsa": {"num_selected": 8}, "moba": {"block_size": 256}}.get(name, {})
        row = {"kind": "check", "method": name, "config": config, "T": T}
        try:
            q, k, v = inputs(T, requires_grad=True, seed=1)
            g = torch.randn_like(q)

            def run(qq, kk, vv, backend):
                out = longattn.attention(qq, kk, vv, method=name, backend=backend, **config)
                return (out, *torch.autograd.grad(out, (qq, kk, vv), g.to(out.dtype)))

            q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
            ref = run(q32, k32, v32, "reference")
            with plain_precision():
                plain = run(q, k, v, "reference")
            torch.cuda.empty_cache()
            junk = torch.full((1 << 28,), float("nan"), device="cuda")  # poison the allocator
            del junk
            fast = run(q, k, v, "flex")
            for label, f, p, r in zip(("out", "dq", "dk", "dv"), fast, plain, ref):
                err, perr = max_err(f, r), max_err(p, r)
                bound = 2 * perr + 2e-3 * max(1.0, r.abs().max().item())
                row[label] = {"err": err, "plain_err": perr, "bound": bound, "finite": bool(torch.isfinite(f).all())}
            row["ok"] = all(row[x]["err"] <= row[x]["bound"] and row[x]["finite"] for x in ("out", "dq", "dk", "dv"))
        except Exception as exc:  # record and continue: one failure must not lose the rest
            row["ok"] = False
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        log(row)
        torch.cuda.empty_cache()


def time_dense(T: int, log) -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = inputs(T)
    # dense baselines run MHA-expanded K/V (as in BASELINE.md); expansion is outside the timing
    ke, ve = k.repeat_interleave(H // HKV, 1), v.repeat_interleave(H // HKV, 1)
    for label, be in (("SDPA cuDNN", SDPBackend.CUDNN_ATTENTION), ("SDPA FlashAttention-2", SDPBackend.FLASH_ATTENTION)):
        row = {"kind": "time", "case": label, "method": "full", "T": T}
        try:
            with sdpa_kernel([be]):
                fwd = lambda: F.scaled_dot_product_attention(q, ke, ve, is_causal=True)
                row["fwd_ms"] = bench(fwd)
                row["fwd_peak_bytes"] = peak_of(fwd)
                qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, ke, ve))
                dout = torch.randn_like(q)

                def fwdbwd():
                    o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=True)
                    torch.autograd.grad(o, (qg, kg, vg), dout)

                row["fwdbwd_ms"] = bench(fwdbwd)
                row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
            flops = 4 * T * T * D * H / 2  # causal: half of 2 matmuls of 2*T*T*D
            row["fwd_tflops"] = flops / row["fwd_ms"] / 1e9
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
            traceback.print_exc()
        log(row)
    del q, k, v, ke, ve
    torch.cuda.empty_cache()


def time_method(T: int, label: str, name: str, config: dict, log) -> None:
    spec = longattn.get_method(name)
    row = {"kind": "time", "case": label, "method": name, "config": config, "T": T}
    try:
        q, k, v = inputs(T)
        cfg = spec.make_config(**config)
        call = lambda: longattn.attention(q, k, v, method=name, backend="flex", **config)
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        row["first_call_s"] = time.perf_counter() - t0  # includes compilation
        row["fwd_ms"] = bench(call)
        row["fwd_peak_bytes"] = peak_of(call)
        if spec.density is not None:
            row["density"] = spec.density(q, k, True, cfg)
        if spec.selector is not None:
            sel = spec.selector(q, k, True, cfg)
            bm = sel.to_block_mask()
            scale = 1 / math.sqrt(D)
            row["kernel_fwd_ms"] = bench(lambda: flex_call(q, k, v, bm, scale))
            row["select_ms"] = bench(lambda: spec.selector(q, k, True, cfg).to_block_mask())
        qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))
        dout = torch.randn_like(q)

        def fwdbwd():
            o = longattn.attention(qg, kg, vg, method=name, backend="flex", **config)
            torch.autograd.grad(o, (qg, kg, vg), dout)

        row["fwdbwd_ms"] = bench(fwdbwd, warmup=2, rep=5)
        row["bwd_ms"] = row["fwdbwd_ms"] - row["fwd_ms"]
        row["fwdbwd_peak_bytes"] = peak_of(fwdbwd)
        dense_scores = T * T * H * 2
        row["no_dense_fallback"] = row["fwdbwd_peak_bytes"] < dense_scores / 4
    except Exception as exc:
        row["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        traceback.print_exc()
    log(row)
    torch.cuda.empty_cache()


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        f"GPU {info['gpu']}, torch {info['torch']}, triton {info['triton']}, CUDA {info['cuda']}, "
        f"commit {info['commit']}, {info['date']}. Command: `{info['command']}`.",
        "",
        "Correctness (bf16 flex path vs fp32 reference; bound = 2 x bf16-plain error + floor):",
        "",
        "| method | T | out err / bound | dq err / bound | dk err / bound | dv err / bound | ok |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["kind"] != "check":
            continue
        if "error" in r:
            lines.append(f"| {r['method']} | {r['T']} | error: {r['error'][:120]} | | | | no |")
            continue
        cells = [f"{r[x]['err']:.2e} / {r[x]['bound']:.2e}" for x in ("out", "dq", "dk", "dv")]
        lines.append(f"| {r['method']} | {r['T']} | " + " | ".join(cells) + f" | {'yes' if r['ok'] else 'NO'} |")
    lines += [
        "",
        "Timing (B=1, H=32, Hkv=8, D=128, bf16, causal; median ms; speed-up = cuDNN fwd / method fwd):",
        "",
        "| case | T | density | fwd ms (end to end) | kernel-only fwd ms | selection ms | fwd+bwd ms | bwd ms | speed-up vs cuDNN fwd | peak fwd+bwd GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    cudnn = {r["T"]: r.get("fwd_ms") for r in rows if r.get("case") == "SDPA cuDNN"}
    fmt = lambda x, p=2: "-" if x is None else f"{x:.{p}f}"
    for r in rows:
        if r["kind"] != "time":
            continue
        if "error" in r:
            lines.append(f"| {r['case']} | {r['T']} | error: {r['error'][:150]} | | | | | | | |")
            continue
        base = cudnn.get(r["T"])
        speed = base / r["fwd_ms"] if base and r.get("fwd_ms") else None
        peak = r.get("fwdbwd_peak_bytes", r.get("fwd_peak_bytes"))
        lines.append(
            f"| {r['case']} | {r['T']} | {fmt(r.get('density'), 3)} | {fmt(r.get('fwd_ms'))} | "
            f"{fmt(r.get('kernel_fwd_ms'))} | {fmt(r.get('select_ms'))} | {fmt(r.get('fwdbwd_ms'))} | "
            f"{fmt(r.get('bwd_ms'))} | {fmt(speed)} | {fmt(None if peak is None else peak / 2**30)} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--lengths", default="32768,65536")
    ap.add_argument("--check-len", type=int, default=4096)
    ap.add_argument("--cases", default="all", help="comma-separated case labels' methods, or all")
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    info = env_info()
    path = os.path.join(args.out, "flex_gpu.jsonl")
    rows: list[dict] = []

    def log(row: dict) -> None:
        row = {**row, "env": info}
        rows.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
        brief = {k: v for k, v in row.items() if k not in ("env", "config")}
        print(json.dumps(brief)[:400], flush=True)

    print(json.dumps(info), flush=True)
    wanted = None if args.cases == "all" else set(args.cases.split(","))
    if args.check_len:
        check(args.check_len, log, wanted)
    for T in [int(x) for x in args.lengths.split(",") if x]:
        time_dense(T, log)
        for label, (name, config) in CASES.items():
            if name in longattn.list_methods() and (wanted is None or name in wanted):
                time_method(T, label, name, config, log)
    md = markdown(rows, info)
    with open(os.path.join(args.out, "flex_gpu.md"), "w") as f:
        f.write(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
