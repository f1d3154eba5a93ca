"""The GPU benchmark suite's pure parts, checked on the CPU: FLOP / byte counting against numbers
worked out by hand, the floor, option parsing and case order, resume after a killed run, the
"missing back end is skipped with a reason" path, the renderer, and a CPU smoke run of the whole
script (tiny shapes, the back ends a CPU has)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE_PATH = os.path.join(ROOT, "benchmarks", "suite.py")


def _load(name: str, path: str):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


suite = _load("longattn_bench_suite", SUITE_PATH)
render = _load("longattn_bench_render", os.path.join(ROOT, "benchmarks", "render.py"))

SMOKE = ["--device", "cpu", "--sizes", "256", "--quick", "--max-seconds", "0"]  # every method


def run_cli(args, interpret: bool = False):
    """The script in a fresh process. Our Triton kernels run through the interpreter only when
    asked (conftest.py turns it on for the kernel tests; here it would take minutes)."""
    env = {**os.environ, "TRITON_INTERPRET": "1" if interpret else "0"}
    return subprocess.run([sys.executable, SUITE_PATH, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)


def finals(path):
    return render.final_records(render.load_jsonl(path))


# ---------------------------------------------------------------------- counting
def test_causal_pairs_by_hand():
    assert suite.causal_pairs(4, 4) == 1 + 2 + 3 + 4
    assert suite.causal_pairs(2, 5) == 4 + 5  # queries at positions 3 and 4
    assert suite.causal_pairs(1, 7) == 7  # decoding: one query sees the whole cache


def test_prefill_flops_by_hand():
    # B=1, H=2, D=8, T=4: 10 causal pairs, each 2 matmuls x 2 FLOPs x D
    assert suite.prefill_flops("fwd", B=1, H=2, D=8, T=4) == 4 * 2 * 8 * 10 == 640
    assert suite.prefill_flops("bwd", B=1, H=2, D=8, T=4) == 1600
    assert suite.prefill_flops("fwd", B=1, H=2, D=8, T=4, density=0.5) == 320
    # 64k dense causal, H=32, D=128: 2 * H * D * T^2 (+ the diagonal)
    T = 65536
    assert suite.prefill_flops("fwd", B=1, H=32, D=128, T=T) == 4 * 32 * 128 * (T * (T + 1) // 2)


def test_prefill_bytes_dense_by_hand():
    # one [1, 2, 4, 8] bf16 tensor = 128 bytes; one [1, 1, 4, 8] = 64 bytes
    fwd = suite.prefill_bytes("fwd", B=1, H=2, kv_heads=1, D=8, T=4, elt=2)
    assert fwd == 128 + 64 + 64 + 128  # Q, K, V read, O written
    bwd = suite.prefill_bytes("bwd", B=1, H=2, kv_heads=1, D=8, T=4, elt=2)
    assert bwd == 4 * 128 + 4 * 64  # Q, O, dO, dQ; K, V, dK, dV


def test_prefill_bytes_sparse_by_hand():
    # T=1024: 524800 causal pairs; density 1/4, per-head selection of 4 heads, tiles of 128 queries:
    # K reads = 0.25 * 524800 * 4 heads / 128 rows = 4100 key rows of 16 bf16 = 131200 bytes
    got = suite.prefill_bytes("fwd", B=1, H=4, kv_heads=2, D=16, T=1024, elt=2, density=0.25, sel_heads=4)
    q_bytes = 4 * 1024 * 16 * 2
    assert got == 2 * q_bytes + 2 * 131200
    # a tiny selection still reads K and V once
    tiny = suite.prefill_bytes("fwd", B=1, H=4, kv_heads=2, D=16, T=1024, elt=2, density=1e-6, sel_heads=4)
    assert tiny == 2 * q_bytes + 2 * (2 * 1024 * 16 * 2)
    # group-shared selection (2 KV heads) reads half of the per-head one
    shared = suite.prefill_bytes("fwd", B=1, H=4, kv_heads=2, D=16, T=1024, elt=2, density=0.25, sel_heads=2)
    assert shared == 2 * q_bytes + 2 * 65600


def test_selected_tokens_and_decode_counts_by_hand():
    # block 4; sequence 0 has 10 tokens and keeps blocks 0, 2, 1 (4 + 2 + 4 tokens);
    # sequence 1 has 6 tokens and keeps only block 1 (positions 4..5: 2 tokens); one KV head
    idx = torch.tensor([[[0, 2, 1]], [[1, 0, 0]]], dtype=torch.int32)
    counts = torch.tensor([[3], [1]], dtype=torch.int32)
    lens = torch.tensor([10, 6], dtype=torch.int32)
    tokens = suite.selected_tokens(idx, counts, lens, 4)
    assert tokens.tolist() == [[10], [2]]
    # 12 keys read by each of 4 query heads of the group, D = 8: 4 * 8 per key
    assert suite.decode_attend_flops(8, 4 * 12) == 4 * 8 * 48
    # K and V of 12 tokens (8 bf16 each) + q and o of 2 sequences x 4 heads
    assert suite.decode_attend_bytes(B=2, H=4, D=8, elt=2, kv_tokens=12) == 2 * 12 * 16 + 2 * 2 * 4 * 16


def test_decode_lengths():
    assert suite.decode_lengths(131072, 1) == [131072]
    assert suite.decode_lengths(131072, 4) == [131072, 98304, 65536, 32768]
    assert suite.decode_lengths(131072, 4, fixed=True) == [131072] * 4


def test_fixed_decode_lengths_plan():
    """--decode-lengths both: B > 1 gets a fixed-length batch beside the staggered one (its own case
    id, lengths and dense baseline); B = 1 is one batch either way."""
    o = suite.parse_args(["--device", "cuda", "--plan", "--sizes", "128k", "--hkv", "8", "--ops", "decode",
                          "--methods", "full,topk", "--backends", "ours,sdpa-cudnn", "--decode-batch", "1,16",
                          "--decode-lengths", "both"])
    plan = suite.build_plan(o)
    ids = [c.case_id for c in plan]
    assert len(ids) == len(set(ids))
    full = {(c.B, c.fixed): c for c in plan if c.method == "full"}
    assert set(full) == {(1, False), (16, False), (16, True)}
    assert full[(16, True)].lengths == [131072] * 16
    assert full[(16, False)].lengths == suite.decode_lengths(131072, 16)
    assert full[(16, True)].case_id.endswith("|fixed") and not full[(16, False)].case_id.endswith("|fixed")
    topk = [c for c in plan if c.method == "topk" and c.fixed]
    assert {c.part for c in topk} == set(suite.DECODE_PARTS) and all(c.B == 16 for c in topk)
    only = suite.build_plan(suite.parse_args(["--device", "cuda", "--plan", "--sizes", "128k", "--hkv", "8",
                                              "--ops", "decode", "--methods", "full", "--backends", "sdpa-cudnn",
                                              "--decode-batch", "1,4", "--decode-lengths", "fixed"]))
    assert [(c.B, c.fixed) for c in only] == [(1, False), (4, True)]


def test_floor():
    # 1 TFLOP at 1 PFLOP/s = 1 ms; 1 GB at 1 TB/s = 1 ms
    assert suite.floor_ms(1e12, 1e9, 1e15, 1e12)[0] == pytest.approx(1.0)
    assert suite.floor_ms(2e12, 1e9, 1e15, 1e12) == (pytest.approx(2.0), "compute")
    assert suite.floor_ms(1e9, 4e9, 1e15, 1e12) == (pytest.approx(4.0), "memory")
    assert suite.floor_ms(1e9, 1e9, None, 1e12) == (None, None)
    m = suite.metrics(2e12, 1e9, 4.0, {"matmul_flops_per_s": 1e15, "copy_bytes_per_s": 1e12})
    assert m["floor_ms"] == pytest.approx(2.0)
    assert m["x_floor"] == pytest.approx(2.0)
    assert m["tflops"] == pytest.approx(500.0)  # 2e12 FLOP in 4 ms


def test_reps_policy():
    assert suite.reps_for(1.0, 25, "cuda") == 50  # fast: capped at 50
    assert suite.reps_for(100.0, 25, "cuda") == 5  # ~400 ms of runs, at least 5
    assert suite.reps_for(2000.0, 25, "cuda") == 3  # slow runs: 3
    assert suite.reps_for(10000.0, 25, "cuda") == 1  # the per-case cap
    assert suite.reps_for(0.02, 25, "cuda", decode=True) == 100


# ---------------------------------------------------------------------- options and plan
def test_parse_args_defaults_and_quick(tmp_path):
    o = suite.parse_args(["--device", "cuda", "--plan", "--out", str(tmp_path)])
    assert o.sizes == [8192, 16384, 32768, 65536, 131072] and o.hkv == [8, 32]
    assert (o.heads, o.head_dim, o.dtype, o.gate_len) == (32, 128, "bfloat16", 4096)
    assert o.backends == ["ours", "flex", "sdpa-cudnn", "sdpa-flash", "dense-mask"]
    assert o.out_path == os.path.join(str(tmp_path), "suite.jsonl")
    q = suite.parse_args(["--device", "cuda", "--plan", "--quick"])
    assert q.sizes == [8192, 65536] and q.hkv == [8]
    s = suite.parse_args(["--device", "cuda", "--plan", "--sizes", "64k,131072", "--hkv", "32", "--methods",
                          "topk,nsa", "--ops", "fwd", "--out", "x/run.jsonl"])
    assert s.sizes == [65536, 131072] and s.hkv == [32] and s.methods == ["topk", "nsa"] and s.ops == ["fwd"]
    assert s.out_path == "x/run.jsonl"
    c = suite.parse_args(["--device", "cpu", "--sizes", "256", "--quick"])
    assert c.gate_len == 256 and "reference" in c.backends and c.heads % c.hkv[0] == 0


@pytest.mark.parametrize("bad", [["--methods", "nope"], ["--ops", "fwd,sideways"], ["--hkv", "5"],
                                 ["--sizes", "lots"], ["--backends", "cublas"], ["--redo", "ok"]])
def test_parse_args_rejects(bad, capsys):
    with pytest.raises(SystemExit):
        suite.parse_args(["--device", "cpu", *bad])
    assert "error" in capsys.readouterr().err


def test_plan_order_and_coverage():
    o = suite.parse_args(["--device", "cuda", "--plan"])
    plan = suite.build_plan(o)
    ids = [c.case_id for c in plan]
    assert len(ids) == len(set(ids))
    # the headline first: 64k, Hkv 8, dense then ours
    head = plan[0]
    assert (head.op, head.method, head.T, head.Hkv, head.backend) == ("fwd", "full", 65536, 8, "sdpa-cudnn")
    first_flex = next(i for i, c in enumerate(plan) if c.backend == "flex")
    first_decode = next(i for i, c in enumerate(plan) if c.op == "decode")
    assert plan[first_decode].T == 131072 and plan[first_decode].Hkv == 8
    assert first_decode < first_flex
    assert all(c.T == 65536 and c.Hkv == 8 for c in plan[:first_decode])
    assert {c.method for c in plan[:first_decode]} >= {"full", "topk", "nsa", "moba", "moba-g128"}
    assert plan[first_flex].T == 65536 and plan[first_flex].method == "topk"
    # every combination exactly once
    prefill = {(c.op, c.method, c.T, c.Hkv, c.backend) for c in plan if c.op != "decode"}
    n_sparse = len(suite.PREFILL_METHODS)
    assert len(prefill) == 2 * 5 * 2 * (2 + 3 * n_sparse)  # ops x sizes x Hkv x (dense + ours/flex/dense-mask)
    decode = [c for c in plan if c.op == "decode"]
    # sizes x Hkv x B x (dense + 2 selectors x parts + NSA's step with fp32 and with bf16 compressed tokens)
    assert len(decode) == 5 * 2 * 2 * (2 + 2 * len(suite.DECODE_PARTS) + len(suite.NSA_DECODE))
    assert {(c.method, c.part) for c in decode if c.method.startswith("nsa")} == {("nsa", "both"), ("nsa-bf16", "both")}
    assert {c.B for c in decode} == {1, 4}


def test_gate_case():
    o = suite.parse_args(["--device", "cuda", "--plan"])
    c = suite.Case("bwd", "nsa", 65536, 1, 32, 8, 128, "bfloat16", "flex")
    g = suite.gate_case(c, o)
    assert (g.op, g.T, g.B, g.Hkv, g.backend, g.method) == ("gate-bwd", 4096, 1, 8, "flex", "nsa")
    d = suite.Case("decode", "quest", 131072, 1, 32, 8, 128, "bfloat16", "ours", "attend")
    gd = suite.gate_case(d, o)
    assert (gd.op, gd.B, gd.part, gd.lengths) == ("gate-decode", 4, "", [4096, 3072, 2048, 1024])
    assert suite.method_config("quest", "decode", 4096) == ("select_quest_pages", {"page_size": 16, "top_k": 256})
    assert suite.method_config("topk", "decode", 4096) == ("select_topk_blocks", {"block_size": 128, "top_k": 32})
    assert suite.method_config("moba-g128", "fwd") == ("moba", {"gate_block": 128})
    assert suite.method_config("nsa-bf16", "decode") == ("nsa_decode", {"compressed_tokens": "bfloat16"})
    assert suite.method_config("nsa", "gate-decode") == ("nsa_decode", {"compressed_tokens": "float32"})


def test_plan_option_runs_without_a_gpu(tmp_path):
    proc = run_cli(["--plan", "--device", "cuda", "--quick", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stderr
    assert "fit in an estimated" in proc.stdout


# ---------------------------------------------------------------------- resume state
def test_load_state_tolerates_a_cut_line_and_finds_stale_markers(tmp_path):
    path = tmp_path / "suite.jsonl"
    lines = [
        {"case_id": "a", "status": "started"},
        {"case_id": "a", "status": "ok", "median_ms": 1.0},
        {"case_id": "b", "status": "started"},
        {"case_id": "c", "status": "started"},
        {"case_id": "c", "status": "interrupted"},
    ]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"case_id": "d", "sta')
    done, stale = suite.load_state(str(path))
    assert set(done) == {"a"} and set(stale) == {"b"}  # c was interrupted by the budget: rerun


def _runner(tmp_path, extra=()):
    o = suite.parse_args(["--device", "cpu", "--sizes", "256", "--quick", "--out", str(tmp_path), *extra])
    return suite.Runner(o, {"command": "test"}, "run-test"), o


def test_missing_backend_is_skipped_with_a_reason(tmp_path, monkeypatch):
    runner, o = _runner(tmp_path)
    # a method without the triton back end
    import longattn

    real = longattn.get_method("topk")
    fake = dataclasses.replace(real, backends={"flex": real.backends["flex"]})
    monkeypatch.setattr(longattn, "get_method", lambda name: fake if name == "topk" else real)
    case = suite.Case("fwd", "topk", 256, 1, o.heads, o.hkv[0], o.head_dim, o.dtype, "ours")
    reason = runner.unavailable(case)
    assert reason and "no 'triton' back end" in reason
    runner.run_case(case)
    rec = runner.done[case.case_id]
    assert rec["status"] == "skipped" and "triton" in rec["reason"]
    # no decode module in the checkout
    monkeypatch.setattr(suite.importlib.util, "find_spec", lambda name, *a: None)
    dcase = suite.Case("decode", "topk", 256, 1, o.heads, o.hkv[0], o.head_dim, o.dtype, "ours", "attend")
    assert runner.unavailable(dcase) == "longattn.decode is not in this checkout"


def test_an_interrupted_case_is_rerun_not_failed(tmp_path):
    runner, o = _runner(tmp_path)
    case = suite.Case("fwd", "full", 256, 1, o.heads, o.hkv[0], o.head_dim, o.dtype, "sdpa-flash")
    gate = suite.gate_case(case, o)
    runner.start(gate)
    runner.start(case)
    runner.interrupted()  # what the budget alarm does
    done, stale = suite.load_state(o.out_path)
    assert not done and not stale
    runner.start(case)  # a crash, by contrast, leaves the started marker last
    done, stale = suite.load_state(o.out_path)
    assert set(stale) == {case.case_id}


def test_budget_leaves_cases_unrecorded(tmp_path):
    runner, o = _runner(tmp_path, ["--max-seconds", "1"])
    case = suite.Case("fwd", "full", 256, 1, o.heads, o.hkv[0], o.head_dim, o.dtype, "sdpa-flash")
    runner.run_case(case)
    assert case.case_id in runner.not_started and case.case_id not in runner.done
    done, _ = suite.load_state(o.out_path)
    assert case.case_id not in done


def test_hard_stop_mid_case_leaves_it_for_a_rerun(tmp_path, monkeypatch, capsys):
    """The alarm that backs up --max-seconds fires inside a case: the run prints its table and
    exits cleanly, and the case is neither recorded nor marked as crashed."""
    elapsed = suite.time.monotonic() - suite.START
    monkeypatch.setattr(suite, "ALARM_GRACE_S", -6.0)  # alarm 2 s from now, budget checks until 3 s
    slow_calls = []

    def slow_bench(self, fn, **kw):  # a case that overruns its estimate
        slow_calls.append(1)
        suite.time.sleep(5)
        return {"median_ms": 1.0, "min_ms": 1.0, "max_ms": 1.0, "n_reps": 1}

    def quick_ceilings(self):  # measuring them takes 2 s on a slow CPU: past the alarm
        self.ceilings = {"matmul_flops_per_s": 1e11, "matmul_desc": "test", "copy_bytes_per_s": 1e10, "copy_desc": "test"}
        return self.ceilings

    monkeypatch.setattr(suite.Runner, "bench", slow_bench)
    monkeypatch.setattr(suite.Runner, "measure_ceilings", quick_ceilings)
    rc = suite.main(["--device", "cpu", "--sizes", "256", "--quick", "--methods", "full", "--backends", "sdpa-flash",
                     "--ops", "fwd", "--out", str(tmp_path), "--max-seconds", f"{elapsed + 8:.1f}"])
    out = capsys.readouterr().out
    assert rc == 0 and len(slow_calls) == 1 and "stopped: wall-clock budget" in out and "benchmark suite" in out
    path = str(tmp_path / "suite.jsonl")
    done, stale = suite.load_state(path)
    assert not stale and not any(cid.startswith("fwd|") for cid in done)
    last = {r["case_id"]: r["status"] for r in render.load_jsonl(path)}
    assert "interrupted" in last.values()


# ---------------------------------------------------------------------- CPU smoke + resume + render
@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    proc = run_cli([*SMOKE, "--out", str(out)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_smoke_run_records_every_case(smoke):
    out, proc = smoke
    assert "benchmark suite" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1].startswith("ceilings:")
    path = str(out / "suite.jsonl")
    rows = render.load_jsonl(path)
    recs = finals(path)
    ids = [r["case_id"] for r in recs]
    assert len(ids) == len(set(ids))
    o = suite.parse_args([*SMOKE, "--out", str(out)])
    plan = suite.build_plan(o)
    by_id = {r["case_id"]: r for r in recs}
    assert all(c.case_id in by_id for c in plan), "every planned case has a final record"
    # one ceiling record with both rates and the environment
    ceil = [r for r in rows if r.get("op") == "ceiling"]
    assert len(ceil) == 1 and ceil[0]["ceilings"]["matmul_flops_per_s"] > 0 and ceil[0]["ceilings"]["copy_bytes_per_s"] > 0
    for r in recs:
        env = r["env"]
        assert {"command", "gpu", "torch", "triton", "cuda", "date", "commit"} <= set(env)
        assert env["command"].startswith("python3 benchmarks/suite.py")
    ok = [r for r in recs if r["status"] == "ok" and r["op"] in ("fwd", "bwd", "decode")]
    assert {(r["op"], r["backend"]) for r in ok} >= {("fwd", "flex"), ("fwd", "sdpa-flash"), ("bwd", "sdpa-flash"),
                                                     ("fwd", "reference"), ("bwd", "reference"),
                                                     ("decode", "sdpa-flash"), ("decode", "reference")}
    for r in ok:
        assert r["median_ms"] > 0 and r["n_reps"] >= 1 and r["gate_ok"] is True
        assert r["flops"] >= 0 and r["bytes"] > 0 and r["floor_ms"] > 0 and r["x_floor"] > 0
    # the counted FLOPs of a timed dense case are the hand formula
    dense = next(r for r in ok if r["op"] == "fwd" and r["method"] == "full")
    assert dense["flops"] == 4 * dense["H"] * dense["D"] * (256 * 257 // 2)
    # skipped with reasons: our kernels need CUDA here, flex has no CPU backward, cuDNN is CUDA only
    skipped = {(r["op"], r["method"], r["backend"]): r["reason"] for r in recs if r["status"] == "skipped"}
    assert "CUDA" in skipped[("fwd", "topk", "ours")]
    assert "no backward on CPU" in skipped[("bwd", "topk", "flex")]
    assert "CUDA" in skipped[("fwd", "full", "sdpa-cudnn")]
    # every timed path passed its gate first
    gates = {r["case_id"]: r for r in recs if r["op"].startswith("gate")}
    assert any(g["op"] == "gate-decode" and g["ok"] for g in gates.values())
    assert any(g["op"] == "gate-bwd" and g["backend"] == "sdpa-flash" and g["ok"] for g in gates.values())
    for r in ok:
        g = suite.gate_case(suite.Case(**{k: r[k] for k in suite.Case.__dataclass_fields__}), o)
        assert gates[g.case_id]["ok"]


def test_rerun_resumes_and_marks_a_killed_case(smoke):
    out, _ = smoke
    path = out / "suite.jsonl"
    before = path.read_text().splitlines()
    n_final = len(finals(str(path)))
    # 1. a rerun with the same --out times nothing again
    proc = run_cli([*SMOKE, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "this run: 0 timed, 0 skipped, 0 failed" in proc.stdout
    assert len(finals(str(path))) == n_final
    # 2. a run killed during a case: its started marker is the last line, plus a cut line
    victim = next(json.loads(line) for line in before if '"status": "ok"' in line and '"op": "fwd"' in line)
    kept = [line for line in path.read_text().splitlines()
            if not (victim["case_id"] in line and '"status": "ok"' in line)]
    path.write_text("\n".join(kept) + "\n" + '{"case_id": "fwd|cut')
    proc = run_cli([*SMOKE, "--out", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = {r["case_id"]: r for r in finals(str(path))}[victim["case_id"]]
    assert rec["status"] == "failed" and "previous run ended during this case" in rec["reason"]
    assert len(finals(str(path))) == n_final  # no duplicates, nothing else re-run
    # 3. --redo failed runs it again
    proc = run_cli([*SMOKE, "--out", str(out), "--redo", "failed", "--methods", "full,topk,nsa"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = {r["case_id"]: r for r in finals(str(path))}[victim["case_id"]]
    assert rec["status"] == "ok"
    assert len(finals(str(path))) == n_final


def test_our_paths_through_the_triton_interpreter(tmp_path):
    """Our kernels (prefill forward and backward, sparse decoding with both selectors, B=1 and 4)
    through the whole suite path: gate, timing, kernel-only, counting."""
    proc = run_cli(["--device", "cpu", "--sizes", "128", "--quick", "--methods", "topk,quest", "--backends", "ours",
                    "--out", str(tmp_path), "--max-seconds", "0"], interpret=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = finals(str(tmp_path / "suite.jsonl"))
    timed = [r for r in recs if r["op"] in ("fwd", "bwd", "decode")]
    assert timed and all(r["status"] == "ok" and r["backend"] == "ours" for r in timed), [
        (r["case_id"], r.get("reason")) for r in timed if r["status"] != "ok"]
    assert {r["op"] for r in timed} == {"fwd", "bwd", "decode"}
    assert {r["part"] for r in timed if r["op"] == "decode"} == set(suite.DECODE_PARTS)
    fwd = next(r for r in timed if r["op"] == "fwd")
    assert fwd["kernel_ms"] > 0 and fwd["density"] == pytest.approx(1.0)  # 128 tokens: one block, all kept
    attend = next(r for r in timed if r["op"] == "decode" and r["part"] == "attend" and r["B"] == 4)
    # B=4 lengths 128, 96, 64, 32, budget larger than the cache: every valid token is read once per KV head
    assert attend["selected_tokens"] == (128 + 96 + 64 + 32) * attend["Hkv"]
    gates = [r for r in recs if r["op"] == "gate-decode"]
    assert gates and all(g["ok"] and "out_unvalidated" in g["errors"] for g in gates)


def test_nsa_decoding_through_the_triton_interpreter(tmp_path):
    """NSA's decoding step (fp32 and bf16 compressed tokens, B = 1 and 4) through the suite: its
    gate against nsa_decode's reference (also with validate=False), timing and byte count."""
    proc = run_cli(["--device", "cpu", "--sizes", "128", "--quick", "--methods", "nsa,nsa-bf16", "--ops", "decode",
                    "--backends", "ours", "--out", str(tmp_path), "--max-seconds", "0"], interpret=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = finals(str(tmp_path / "suite.jsonl"))
    timed = [r for r in recs if r["op"] == "decode"]
    assert {(r["method"], r["B"]) for r in timed} == {("nsa", 1), ("nsa", 4), ("nsa-bf16", 1), ("nsa-bf16", 4)}
    assert all(r["status"] == "ok" and r["part"] == "both" and r["gate_ok"] for r in timed)
    gates = [r for r in recs if r["op"] == "gate-decode"]
    assert len(gates) == 2 and all(g["ok"] and "out_unvalidated" in g["errors"] for g in gates)
    # B = 4, lengths 128, 96, 64, 32, paper defaults (blocks of 32 with stride 16; 16 blocks of 64 and a
    # 512-key window cover every key): visible compressed tokens 7 + 5 + 3 + 1 = 16 per KV head, and
    # every valid key once for the selected branch and once for the window
    r = next(r for r in timed if r["method"] == "nsa-bf16" and r["B"] == 4)
    Hkv, D, H = r["Hkv"], r["D"], r["H"]
    assert r["selected_tokens"] == 2 * Hkv * (128 + 96 + 64 + 32)
    cmp_bytes = 2 * Hkv * 16 * D * 2  # bf16 compressed K and V
    kv_bytes = 2 * Hkv * 2 * (128 + 96 + 64 + 32) * D * 2
    assert r["bytes"] == cmp_bytes + kv_bytes + 2 * 4 * H * D * 2  # + q and o


def _synthetic():
    env = {"command": "python3 benchmarks/suite.py --quick", "gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6.0",
           "cuda": "13.0", "cudnn": 91000, "python": "3.12", "date": "2026-11-29T10:00:00+00:00", "commit": "abc1234",
           "dirty": False, "device": "cuda"}
    base = {"op": "fwd", "T": 65536, "B": 1, "H": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16", "part": "",
            "env": env, "run_id": "r1", "status": "ok", "gate_ok": True}
    rows = [
        {"case_id": "ceiling|r1", "op": "ceiling", "status": "info", "run_id": "r1", "env": env,
         "ceilings": {"matmul_flops_per_s": 7.5e14, "copy_bytes_per_s": 4.2e12, "matmul_desc": "8192^3"}},
        {**base, "case_id": "c1", "method": "full", "config": {}, "backend": "sdpa-cudnn", "median_ms": 60.0,
         "peak_bytes": 2**30, "tflops": 580.0, "bytes": 1.5e9, "floor_ms": 47.0, "x_floor": 1.28},
        {**base, "case_id": "c2", "method": "full", "config": {}, "backend": "sdpa-flash", "median_ms": 100.0,
         "peak_bytes": 2**30},
        {**base, "case_id": "c3", "method": "topk", "config": {"block_size": 128, "top_k": 16}, "backend": "ours",
         "median_ms": 4.0, "peak_bytes": 3 * 2**30, "x_floor": 1.5},
        {**base, "case_id": "c4", "method": "nsa", "config": {}, "backend": "ours", "status": "skipped",
         "reason": "method 'nsa' has no 'triton' back end"},
        {**base, "case_id": "g1", "op": "gate-fwd", "method": "topk", "config": {}, "backend": "ours", "T": 4096,
         "ok": True, "errors": {"out": {"err": 1e-3, "bound": 1e-2, "ok": True, "finite": True}}},
    ]
    return rows


def test_render_markdown_and_json(tmp_path):
    rows = _synthetic()
    md = render.render_markdown(rows)
    assert "### Prefill forward" in md and "### Correctness gates" in md and "### Not measured" in md
    header = next(line for line in md.splitlines() if line.startswith("| method | config | T |"))
    for col in ("median ms", "TFLOP/s", "GB moved", "peak GiB", "vs cuDNN", "floor ms", "x floor", "backend",
                "Hkv", "dtype"):
        assert col in header
    ours = next(line for line in md.splitlines() if line.startswith("| topk |"))
    assert "| 15 |" in ours  # cuDNN 60 ms / ours 4 ms
    assert "NVIDIA H200" in md and "abc1234" in md and "python3 benchmarks/suite.py --quick" in md
    assert "750 TFLOP/s" in md and "4.2 TB/s" in md
    # the file: existing text kept, markers added once, a second render replaces the section only
    doc = tmp_path / "benchmarks.md"
    doc.write_text("# Benchmarks\n\nEarlier flex run: hand-written text.\n")
    render.update_markdown(str(doc), md)
    render.update_markdown(str(doc), md.replace("### Prefill forward", "### Prefill forward (again)"))
    text = doc.read_text()
    assert text.startswith("# Benchmarks\n\nEarlier flex run: hand-written text.\n")
    assert text.count(render.BEGIN) == 1 and text.count(render.END) == 1 and "(again)" in text
    # JSON: one record per case with the fields the docs promise; earlier content kept
    earlier = {"env": {"date": "old"}, "records": [{"op": "prefill_fwd"}]}
    data = render.build_json(rows, earlier)
    assert data["earlier"] == [earlier] and "r1" in data["runs"]
    assert [r["case_id"] for r in data["records"]] == ["c1", "c2", "c3", "c4", "g1"]
    for r in data["records"]:
        for key in ("op", "method", "T", "H", "Hkv", "D", "dtype", "backend", "median_ms", "peak_bytes"):
            assert key in r
    c3 = next(r for r in data["records"] if r["case_id"] == "c3")
    assert c3["speedup_vs_cudnn"] == pytest.approx(15.0) and c3["speedup_vs_best_dense"] == pytest.approx(15.0)
    again = render.build_json(rows, data)
    assert again["earlier"] == [earlier]


def test_fixed_and_staggered_batches_each_decode_their_own_lengths(tmp_path):
    """With --decode-lengths both the two batches of one B run back to back: each must build its
    own caches' lengths (the selection reads every key here: budget >= T)."""
    proc = run_cli(["--device", "cpu", "--sizes", "256", "--quick", "--max-seconds", "0", "--ops", "decode",
                    "--methods", "full,topk", "--backends", "reference", "--decode-batch", "2",
                    "--decode-lengths", "both", "--out", str(tmp_path)])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    recs = [r for r in finals(str(tmp_path / "suite.jsonl")) if r["op"] == "decode" and r["status"] == "ok"]
    attend = {r["fixed"]: r for r in recs if r["method"] == "topk" and r["part"] == "attend"}
    hkv = attend[True]["Hkv"]
    assert attend[True]["lengths"] == [256, 256] and attend[False]["lengths"] == [256, 128]
    assert attend[True]["selected_tokens"] == hkv * 512 and attend[False]["selected_tokens"] == hkv * 384
    dense = {r["fixed"]: r for r in recs if r["method"] == "full"}
    assert dense[True]["bytes"] > dense[False]["bytes"]


def test_render_compares_decode_batches_of_the_same_lengths():
    """A fixed-length decode batch is compared with the dense run over the same lengths, not with
    the staggered batch of the same B."""
    env = _synthetic()[0]["env"]
    base = {"op": "decode", "T": 131072, "B": 4, "H": 32, "Hkv": 8, "D": 128, "dtype": "bfloat16", "env": env,
            "run_id": "r1", "status": "ok", "gate_ok": True, "config": {}}
    stag, fixed = suite.decode_lengths(131072, 4), suite.decode_lengths(131072, 4, fixed=True)
    rows = [{**base, "case_id": "d1", "method": "full", "backend": "sdpa-cudnn", "part": "", "lengths": stag,
             "median_ms": 0.3},
            {**base, "case_id": "d2", "method": "full", "backend": "sdpa-cudnn", "part": "", "lengths": fixed,
             "median_ms": 0.5},
            {**base, "case_id": "d3", "method": "topk", "backend": "ours", "part": "both", "lengths": stag,
             "median_ms": 0.05},
            {**base, "case_id": "d4", "method": "topk", "backend": "ours", "part": "both", "lengths": fixed,
             "median_ms": 0.05}]
    dense = render.dense_times(rows)
    assert render.speedups(rows[2], dense)[0] == pytest.approx(6.0)
    assert render.speedups(rows[3], dense)[0] == pytest.approx(10.0)
    md = render.render_markdown(rows)
    assert "| 128k each |" in md and "| 128k (128k/96k/64k/32k) |" in md
    table = suite.summary_table([{**r, "fixed": r["lengths"] == fixed} for r in rows]).splitlines()
    assert sum(" 4* " in line for line in table) == 2 and sum("  4 " in line for line in table) == 2
    assert any(" 4* " in line and "10.00x" in line for line in table)


def test_render_cli_on_the_smoke_run(smoke, tmp_path):
    out, _ = smoke
    md, js = tmp_path / "b.md", tmp_path / "b.json"
    rc = render.main(["--in", str(out / "suite.jsonl"), "--md", str(md), "--json", str(js)])
    assert rc == 0
    text = md.read_text()
    assert render.BEGIN in text and "### Decoding" in text and "### Prefill backward" in text
    data = json.loads(js.read_text())
    assert data["records"] and all(r["env"]["command"] for r in data["records"])


def test_summary_table_pivot():
    table = suite.summary_table(render.final_records(_synthetic()))
    row = next(line for line in table.splitlines() if line.startswith("fwd    topk"))
    assert "4.000" in row and "15.00x" in row and "1.50x" in row
    assert len(suite.summary_table(render.final_records(_synthetic()), limit_chars=300).splitlines()) < 6


def test_longattn_commit_wins_over_git(tmp_path, monkeypatch):
    # the device machine's copy of the tree can carry stale git metadata: the commit passed in
    # LONGATTN_COMMIT is recorded, and git's dirty flag (about the stale commit) is not
    o = suite.parse_args(["--device", "cpu", "--quick", "--plan", "--out", str(tmp_path)])
    monkeypatch.delenv("LONGATTN_COMMIT", raising=False)
    from_git = suite.env_info(o, [])
    monkeypatch.setenv("LONGATTN_COMMIT", "abc1234")
    env = suite.env_info(o, [])
    assert env["commit"] == "abc1234" and env["dirty"] is None
    assert from_git["commit"] != "abc1234"
