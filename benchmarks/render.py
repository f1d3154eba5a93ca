"""Render the benchmark suite's JSON lines into docs: a generated section of
``docs/benchmarks.md`` (between ``<!-- suite:begin -->`` and ``<!-- suite:end -->``; the rest
of the file is left alone) and ``docs/benchmarks.json`` (one record per case).

    python benchmarks/render.py --in suite.jsonl [--md docs/benchmarks.md] [--json docs/benchmarks.json]

Pure Python (no torch): the suite (``benchmarks/suite.py``) imports its loaders and its
speed-up lookup, and the tests run it on the CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Iterable

BEGIN = "<!-- suite:begin -->"
END = "<!-- suite:end -->"
FINAL = ("ok", "skipped", "failed")
TIMED_OPS = ("fwd", "bwd", "decode")
GATE_OPS = ("gate-fwd", "gate-bwd", "gate-decode")
METHOD_ORDER = ["full", "topk", "topk-shared", "nsa", "nsa-bf16", "moba-g128", "moba", "window", "quest"]
BACKEND_ORDER = ["ours", "flex", "sdpa-cudnn", "sdpa-flash", "dense-mask", "reference"]
PART_ORDER = ["", "select", "attend", "both", "summary"]
ENV_KEYS = ("command", "gpu", "torch", "triton", "cuda", "cudnn", "python", "date", "commit", "dirty", "device")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------- loading
def load_jsonl(path: str) -> list[dict]:
    """Every parsable JSON object of ``path`` in file order. A line cut short by a killed run
    (no newline, invalid JSON) is ignored, never fatal."""
    rows: list[dict] = []
    if not os.path.exists(path):
        return rows
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def latest_by_case(rows: Iterable[dict]) -> dict[str, dict]:
    """``case_id -> last line written for it`` (a ``started`` marker, or a final record)."""
    out: dict[str, dict] = {}
    for r in rows:
        cid = r.get("case_id")
        if cid:
            out[cid] = r
    return out


def final_records(rows: Iterable[dict]) -> list[dict]:
    """The latest final record (ok / skipped / failed) of every case, in first-seen order."""
    latest = latest_by_case(rows)
    return [r for r in latest.values() if r.get("status") in FINAL]


def runs_of(rows: Iterable[dict]) -> dict[str, dict]:
    """``run_id -> {env..., ceilings}`` from the ``ceiling`` records (one per run)."""
    runs: dict[str, dict] = {}
    for r in rows:
        if r.get("op") == "ceiling" and r.get("run_id"):
            runs[r["run_id"]] = {**{k: (r.get("env") or {}).get(k) for k in ENV_KEYS}, "ceilings": r.get("ceilings")}
    return runs


# ---------------------------------------------------------------------- comparisons
def shape_key(r: dict) -> tuple:
    """Cases that compare with each other: same op, sizes, dtype (and decode lengths)."""
    return (r.get("op"), r.get("T"), r.get("B"), r.get("H"), r.get("Hkv"), r.get("D"), r.get("dtype"),
            tuple(r.get("lengths") or ()))


def dense_times(records: Iterable[dict]) -> dict[tuple, dict[str, float]]:
    """``shape_key -> {backend: median_ms}`` of the dense (``full``) ok records."""
    out: dict[tuple, dict[str, float]] = {}
    for r in records:
        if r.get("method") == "full" and r.get("status") == "ok" and r.get("median_ms"):
            out.setdefault(shape_key(r), {})[r["backend"]] = r["median_ms"]
    return out


def speedups(r: dict, dense: dict[tuple, dict[str, float]]) -> tuple[float | None, float | None]:
    """(cuDNN dense median / this median, best dense median / this median)."""
    ms = r.get("median_ms")
    if not ms or r.get("status") != "ok":
        return None, None
    d = dense.get(shape_key(r), {})
    cudnn = d.get("sdpa-cudnn")
    best = min((v for k, v in d.items() if k.startswith("sdpa")), default=None)
    return (cudnn / ms if cudnn else None), (best / ms if best else None)


def sort_key(r: dict) -> tuple:
    def pos(seq, x):
        return seq.index(x) if x in seq else len(seq)

    return (
        pos(list(TIMED_OPS) + list(GATE_OPS), r.get("op")),
        r.get("T") or 0,
        r.get("B") or 0,
        r.get("Hkv") or 0,
        pos(METHOD_ORDER, r.get("method")),
        pos(PART_ORDER, r.get("part", "")),
        pos(BACKEND_ORDER, r.get("backend")),
    )


# ---------------------------------------------------------------------- formatting
def fmt(x, spec: str = ".3g") -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "NO"
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def size_label(t: int | None) -> str:
    if t is None:
        return "-"
    return f"{t // 1024}k" if t >= 1024 and t % 1024 == 0 else str(t)


def config_label(cfg, method: str | None = None) -> str:
    if method == "full":
        return "dense causal"
    if not cfg:
        return "paper defaults"
    return ", ".join(f"{k}={v}" for k, v in cfg.items())


TIMED_COLUMNS = [
    "method", "config", "T", "B", "H", "Hkv", "D", "dtype", "backend", "keys/query", "median ms", "TFLOP/s",
    "GB moved", "peak GiB", "vs cuDNN", "vs best dense", "floor ms", "x floor", "gate",
]
EXTRA_COLUMNS = {  # per op: (header, field)
    "fwd": [("kernel-only ms", "kernel_ms"), ("selection ms", "select_ms")],
    "bwd": [],
    "decode": [("graph ms", "graph_ms")],
}


def timed_row(r: dict, dense, extra=()) -> list[str]:
    s_cudnn, s_best = speedups(r, dense)
    method = r.get("method", "")
    if r.get("part"):
        method = f"{method}: {r['part']}"
    T = size_label(r.get("T"))
    lengths = r.get("lengths") or []
    if len(lengths) > 1 and len(set(lengths)) == 1:
        T = f"{T} each"
    elif len(lengths) > 1:
        T = T + " (" + "/".join(size_label(x) for x in lengths) + ")"
    gate = r.get("gate_ok")
    return [
        method,
        config_label(r.get("config"), r.get("method")),
        T,
        fmt(r.get("B")),
        fmt(r.get("H")),
        fmt(r.get("Hkv")),
        fmt(r.get("D")),
        fmt(r.get("dtype")),
        fmt(r.get("backend")) + (" (KV expanded)" if r.get("kv_layout") == "expanded" else ""),
        fmt(None if r.get("keys_per_query") is None else float(r["keys_per_query"]), ".4g"),
        fmt(r.get("median_ms"), ".4g"),
        fmt(r.get("tflops"), ".3g"),
        fmt(None if r.get("bytes") is None else r["bytes"] / 1e9, ".3g"),
        fmt(None if r.get("peak_bytes") is None else r["peak_bytes"] / 2**30, ".3g"),
        fmt(s_cudnn, ".3g"),
        fmt(s_best, ".3g"),
        fmt(r.get("floor_ms"), ".3g"),
        fmt(r.get("x_floor"), ".3g"),
        "-" if gate is None else ("pass" if gate else "FAIL"),
    ] + [fmt(r.get(field), ".4g") for _, field in extra]


def md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    esc = lambda c: str(c).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return lines


OP_TITLES = {
    "fwd": "Prefill forward",
    "bwd": "Prefill backward (backward alone: one forward with grad, then timed autograd.grad with retain_graph)",
    "decode": "Decoding (one query token per sequence over a KV cache of T tokens)",
}


def render_markdown(rows: list[dict]) -> str:
    """The generated section (without markers) for all records of ``rows``."""
    records = sorted(final_records(rows), key=sort_key)
    used = {r.get("run_id") for r in records}
    runs = {k: v for k, v in runs_of(rows).items() if k in used}
    dense = dense_times(records)
    gate_lengths = sorted({r.get("T") for r in records if r.get("op") in GATE_OPS and r.get("T")})
    out = [
        "## Benchmark suite",
        "",
        "_Generated by `benchmarks/render.py` from the JSON lines of `benchmarks/suite.py`; do not edit "
        "by hand (re-run the renderer)._",
        "",
        "Runs (each one process on one device; every timed path was first checked against the fp32 "
        f"reference at T={'/'.join(str(t) for t in gate_lengths) or '-'}: the gates table below):",
        "",
    ]
    for run_id, env in runs.items():
        c = env.get("ceilings") or {}
        mm = c.get("matmul_flops_per_s")
        bw = c.get("copy_bytes_per_s")
        out.append(
            f"- run `{run_id}`: {env.get('gpu')}; torch {env.get('torch')}, triton {env.get('triton')}, "
            f"CUDA {env.get('cuda')}, cuDNN {env.get('cudnn')}, Python {env.get('python')}; commit "
            f"`{env.get('commit')}`{' (with uncommitted changes)' if env.get('dirty') else ''}; "
            f"{env.get('date')}. Ceilings measured in the run: bf16 matmul "
            f"{fmt(None if mm is None else mm / 1e12, '.3g')} TFLOP/s ({c.get('matmul_desc', '-')}), "
            f"device copy {fmt(None if bw is None else bw / 1e12, '.3g')} TB/s read+write. "
            f"Command: `{env.get('command')}`"
        )
    out += [
        "",
        "How to read: *median ms* of n timed runs (CUDA events, L2 flushed before each, after "
        "warm-up and compilation); *TFLOP/s* = FLOPs / median, FLOPs = 4·B·H·D·(keys read per query, "
        "summed over queries) = density × causal dense for prefill, 2.5× that for backward; *GB moved* "
        "is a floor estimate (dense: Q, K, V, O once; sparse: Q, O once and the selected K/V blocks "
        "once per 128-query tile and selection head; decode: the K/V bytes actually read); *floor ms* = "
        "max(FLOPs / matmul rate, bytes / copy bandwidth) with the ceilings above; *x floor* = median / "
        "floor; *keys/query*: mean keys each query reads (density x causal mean for prefill); "
        "*kernel-only ms*: the attention kernel with the selection built once; *selection ms*: the selector "
        "alone; *graph ms*: the same call replayed as a CUDA graph; *vs cuDNN* = SDPA cuDNN dense median of the same op and shape / this median (*vs best "
        "dense*: the faster of cuDNN and FlashAttention). *(KV expanded)*: the SDPA back end did not take "
        "GQA natively, so K/V were expanded to H heads outside the timing.",
        "",
    ]
    for op in TIMED_OPS:
        recs = [r for r in records if r.get("op") == op and r.get("status") == "ok"]
        if not recs:
            continue
        out += [f"### {OP_TITLES[op]}", ""]
        extra = EXTRA_COLUMNS[op]
        out += md_table(TIMED_COLUMNS + [h for h, _ in extra], [timed_row(r, dense, extra) for r in recs])
        notes = sorted({r["notes"] for r in recs if r.get("notes")})
        sparse = [r for r in recs if r.get("method") != "full" and r.get("tt_check_ok") is not None]
        high = [r for r in sparse if not r["tt_check_ok"]]
        if sparse and not high:
            notes.append("Every sparse path allocated less than 1/8 of one T x T score matrix during the call "
                         "(B*H*T*T bf16): no dense fallback.")
        for r in high:
            notes.append(f"MEMORY ABOVE T x T / 8: {r['method']} {r['backend']} T={r['T']} Hkv={r['Hkv']} allocated "
                         f"{r['peak_extra_bytes'] / 2**30:.2f} GiB during the call (one T x T score matrix: "
                         f"{r['tt_bytes'] / 2**30:.0f} GiB).")
        fails = [r for r in recs if r.get("kernel_error")]
        for r in fails[:5]:
            notes.append(f"kernel-only timing of {r['method']} {r['backend']} T={r['T']} failed: {r['kernel_error'][:120]}.")
        if notes:
            out += ["", "Notes: " + " ".join(notes)]
        out.append("")
    gates = [r for r in records if r.get("op") in GATE_OPS]
    if gates:
        out += ["### Correctness gates (bf16 path vs fp32 reference; bound = 2 x plain-bf16 error + floor)", ""]
        rows_g = []
        for r in gates:
            errs = r.get("errors") or {}
            cell = lambda k: (
                "-" if k not in errs else f"{errs[k]['err']:.2e} / {errs[k]['bound']:.2e}"
            )
            rows_g.append([
                r.get("op"), r.get("method"), r.get("backend"), fmt(r.get("T")), fmt(r.get("B")),
                fmt(r.get("Hkv")), cell("out"), cell("dq"), cell("dk"), cell("dv"),
                "pass" if r.get("ok") else ("FAIL" if r.get("status") == "ok" else r.get("status")),
                (r.get("reason") or "")[:160],
            ])
        out += md_table(
            ["gate", "method", "backend", "T", "B", "Hkv", "out err / bound", "dq", "dk", "dv", "result", "reason"],
            rows_g,
        )
        out.append("")
    missing = [r for r in records if r.get("status") in ("skipped", "failed") and r.get("op") in TIMED_OPS]
    if missing:
        out += ["### Not measured", ""]
        out += md_table(
            ["op", "method", "T", "Hkv", "B", "backend", "status", "reason"],
            [[r.get("op"), r.get("method") + (f": {r['part']}" if r.get("part") else ""), size_label(r.get("T")),
              fmt(r.get("Hkv")), fmt(r.get("B")), r.get("backend"), r.get("status"), (r.get("reason") or "")[:200]]
             for r in missing],
        )
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def update_markdown(path: str, section: str) -> str:
    """Replace the text between the markers of ``path`` by ``section`` (markers appended at the
    end when absent; the file created when missing). Returns the new text."""
    text = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    block = f"{BEGIN}\n{section.rstrip()}\n{END}"
    if BEGIN in text and END in text and text.index(BEGIN) < text.index(END):
        head, rest = text.split(BEGIN, 1)
        tail = rest.split(END, 1)[1]
        new = head + block + tail
    else:
        if not text:
            text = "# Benchmarks (GPU)\n"
        new = text.rstrip("\n") + "\n\n" + block + "\n"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(new)
    return new


JSON_FIELDS = (
    "case_id", "status", "reason", "op", "method", "config", "T", "B", "H", "Hkv", "D", "dtype", "backend",
    "part", "lengths", "median_ms", "min_ms", "max_ms", "n_reps", "graph_ms", "kernel_ms", "select_ms",
    "first_call_s", "density", "keys_per_query", "flops", "bytes", "bytes_model", "tflops", "floor_ms",
    "x_floor", "peak_bytes", "peak_extra_bytes", "tt_bytes", "tt_check_ok", "kv_layout", "kv_heads_read",
    "gate_ok", "bwd_method", "notes", "errors", "ok", "run_id", "finished_at",
)


def build_json(rows: list[dict], existing: dict | list | None = None) -> dict:
    """``docs/benchmarks.json``: the runs and one record per case (latest), with speed-ups.
    Content not written by this renderer (the earlier flex-only run) is kept under
    ``earlier``."""
    records = sorted(final_records(rows), key=sort_key)
    dense = dense_times(records)
    out_records = []
    for r in records:
        rec = {k: r.get(k) for k in JSON_FIELDS if k in r}
        s_cudnn, s_best = speedups(r, dense)
        rec["speedup_vs_cudnn"] = s_cudnn
        rec["speedup_vs_best_dense"] = s_best
        rec["peak_bytes"] = r.get("peak_bytes")
        rec["median_ms"] = r.get("median_ms")
        rec["env"] = {k: (r.get("env") or {}).get(k) for k in ENV_KEYS}
        out_records.append(rec)
    earlier: list = []
    if isinstance(existing, dict) and existing.get("generated_by", "").startswith("benchmarks/render.py"):
        earlier = list(existing.get("earlier", []))
    elif existing:
        earlier = [existing]
    used = {r.get("run_id") for r in records}
    return {
        "generated_by": "benchmarks/render.py from benchmarks/suite.py JSON lines",
        "runs": {k: v for k, v in runs_of(rows).items() if k in used},
        "records": out_records,
        "earlier": earlier,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--in", dest="inp", required=True, help="suite.jsonl written by benchmarks/suite.py")
    ap.add_argument("--md", default=os.path.join(ROOT, "docs", "benchmarks.md"))
    ap.add_argument("--json", default=os.path.join(ROOT, "docs", "benchmarks.json"))
    args = ap.parse_args(argv)
    rows = load_jsonl(args.inp)
    if not final_records(rows):
        print(f"no final records in {args.inp}", file=sys.stderr)
        return 1
    update_markdown(args.md, render_markdown(rows))
    existing = None
    if os.path.exists(args.json):
        try:
            with open(args.json, encoding="utf-8") as f:
                existing = json.load(f)
        except (OSError, json.JSONDecodeError):
            existing = None
    data = build_json(rows, existing)
    with open(args.json, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1)
        f.write("\n")
    print(f"wrote {args.md} (section between {BEGIN} / {END}) and {args.json}: {len(data['records'])} records")
    return 0


if __name__ == "__main__":
    sys.exit(main())
