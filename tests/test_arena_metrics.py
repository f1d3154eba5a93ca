"""Arena metrics on a tiny Llama: exact for full attention, independently recomputed for a
sparse method."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import longattn.hf as lh  # noqa: E402
from longattn.arena.metrics import layer_fidelity, logit_kl, prefill_and_decode_times  # noqa: E402

from .test_hf import ids, tiny  # noqa: E402


def test_full_attention_has_zero_error_full_recall_and_zero_kl():
    model = tiny("llama")
    x = ids(200)
    with torch.no_grad():
        ref = model(x).logits
    lh.apply(model, "full")
    rows = layer_fidelity(model, x)
    assert [r["layer"] for r in rows] == [0, 1]
    for r in rows:
        assert r["rel_error"] < 1e-6 and abs(r["mass_recall"] - 1) < 1e-6
    with torch.no_grad():
        assert abs(logit_kl(ref[:, -1], model(x).logits[:, -1])) < 1e-10


def test_window_recall_matches_an_independent_computation():
    model = tiny("llama")
    x = ids(200, seed=5)
    w = 16
    lh.apply(model, "window", window=w, block_size=16)
    captured = {}

    def capture(layer, q, k, v, out, causal, scale, plan):
        captured[layer] = (q.clone(), k.clone(), v.clone(), out.clone(), scale)

    with torch.no_grad(), lh.attention_probe(capture):
        model(x, use_cache=False)
    rows = layer_fidelity(model, x)
    for layer, (q, k, v, out, scale) in captured.items():
        H, T = q.shape[1], q.shape[2]
        kk = k.repeat_interleave(H // k.shape[1], 1).double()
        vv = v.repeat_interleave(H // v.shape[1], 1).double()
        s = q.double() @ kk.transpose(-1, -2) * scale
        i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
        p = torch.softmax(s.masked_fill(j > i, float("-inf")), -1)
        recall = (p * ((j <= i) & (j > i - w))).sum(-1).mean().item()
        full = p @ vv
        err = ((out.double() - full).norm() / full.norm()).item()
        assert abs(rows[layer]["mass_recall"] - recall) < 1e-5
        assert abs(rows[layer]["rel_error"] - err) < 1e-4
        assert 0 < recall < 1 and err > 1e-3


def test_logit_kl_is_kl():
    a, b = torch.randn(3, 50, dtype=torch.float64), torch.randn(3, 50, dtype=torch.float64)
    pa, pb = a.softmax(-1), b.softmax(-1)
    expected = (pa * (pa.log() - pb.log())).sum(-1).mean().item()
    assert abs(logit_kl(a, b) - expected) < 1e-9 and logit_kl(a, a) < 1e-12


def test_times_are_measured():
    model = tiny("llama")
    lh.apply(model, "moba", block_size=32, top_k=2)
    t = prefill_and_decode_times(model, ids(100), new_tokens=3, repeats=2)
    assert t["prefill_ms"] > 0 and t["decode_ms_per_token"] > 0 and t["peak_bytes"] is None
