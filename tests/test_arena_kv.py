"""KV-cache policies in the arena: budget translation, policy cells on a tiny random Llama,
store keys with policy and budget, old stores, the CLI and the report's policy table/plot."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import sqlite3
from collections import Counter

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

import longattn.kv as kv  # noqa: E402
from longattn.arena.budget import (  # noqa: E402
    Budget, build_policy, lighttransfer_layers, parse_budget, policy_config,
)
from longattn.arena.job import ArenaJob  # noqa: E402
from longattn.arena.report import render, summarize, summarize_policies  # noqa: E402
from longattn.arena.runner import run_grid  # noqa: E402
from longattn.arena.store import Cell, ResultStore, canonical_json  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")


# ------------------------------------------------------------------------------ budgets
@pytest.mark.parametrize("text, fraction, tokens, label", [
    ("25%", 0.25, None, "25%"), (" 5% ", 0.05, None, "5%"), ("0.25", 0.25, None, "25%"),
    ("100%", 1.0, None, "100%"), ("12.5%", 0.125, None, "12.5%"), ("1.0", 1.0, None, "100%"),
    ("512", None, 512, "512"), (512, None, 512, "512"), ("2k", None, 2048, "2048"),
])
def test_parse_budget(text, fraction, tokens, label):
    b = parse_budget(text)
    assert (b.fraction, b.tokens, b.label) == (fraction, tokens, label)


@pytest.mark.parametrize("text", ["0", "0%", "-5", "150%", "100.5%", "1.5", "0.0", "abc", "", "25 %%", "nan%",
                                  "inf", 0, -3, True, None])
def test_bad_budgets_raise_a_clear_error(text):
    with pytest.raises(ValueError, match=r"budget .*(percentage|fraction|token|not understood)"):
        parse_budget(text)


def test_budget_tokens_at_a_length():
    assert Budget(fraction=0.25).tokens_at(1000) == 250 and Budget(fraction=0.05).tokens_at(10) == 1
    assert Budget(tokens=512).tokens_at(100) == 512


L = 1000  # nominal prompt length for the translation tests; 25% -> B = 250 tokens


@pytest.mark.parametrize("policy, budget, length, expected", [
    ("streaming", "25%", L, {"sinks": 4, "window": 246}),
    ("streaming", "512", L, {"sinks": 4, "window": 508}),
    ("h2o", "25%", L, {"heavy": 125, "recent": 125}),
    ("h2o", "5%", L, {"heavy": 25, "recent": 25}),
    ("quest", "25%", L, {"budget": 256, "page_size": 16, "dense_layers": 2}),  # 16 pages cover 250
    ("quest", "10%", L, {"budget": 112, "page_size": 16, "dense_layers": 2}),  # 7 pages cover 100
    ("recycled", "25%", L, {"top_k": 250, "stride": 10, "threshold": None}),
    # B = 250 < 2 * 320: streaming heads keep B // 2 = 125 (25 sinks + 100 recent, the paper's
    # 1:4), retrieval share r = (250 - 125) / (1000 - 125)
    ("duo", "25%", L, {"retrieval_ratio": round(125 / 875, 6), "sinks": 25, "window": 100,
                       "retrieval_heads": "uncalibrated-uniform"}),
    # B = 4096 >= 640: the paper's 64 + 256; r = (4096 - 320) / (8192 - 320)
    ("duo", "50%", 8192, {"retrieval_ratio": round(3776 / 7872, 6), "sinks": 64, "window": 256,
                          "retrieval_heads": "uncalibrated-uniform"}),
    ("duo", "100%", 8192, {"retrieval_ratio": 1.0, "sinks": 64, "window": 256,
                           "retrieval_heads": "uncalibrated-uniform"}),
    # lazy layers keep B // 2 = 125 (4 sinks + 121); lazy share f = (1000 - 250) / (1000 - 125)
    ("lighttransfer", "25%", L, {"lazy_ratio": round(750 / 875, 6), "sinks": 4, "window": 121,
                                 "lazy_scores": "uncalibrated-spread"}),
    # B = 4096 >= 2048: StreamingLLM's 4 + 1020; f = (8192 - 4096) / (8192 - 1024)
    ("lighttransfer", "50%", 8192, {"lazy_ratio": round(4096 / 7168, 6), "sinks": 4, "window": 1020,
                                    "lazy_scores": "uncalibrated-spread"}),
    ("lighttransfer", "100%", L, {"lazy_ratio": 0.0, "sinks": 4, "window": 496,
                                  "lazy_scores": "uncalibrated-spread"}),
    ("full", None, L, {}),
])
def test_budget_translation_per_policy(policy, budget, length, expected):
    assert policy_config(policy, budget, length) == expected


def test_translation_takes_overrides_into_account():
    assert policy_config("streaming", "25%", L, {"sinks": 8}) == {"sinks": 8, "window": 242}
    assert policy_config("quest", "25%", L, {"page_size": 64, "dense_layers": 0}) == {
        "budget": 256, "page_size": 64, "dense_layers": 0}
    assert policy_config("recycled", "10%", L, {"stride": 4}) == {"top_k": 100, "stride": 4, "threshold": None}


@pytest.mark.parametrize("policy, budget, overrides, message", [
    ("streaming", "4", {}, "too small for streaming"),
    ("h2o", "1", {}, "too small for h2o"),
    ("duo", "3", {}, "too small for duo"),
    ("duo", "100", {"sinks": 64, "window": 256}, "more than the budget"),
    ("streaming", None, {}, "needs a budget"),
    ("full", "25%", {}, "takes no budget"),
    ("sparse", "25%", {}, "unknown KV policy"),
    ("h2o", "25%", {"heavy": 3}, "no option"),
    ("streaming", "250%", {}, "percentage in"),
    ("duo", "25%", {"retrieval_heads": "/no/such/file.json"}, "no such calibration file"),
])
def test_translation_errors(policy, budget, overrides, message):
    with pytest.raises(ValueError, match=message):
        policy_config(policy, budget, L, overrides)


def test_duo_heads_uncalibrated_default_and_from_a_calibration_file(tmp_path):
    shape = kv.ModelShape(num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8)
    cfg = {"retrieval_ratio": 0.5, "sinks": 4, "window": 8, "retrieval_heads": "uncalibrated-uniform"}
    # the default spreads retrieval heads over layers: KV head 0 of each layer first
    assert build_policy("duo", cfg, shape).retrieval_flags() == ((True, False), (True, False))
    path = tmp_path / "heads.json"
    path.write_text(json.dumps({"scores": [[0.1, 0.9], [0.8, 0.2]]}))
    cfg = policy_config("duo", "50%", 100, {"retrieval_heads": str(path)})
    assert cfg["retrieval_heads"] == str(path)
    assert cfg["retrieval_heads_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    cfg = dict(cfg, retrieval_ratio=0.5)
    assert build_policy("duo", cfg, shape).retrieval_flags() == ((False, True), (True, False))
    inline = policy_config("duo", "50%", 100, {"retrieval_heads": [[1.0, 0.0], [0.0, 1.0]]})
    assert inline["retrieval_heads"] == [[1.0, 0.0], [0.0, 1.0]]


def test_lighttransfer_lazy_layers_default_and_scored():
    assert lighttransfer_layers({"lazy_ratio": 0.5}, 4) == (1, 3)  # evenly spaced
    assert lighttransfer_layers({"lazy_ratio": 1.0}, 3) == (0, 1, 2)
    assert lighttransfer_layers({"lazy_ratio": 0.0}, 4) == ()
    assert lighttransfer_layers({"lazy_ratio": 0.5, "lazy_scores": [0.1, 0.9, 0.5, 0.2]}, 4) == (1, 2)
    with pytest.raises(ValueError, match="one number per layer"):
        lighttransfer_layers({"lazy_ratio": 0.5, "lazy_scores": [0.1, 0.9]}, 4)


# ------------------------------------------------------------------------------ a tiny model
class Chars:
    """A character tokenizer for a 128-token vocabulary (ASCII; anything else is '?')."""

    eos_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [ord(c) if ord(c) < 128 else 63 for c in text]

    def __call__(self, text, add_special_tokens=False, return_tensors="pt"):
        return transformers.BatchEncoding({"input_ids": torch.tensor([self.encode(text)])})

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(int(i)) for i in ids)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048)
    cfg._attn_implementation = "sdpa"
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens
    return model, Chars()


LENGTH = 512


def policy_cell(policy, budget, length=LENGTH, sample=0, **overrides):
    return Cell("tiny", "full", "passkey", length, sample, 0, {}, policy, budget,
                policy_config(policy, budget, length, overrides))


def test_policy_cell_computes_the_expected_fields(tiny):
    model, tok = tiny
    job = ArenaJob(model, tok, model_name="tiny", fidelity=False, timing=True, decode_tokens=2)
    m = job(policy_cell("streaming", "25%"))
    T, new = m["prompt_tokens"], m["generated_tokens"]
    assert abs(T - LENGTH) <= 6 and new == 16  # passkey replies get 16 tokens
    per_token = 2 * 2 * 2 * 16 * 4  # layers x (K and V) x KV heads x head dim x fp32 bytes
    assert m["full_kv_bytes"] == (T + new - 1) * per_token  # the last token is never fed back
    assert m["kv_bytes"] == 128 * per_token < m["full_kv_bytes"]  # 4 sinks + 124 recent
    assert m["kv_ratio"] == pytest.approx(128 / (T + new - 1))
    assert 0 < m["bytes_read"] < m["full_bytes_read"] and 0 < m["read_ratio"] < 0.3
    assert m["score"] in (0.0, 1.0) and isinstance(m["reply"], str)
    assert abs(m["kl_prefill"]) < 1e-9  # the prefill attends to the whole prompt
    assert m["kl"] is not None and m["kl"] > 1e-7  # the first decoding step reads the evicted cache
    assert m["decode_ms_per_token"] > 0 and m["prefill_ms"] > 0 and m["peak_bytes"] is None  # CPU
    assert m["policy_resolved"] == "StreamingPolicy(sinks=4, window=124)"
    assert "layer_rel_error" not in m  # no per-layer fidelity for policy cells

    full = job(Cell("tiny", "full", "passkey", LENGTH, 0, 0, {}, "full", None, {}))
    assert full["kv_ratio"] == 1.0 and full["read_ratio"] == 1.0 and abs(full["kl"]) < 1e-9

    quest = job(policy_cell("quest", "25%", dense_layers=0))
    assert quest["kv_ratio"] == 1.0 and quest["read_ratio"] < 0.5  # keeps all, reads the top pages
    lazy = job(policy_cell("lighttransfer", "25%"))
    assert lazy["kv_bytes"] < lazy["full_kv_bytes"]


def test_store_key_has_policy_and_budget_and_reruns_do_not_recompute(tiny, tmp_path):
    model, tok = tiny
    job = ArenaJob(model, tok, model_name="tiny", fidelity=False, timing=False)
    calls = Counter()

    def compute(cell):
        calls[cell.key] += 1
        return job(cell)

    cells = [policy_cell("h2o", "10%"), policy_cell("h2o", "25%")]
    with ResultStore(tmp_path / "k.sqlite") as store:
        assert run_grid(cells, compute, store, progress=False)["computed"] == 2
        assert run_grid(cells, compute, store, progress=False) == {"total": 2, "skipped": 2, "computed": 0, "failed": 0}
        rows = list(store.rows())
    assert sorted(r["budget"] for r in rows) == ["10%", "25%"] and set(calls.values()) == {1}
    assert {r["policy"] for r in rows} == {"h2o"} and {r["method"] for r in rows} == {"full"}
    assert sorted((r["policy_config"]["heavy"], r["policy_config"]["recent"]) for r in rows) == [(25, 26), (64, 64)]
    assert rows[0]["metrics"]["kv_bytes"] < rows[0]["metrics"]["full_kv_bytes"]


def test_cell_keys_include_policy_fields_and_method_keys_are_unchanged():
    a = policy_cell("streaming", "25%")
    for other in (policy_cell("streaming", "10%"), policy_cell("h2o", "25%"), policy_cell("streaming", "25%", sinks=8),
                  Cell("tiny", "full", "passkey", LENGTH, 0, 0, {})):
        assert other.key != a.key
    assert Cell("tiny", "full", "passkey", LENGTH, 0, 0, {}, "streaming", "25%", {"window": 124, "sinks": 4}).key == a.key
    # a method cell hashes exactly the fields it had before policies existed
    m = Cell("m", "moba", "niah", 1024, 2, 1, {"top_k": 3})
    legacy = {"model": "m", "method": "moba", "task": "niah", "length": 1024, "sample": 2, "seed": 1,
              "config": canonical_json({"top_k": 3})}
    assert m.key == hashlib.sha256(canonical_json(legacy).encode()).hexdigest()[:32]
    with pytest.raises(ValueError, match="method 'full'"):
        Cell("m", "moba", "niah", 1024, 0, 0, {}, "h2o", "25%", {"heavy": 1, "recent": 1})
    with pytest.raises(ValueError, match="no budget"):
        Cell("m", "full", "niah", 1024, 0, 0, {}, None, "25%")


def test_a_store_written_before_policies_still_loads_and_resumes(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.executescript("""
        CREATE TABLE results (key TEXT PRIMARY KEY, model TEXT NOT NULL, method TEXT NOT NULL,
            config TEXT NOT NULL, task TEXT NOT NULL, length INTEGER NOT NULL, sample INTEGER NOT NULL,
            seed INTEGER NOT NULL, metrics TEXT NOT NULL, duration_s REAL NOT NULL,
            finished_at TEXT NOT NULL, env TEXT NOT NULL);""")
    old = Cell("m", "moba", "niah", 1024, 0, 0, {"top_k": 2})
    db.execute("INSERT INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
               (old.key, "m", "moba", '{"top_k":2}', "niah", 1024, 0, 0, '{"score":1.0}', 0.1, "t", "{}"))
    db.commit()
    db.close()
    with ResultStore(path) as store:
        assert store.done_keys() == {old.key}
        (row,) = store.rows()
        assert (row["policy"], row["budget"], row["policy_config"]) == (None, None, {})
        assert row["config"] == {"top_k": 2} and row["metrics"] == {"score": 1.0}
        assert store.add(policy_cell("streaming", "25%"), {"score": 0.0}, 0.1)
        assert not store.add(old, {"score": 0.0}, 0.1)
        assert summarize(store.rows())[0]["accuracy"] == 1.0  # method rows only
    with ResultStore(path) as store:  # reopening does not add the columns twice
        assert store.count() == 2


# ------------------------------------------------------------------------------ CLI
def test_cli_runs_policies_at_budgets_and_resumes(tiny, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from longattn import models
    from longattn.cli import app

    model, tok = tiny
    monkeypatch.setattr(models, "load", lambda *a, **k: (model, tok))
    runner = CliRunner()
    args = ["arena", "--model", "tiny", "--policies", "streaming,h2o", "--budgets", "10%,25%", "--tasks", "passkey",
            "--lengths", "512", "--samples", "1", "--no-timing", "--no-fidelity", "--device", "cpu",
            "--store", str(tmp_path / "c.sqlite")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "5 cells, 0 already" in first.output  # full attention + 2 policies x 2 budgets
    flat = " ".join(first.output.split())  # the console wraps long lines
    assert "KV memory / full" in flat and "| streaming | 25% |" in flat
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "5 cells, 5 already" in second.output
    with ResultStore(tmp_path / "c.sqlite") as store:
        rows = list(store.rows())
    assert sorted((r["policy"] or "-", r["budget"] or "-") for r in rows) == [
        ("-", "-"), ("h2o", "10%"), ("h2o", "25%"), ("streaming", "10%"), ("streaming", "25%")]
    rep = runner.invoke(app, ["report", "--store", str(tmp_path / "c.sqlite"), "--out", str(tmp_path / "r")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "r" / "accuracy_vs_kv_memory_passkey.png").exists()
    for bad, message in (("0", "at least 1 token"), ("150%", "percentage in"), ("lots", "not understood")):
        out = runner.invoke(app, args[:6] + [bad] + args[7:])  # args[6]: the --budgets value
        assert out.exit_code != 0 and message in " ".join(out.output.replace("│", " ").split()), out.output


# ------------------------------------------------------------------------------ report
def fill(store):
    """Full attention (method rows) and two policies at three budgets on one task, two lengths."""
    for length in (1024, 2048):
        for s in range(2):
            store.add(Cell("m", "full", "niah", length, s, 0, {}), {"score": 1.0, "prefill_ms": 10.0}, 0.1)
            for policy, budgets in (("streaming", ("10%", "25%", "50%")), ("duo", ("25%", "50%"))):
                for b in budgets:
                    frac = float(b[:-1]) / 100
                    store.add(
                        Cell("m", "full", "niah", length, s, 0, {}, policy, b, policy_config(policy, b, length)),
                        {"score": float(s == 0 or frac >= 0.5), "kv_ratio": frac + 0.01 * s,
                         "read_ratio": frac, "kl": 0.1 * s, "decode_ms_per_token": 3.0 + s,
                         "kv_bytes": int(frac * 1000), "full_kv_bytes": 1000, "peak_bytes": None}, 0.1)


def test_report_renders_the_policy_table_and_the_kv_memory_plot(tmp_path):
    with ResultStore(tmp_path / "p.sqlite") as store:
        fill(store)
        lines = summarize_policies(store.rows())
    assert len(lines) == 2 * 5
    line = next(l for l in lines if l["name"] == "streaming" and l["budget"] == "25%" and l["length"] == 1024)
    assert line["n"] == 2 and line["accuracy"] == 0.5 and line["kv_ratio"] == pytest.approx(0.255)
    assert line["read_ratio"] == pytest.approx(0.25) and line["kl"] == pytest.approx(0.05)
    assert line["decode_ms_per_token"] == 3.5 and line["peak_gib"] is None
    assert [l["budget"] for l in lines if l["name"] == "streaming" and l["length"] == 1024] == ["10%", "25%", "50%"]
    assert next(l for l in lines if l["name"] == "duo")["policy"] == "duo (uncalibrated)"

    paths = render(tmp_path / "p.sqlite", tmp_path / "report")
    png = paths["accuracy_vs_kv_memory_niah.png"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = paths["report.md"].read_text()
    assert "## KV-cache policies" in md and "| policy | budget | policy config |" in md
    assert "KV memory / full" in md and "bytes read / full" in md and "decode ms/token" in md
    assert md.count("| streaming | 25% |") == 2 and md.count("| duo (uncalibrated) | 50% |") == 2
    assert "Per-layer fidelity is not measured for policy cells" in md
    assert "![accuracy_vs_kv_memory_niah.png](accuracy_vs_kv_memory_niah.png)" in md
    assert "| full |  | niah | 1024 |" in md  # the method table, still there
    page = paths["report.html"].read_text()
    assert "<h2>KV-cache policies</h2>" in page and 'alt="accuracy_vs_kv_memory_niah.png"' in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)


def test_report_of_a_store_with_policy_rows_only(tmp_path):
    with ResultStore(tmp_path / "o.sqlite") as store:
        store.add(policy_cell("streaming", "25%"), {"score": 1.0, "kv_ratio": 0.25, "read_ratio": 0.25}, 0.1)
    paths = render(tmp_path / "o.sqlite", tmp_path / "r")
    assert set(p for p in paths if p.endswith(".png")) == {"accuracy_vs_kv_memory_passkey.png"}
    assert "| streaming | 25% |" in paths["report.md"].read_text()


def test_calibrate_files_feed_duo_and_lighttransfer_cells(tmp_path):
    from longattn.analysis.calibrate import Calibration, save_calibration
    from longattn.arena.budget import duo_scores, lighttransfer_layers

    alpha = [[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]]
    duo = save_calibration(Calibration(model="tiny", method="duo", ratio=0.5, data={
        "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "alpha": alpha,
        "retrieval": [[True, False], [False, False], [False, True]], "sink": 4, "window": 16}), tmp_path / "duo.json")
    assert duo_scores({"retrieval_heads": str(duo)}, 3, 2) == alpha
    lazy = save_calibration(Calibration(model="tiny", method="lighttransfer", ratio=0.5, data={
        "num_layers": 3, "num_heads": 4, "num_kv_heads": 2, "lazy_mass": [0.2, 0.9, 0.95],
        "lazy": [False, True, True], "sink": 4, "window": 60}), tmp_path / "lt.json")
    assert lighttransfer_layers({"lazy_ratio": 0.67, "lazy_scores": str(lazy)}, 3) == (1, 2)  # the laziest two
    with pytest.raises(ValueError, match="is a 'lighttransfer' calibration; retrieval_heads needs 'duo'"):
        duo_scores({"retrieval_heads": str(lazy)}, 3, 2)
