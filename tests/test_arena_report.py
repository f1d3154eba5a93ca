"""The arena report: summary numbers against an independent computation, files written."""

from __future__ import annotations

import base64
import re

import pytest

pytest.importorskip("matplotlib")

from longattn.arena.report import render, summarize  # noqa: E402
from longattn.arena.store import Cell, ResultStore  # noqa: E402


def fill(store):
    expected = {}
    for method, config, prefill in (("full", {}, 100.0), ("moba", {"top_k": 2}, 25.0)):
        for length in (1024, 2048):
            scores = []
            for s in range(4):
                score = float((s + length // 1024 + len(method)) % 2)
                depth = s / 3
                scores.append(score)
                store.add(
                    Cell("m", method, "niah", length, s, 0, config),
                    {"score": score, "depth": depth, "density": 1.0 if method == "full" else 0.25,
                     "kl": 0.0 if method == "full" else 0.1 * s, "prefill_ms": prefill * length / 1024 + s,
                     "decode_ms_per_token": 5.0, "peak_bytes": 2**30 * length / 1024,
                     "layer_rel_error": [0.0, 0.0] if method == "full" else [0.1 * s, 0.2 * s],
                     "layer_mass_recall": [1.0, 1.0] if method == "full" else [0.9, 0.8]},
                    0.1,
                )
            expected[(method, length)] = sum(scores) / len(scores)
    return expected


def test_summary_means_and_speedups(tmp_path):
    with ResultStore(tmp_path / "a.sqlite") as store:
        expected = fill(store)
        summary = summarize(store.rows())
    assert len(summary) == 4
    for line in summary:
        assert line["n"] == 4
        assert line["accuracy"] == pytest.approx(expected[(line["method"], line["length"])])
        prefill = {"full": 100.0, "moba": 25.0}[line["method"]] * line["length"] / 1024
        assert line["prefill_ms"] == pytest.approx(prefill + 1.5)  # median of +0..+3
        full_prefill = 100.0 * line["length"] / 1024 + 1.5
        assert line["speedup"] == pytest.approx(full_prefill / (prefill + 1.5))
        if line["method"] == "moba":
            assert line["rel_error"] == pytest.approx(sum(0.15 * s for s in range(4)) / 4)
            assert line["mass_recall"] == pytest.approx(0.85)
            assert line["config"] == '{"top_k":2}'


def test_render_writes_markdown_html_and_plots(tmp_path):
    with ResultStore(tmp_path / "a.sqlite") as store:
        fill(store)
    paths = render(tmp_path / "a.sqlite", tmp_path / "report")
    for name in ("accuracy_by_length.png", "accuracy_by_depth.png", "fidelity_per_layer.png", "pareto.png"):
        assert paths[name].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    md = paths["report.md"].read_text()
    assert md.count("| moba |") == 2 and "![pareto.png](pareto.png)" in md
    page = paths["report.html"].read_text()
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 4 and all(base64.b64decode(i)[:4] == b"\x89PNG" for i in images)


def test_render_empty_store_says_what_to_do(tmp_path):
    ResultStore(tmp_path / "e.sqlite").close()
    with pytest.raises(ValueError, match="run `longattn arena` first"):
        render(tmp_path / "e.sqlite", tmp_path / "r")
