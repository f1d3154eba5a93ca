"""Time each phase of NSA's forward (inference, backend "triton") and of one NSA decoding step on the GPU.

Prefill phases: compression (mean pooling), compressed branch kernel (output + LSE),
selection-score kernel (both also with the compressed tokens in bf16 when ``--cmp-dtypes``
names it), top-k selection (PyTorch, and the ranking kernel the inference path uses), selected
branch (block-sparse kernel over the per-token selection), window branch, gated sum; the whole
``longattn.attention(method="nsa")`` call; dense cuDNN SDPA.

Decoding (one query per sequence over a cache of T keys whose compressed tokens the cache keeps,
as a serving loop does): at B = 1, eager phase times -- ``longattn.decode_nsa.nsa_decode(
backend="triton")`` with ``validate=True`` (one host sync) and ``validate=False`` (none), the
split-K compressed-branch + block-score kernels, the ranking kernel, the selected + window
branches with the gated sum (``nsa_decode_branches``, two kernels) and dense SDPA decoding. Then,
for each ``--decode-batch`` size and each ``--cmp-dtypes`` dtype of the cached compressed tokens,
one step as CUDA-graph replays (``nsa_decode(..., validate=False)``, captured as
``benchmarks/suite.py`` captures its decode graphs, through ``_timing.graph_median_ms``: two
warm-up calls on a side stream, one capture, replays; L2 flushed before each replay, outside the
timed region, since a real model runs other layers between two steps of one layer) against
dense SDPA decoding over the same caches, with the bytes each must read.

Eager timings: median of CUDA-event timings (``_timing.median_ms``). One JSON object to
``--out`` and a table on stdout (the decode rows last).

    python3 benchmarks/nsa_phases.py --T 65536 --out $OUT/nsa_phases.json
    python3 benchmarks/nsa_phases.py --T 65536 --decode-only --decode-batch 1,4,16,32 --out $OUT/nsa_decode.json

CPU smoke run of every code path (tiny shapes, the Triton kernels through the interpreter,
wall-clock timings, no CUDA graphs):

    python3 benchmarks/nsa_phases.py --smoke --decode-only --out /tmp/nsa_phases.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

L2_FLUSH_BYTES = 256 << 20  # larger than an H200's 50 MiB L2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=None, help="cached keys / prefill length (default 65536; --smoke: 256)")
    ap.add_argument("--hkv", type=int, default=None, help="KV heads (default 8; --smoke: 2)")
    ap.add_argument("--reps", type=int, default=5, help="eager timings per phase (median)")
    ap.add_argument("--graph-reps", type=int, default=50, help="CUDA-graph replays per decode step (median)")
    ap.add_argument("--decode-only", action="store_true", help="time the decoding step only (no prefill phases)")
    ap.add_argument("--decode-batch", default="1,4,16", help="batch sizes of the CUDA-graph decoding steps")
    ap.add_argument("--cmp-dtypes", default="fp32,bf16", help="dtypes of the cached compressed tokens (fp32, bf16)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU check of the code paths: H=4, D=64, the Triton interpreter, wall-clock, no graphs")
    ap.add_argument("--out", default="nsa_phases.json")
    args = ap.parse_args(argv)
    if args.T is None:
        args.T = 256 if args.smoke else 65536
    if args.hkv is None:
        args.hkv = 2 if args.smoke else 8
    if args.T < 1 or args.hkv < 1 or args.reps < 1 or args.graph_reps < 1:
        ap.error("--T, --hkv, --reps and --graph-reps must be >= 1")
    try:
        args.decode_batch = [int(x) for x in args.decode_batch.split(",")]
    except ValueError:
        ap.error(f"--decode-batch must be comma-separated integers, got {args.decode_batch!r}")
    if not args.decode_batch or min(args.decode_batch) < 1:
        ap.error("--decode-batch sizes must be >= 1")
    args.cmp_dtypes = args.cmp_dtypes.split(",")
    if not args.cmp_dtypes or not set(args.cmp_dtypes) <= {"fp32", "bf16"}:
        ap.error(f"--cmp-dtypes must name fp32 and/or bf16, got {','.join(args.cmp_dtypes)!r}")
    return args


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def wall_ms(fn, reps: int) -> float:
    """Median wall-clock milliseconds of ``reps`` calls (the CPU smoke run; one untimed call first)."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def prefill_phases(q, k, v, cfg, scale, timer, cmp_dtypes=("fp32",)) -> dict[str, float]:
    import longattn
    from longattn.kernels.nsa import compressed_attention, select_blocks, selection_scores
    from longattn.methods import nsa as m

    T, H = q.shape[2], q.shape[1]
    l, d = cfg.compress_block, cfg.compress_stride
    res: dict[str, float] = {}
    k_cmp, v_cmp = m.nsa_compress(k, v, cfg)
    res["compress"] = timer(lambda: m.nsa_compress(k, v, cfg))
    o_cmp, lse = compressed_attention(q, k_cmp, v_cmp, kv_len=T, compress_block=l, compress_stride=d, scale=scale)
    res["compressed_branch_kernel"] = timer(lambda: compressed_attention(
        q, k_cmp, v_cmp, kv_len=T, compress_block=l, compress_stride=d, scale=scale))
    p = selection_scores(q, k_cmp, lse, kv_len=T, compress_block=l, compress_stride=d,
                         select_block=cfg.select_block, scale=scale)
    res["selection_scores_kernel"] = timer(lambda: selection_scores(
        q, k_cmp, lse, kv_len=T, compress_block=l, compress_stride=d, select_block=cfg.select_block, scale=scale))
    sel = m.select_from_scores(p, cfg, kv_len=T, num_heads=H)
    if "bf16" in cmp_dtypes:  # compressed tokens held in the queries' 16-bit dtype (one native dot)
        kb, vb = k_cmp.to(q.dtype), v_cmp.to(q.dtype)
        _, lse_b = compressed_attention(q, kb, vb, kv_len=T, compress_block=l, compress_stride=d, scale=scale)
        res["compressed_branch_kernel_bf16"] = timer(lambda: compressed_attention(
            q, kb, vb, kv_len=T, compress_block=l, compress_stride=d, scale=scale))
        res["selection_scores_kernel_bf16"] = timer(lambda: selection_scores(
            q, kb, lse_b, kv_len=T, compress_block=l, compress_stride=d, select_block=cfg.select_block, scale=scale))
    res["topk_selection_host"] = timer(lambda: m.select_from_scores(p, cfg, kv_len=T, num_heads=H))
    res["topk_selection_kernel"] = timer(lambda: select_blocks(
        p, kv_len=T, select_block=cfg.select_block, num_selected=cfg.num_selected,
        num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks))
    res["selected_branch"] = timer(lambda: m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton"))
    res["window_branch"] = timer(lambda: m.nsa_window_branch(q, k, v, cfg, scale=scale, backend="triton"))
    o_slc = m.nsa_selected_branch(q, k, v, sel, scale=scale, backend="triton")
    o_win = m.nsa_window_branch(q, k, v, cfg, scale=scale, backend="triton")
    res["combine"] = timer(lambda: m.nsa_combine(o_cmp, o_slc, o_win, cfg.gates))
    res["whole_call"] = timer(lambda: longattn.attention(q, k, v, method="nsa", backend="triton"))
    res["sdpa_cudnn_dense"] = timer(lambda: torch.nn.functional.scaled_dot_product_attention(
        q, k, v, is_causal=True, enable_gqa=True))
    return res


def decode_phases(q1, k, v, cfg, scale, timer) -> dict[str, float]:
    """Eager phase times of one decoding step (B = 1) over the T cached keys (the compressed
    tokens kept by the cache, as a serving loop would): the whole step with and without the
    host sync, the split-K compressed-branch + block-score kernels, the ranking kernel, the
    selected + window branches with the gated sum (two kernels), and dense SDPA decoding."""
    from longattn import decode_nsa as dn
    from longattn.kernels.nsa import select_blocks
    from longattn.kernels.nsa.decode import nsa_decode_compressed
    from longattn.kernels.nsa.decode_branches import nsa_decode_branches

    T = k.shape[2]
    lens = torch.full((q1.shape[0],), T, dtype=torch.int32, device=q1.device)
    kc, vc = dn.nsa_decode_compress(k, v, lens, cfg)
    n_blocks = -(-T // cfg.select_block)
    step = lambda validate: dn.nsa_decode(q1, k, v, lens, config=cfg, k_cmp=kc, v_cmp=vc, scale=scale,  # noqa: E731
                                          backend="triton", validate=validate)
    res: dict[str, float] = {}
    res["decode_step_nsa"] = timer(lambda: step(True))
    res["decode_step_nsa_nosync"] = timer(lambda: step(False))
    kw = dict(compress_block=cfg.compress_block, compress_stride=cfg.compress_stride, select_block=cfg.select_block,
              num_blocks=n_blocks, scale=scale)
    o_cmp, _, p_slc = nsa_decode_compressed(q1, kc, vc, lens, **kw)
    res["decode_cmp_and_scores_kernels"] = timer(lambda: nsa_decode_compressed(q1, kc, vc, lens, **kw))
    rank_kw = dict(kv_len=T, kv_lens=lens, select_block=cfg.select_block, num_selected=cfg.num_selected,
                   num_init_blocks=cfg.num_init_blocks, num_local_blocks=cfg.num_local_blocks)
    idx, cnt, _ = select_blocks(p_slc, **rank_kw)
    res["decode_rank_kernel"] = timer(lambda: select_blocks(p_slc, **rank_kw))
    res["decode_branches_kernels"] = timer(lambda: nsa_decode_branches(
        q1, k, v, lens, idx, cnt, o_cmp, select_block=cfg.select_block, window=cfg.window, gates=cfg.gates,
        scale=scale))
    res["decode_step_sdpa_dense"] = timer(lambda: torch.nn.functional.scaled_dot_product_attention(
        q1, k, v, enable_gqa=True, scale=scale))
    return res


def decode_bytes(B: int, T: int, Hkv: int, D: int, cfg, cmp_bytes: int) -> dict[str, int]:
    """Bytes one step must read (every sequence holds T keys): dense reads the whole bf16 cache;
    NSA the visible compressed keys and values (``cmp_bytes`` per element) plus the selected blocks
    and the window of the cache (overlaps counted twice, as the two branches read them)."""
    n_vis = max(0, (T - cfg.compress_block) // cfg.compress_stride + 1)
    dense = B * Hkv * T * D * 2 * 2
    nsa = B * Hkv * D * (2 * n_vis * cmp_bytes + 2 * 2 * (cfg.num_selected * cfg.select_block + cfg.window))
    return {"dense_bytes": dense, "nsa_bytes": nsa}


def decode_graphs(H, D, T, Hkv, batches, cmp_dtypes, cfg, scale, graph, dev, seed=1) -> list[dict]:
    """One decoding step per batch size and compressed-token dtype as CUDA-graph replays (cold L2),
    against dense SDPA decoding over the same caches (one query per sequence, every sequence at
    T keys). fp32 compressed tokens are what the mean compression gives; bf16 ones are what a
    cache kept in the model's dtype holds (the paper's setting: its 11.6x counts tokens alike)."""
    from longattn import decode_nsa as dn

    rows = []
    g = torch.Generator(device=dev).manual_seed(seed)
    for B in batches:
        q1 = torch.randn(B, H, 1, D, device=dev, dtype=torch.bfloat16, generator=g)
        k = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, Hkv, T, D, device=dev, dtype=torch.bfloat16, generator=g)
        lens = torch.full((B,), T, dtype=torch.int32, device=dev)
        kc32, vc32 = dn.nsa_decode_compress(k, v, lens, cfg)
        dense = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            q1, k, v, enable_gqa=True, scale=scale)
        rec = {"B": B, "T": T}
        try:
            rec["dense_graph_ms"] = graph(dense)
        except Exception as exc:  # noqa: BLE001 - a failed capture is a result too
            rec["dense_error"] = f"{type(exc).__name__}: {exc}"[:300]
        for name in cmp_dtypes:
            dt = {"fp32": torch.float32, "bf16": torch.bfloat16}[name]
            kc, vc = kc32.to(dt), vc32.to(dt)
            step = lambda: dn.nsa_decode(q1, k, v, lens, config=cfg, k_cmp=kc, v_cmp=vc, scale=scale,  # noqa: E731
                                         backend="triton", validate=False)
            row = dict(rec, cmp_dtype=name, **decode_bytes(B, T, Hkv, D, cfg, kc.element_size()))
            try:
                row["nsa_graph_ms"] = graph(step)
            except Exception as exc:  # noqa: BLE001
                row["nsa_error"] = f"{type(exc).__name__}: {exc}"[:300]
                torch.cuda.synchronize()
            if "nsa_graph_ms" in row and "dense_graph_ms" in row:
                row["speedup"] = row["dense_graph_ms"] / row["nsa_graph_ms"]
                row["bytes_ratio"] = row["dense_bytes"] / row["nsa_bytes"]
            rows.append(row)
            print("  decode graph " + json.dumps(row), flush=True)
            del kc, vc
        del q1, k, v, kc32, vc32
        torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
    import longattn
    from _inputs import prefill_qkv

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        raise SystemExit("nsa_phases.py times GPU kernels: run it on a CUDA machine, or pass --smoke for a CPU check")
    dev = torch.device("cuda" if cuda else "cpu")
    H, D, T = (32 if cuda else 4), 128 if cuda else 64, args.T
    q, k, v = prefill_qkv(T, H, args.hkv, D, device=str(dev))
    cfg = longattn.get_method("nsa").make_config()
    scale = D ** -0.5
    if cuda:
        from _timing import graph_median_ms, median_ms

        timer = lambda fn: median_ms(fn, args.reps)  # noqa: E731
        flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device=dev)
        graph = lambda fn: graph_median_ms(fn, args.graph_reps, flush)  # noqa: E731
    else:
        timer = lambda fn: wall_ms(fn, 1)  # noqa: E731
        graph = None
    res: dict[str, float] = {}
    with torch.no_grad():
        if not args.decode_only:
            res.update(prefill_phases(q, k, v, cfg, scale, timer, args.cmp_dtypes))
        res.update(decode_phases(q[:, :, -1:].contiguous(), k, v, cfg, scale, timer))
        info: dict = {"decode_kv_len": T}
        if graph is not None:
            del q, k, v
            torch.cuda.empty_cache()
            info["decode_graphs"] = decode_graphs(H, D, T, args.hkv, args.decode_batch, args.cmp_dtypes, cfg, scale,
                                                  graph, dev)
        else:
            info["graphs"] = "not timed (no CUDA device)"
    rec = {"T": T, "H": H, "Hkv": args.hkv, "D": D, "dtype": "bfloat16", "config": str(cfg),
           "gpu": torch.cuda.get_device_name() if cuda else "cpu (smoke: Triton interpreter, wall clock)",
           "torch": torch.__version__, "triton": _triton_version(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "median_ms": res, **info}
    with open(args.out, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(f"NSA phases, T={T} H={H} Hkv={args.hkv} D={D} bf16 ({rec['gpu']})")
    for name, ms in res.items():
        print(f"  {name:32s} {ms:9.3f} ms")
    for key, msg in info.items():
        if key.endswith("_error"):
            print(f"  {key}: {msg}")
    if info.get("decode_graphs"):
        print(f"decode step at T={T} under CUDA graphs (cold L2): B, compressed dtype, NSA ms, dense ms, speed-up, "
              "bytes ratio")
        for r in info["decode_graphs"]:
            print(f"  {r['B']:3d} {r['cmp_dtype']:5s} {r.get('nsa_graph_ms', float('nan')):8.4f} "
                  f"{r.get('dense_graph_ms', float('nan')):8.4f} {r.get('speedup', float('nan')):6.2f}x "
                  f"{r.get('bytes_ratio', float('nan')):6.2f}x")


if __name__ == "__main__":
    main()
