"""longattn.analysis: entropy, sinks, head classes, retrieval scores, pictures, bad input.

Expected values come from independent computations: closed forms on hand-built attention,
dense float64 softmax of the same q/k, and transformers' own eager attention weights."""

from __future__ import annotations

import math
import struct

import pytest
import torch

pytest.importorskip("transformers")

from .analysis_helpers import CharTokenizer, dense_probs, pattern_qk, tiny_llama  # noqa: E402

from longattn.analysis import (  # noqa: E402
    AnalysisConfig, NeedleSpan, analyze_model, argmax_keys, classify_head, copy_paste_scores, entropy,
    layer_attention_stats, locate_needle, write_outputs,
)
from longattn.analysis.analyze import Prompt, check_length, needle_prompt, parse_index_list  # noqa: E402


# ------------------------------------------------------------------------------ entropy


def test_entropy_of_uniform_is_log_n_and_of_one_hot_is_zero():
    for n in (1, 2, 7, 1000):
        assert entropy(torch.full((n,), 1.0 / n, dtype=torch.float64)).item() == pytest.approx(math.log(n))
    one_hot = torch.zeros(50)
    one_hot[17] = 1.0
    assert entropy(one_hot).item() == 0.0


def test_layer_entropy_uniform_and_one_hot_patterns():
    T, D = 100, 128
    cfg = AnalysisConfig(window=8, chunk=32)
    # q = 0: every query spreads evenly over the keys it sees
    q = torch.zeros(1, 2, T, D)
    k = torch.randn(1, 1, T, D)
    st = layer_attention_stats(q, k, config=cfg)
    expected = sum(math.log(i + 1) for i in range(T)) / T
    assert st.entropy == pytest.approx([expected] * 2, rel=1e-5)
    assert st.norm_entropy == pytest.approx([1.0, 1.0], rel=1e-5)
    # q_i = k_i = 30 e_i: each query sees only itself
    eye = torch.eye(T, D) * 30.0
    st = layer_attention_stats(eye[None, None], eye[None, None], config=cfg, scale=1.0)
    assert st.entropy[0] < 1e-6 and st.norm_entropy[0] < 1e-6
    assert st.recent_mass[0] == pytest.approx(1.0)


def test_layer_stats_match_a_dense_float64_computation():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 6, 300, 16, generator=g) * 2
    k = torch.randn(2, 2, 300, 16, generator=g) * 2
    cfg = AnalysisConfig(window=16, chunk=64, sink_tokens=4)
    st = layer_attention_stats(q, k, config=cfg, picture_heads=[0, 5], max_pixels=60)
    p = dense_probs(q, k, 0.25)  # [B, H, T, T]
    ent = torch.special.entr(p).sum(-1)  # [B, H, T]
    n = torch.arange(1, 301, dtype=torch.float64)
    assert st.entropy == pytest.approx(ent.mean((0, 2)).tolist(), rel=1e-4)
    assert st.norm_entropy == pytest.approx((ent[..., 1:] / n[1:].log()).mean((0, 2)).tolist(), rel=1e-4)
    d = torch.arange(300)[:, None] - torch.arange(300)[None, :]
    rows = slice(16, None)  # queries that see beyond the window
    recent = ((d >= 0) & (d < 16)).double()
    assert st.recent_mass == pytest.approx((p * recent).sum(-1)[..., rows].mean((0, 2)).tolist(), rel=1e-4)
    far = (d >= 16).double()
    initial = (p * far)[..., :4].sum(-1)[..., rows].mean((0, 2))
    assert st.initial_mass == pytest.approx(initial.tolist(), rel=1e-4, abs=1e-9)
    # pictures: mean of each 5 x 5 tile
    assert st.picture_block == 5
    tiles = p.mean(0)[0].reshape(60, 5, 60, 5).mean((1, 3))
    assert torch.allclose(st.pictures[0].double(), tiles, atol=1e-6)


def test_entropy_on_a_tiny_model_matches_eager_attention_weights():
    model = tiny_llama(layers=2, heads=4, kv_heads=2, attn="eager")
    ids = torch.randint(0, 128, (1, 200), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        weights = model(ids, output_attentions=True).attentions  # per layer [1, H, T, T]
    cfg = AnalysisConfig(window=16, chunk=48)
    result = analyze_model(model, CharTokenizer(), Prompt(ids, {"kind": "ids"}), config=cfg,
                           picture_layers=[], picture_heads=[])
    n = torch.arange(1, 201, dtype=torch.float64)
    for layer, w in zip(result.layers, weights):
        ent = torch.special.entr(w[0].double()).sum(-1)  # [H, T]
        assert layer.entropy == pytest.approx(ent.mean(-1).tolist(), rel=1e-4)
        assert layer.norm_entropy == pytest.approx((ent[:, 1:] / n[1:].log()).mean(-1).tolist(), rel=1e-4)


# ------------------------------------------------------------------------------ sinks


def test_planted_middle_sink_is_found_with_its_position():
    g = torch.Generator().manual_seed(1)
    T, D, pos = 256, 32, 100
    q = torch.randn(1, 2, T, D, generator=g) * 0.3
    k = torch.randn(1, 1, T, D, generator=g) * 0.3
    u = torch.zeros(D)
    u[0] = 1.0
    q[..., 0] = 3.0  # every query leans along u ...
    k[0, 0, pos] = 3.0 * u  # ... and only key `pos` lies along it: logit 9 / sqrt(32) * ... big
    cfg = AnalysisConfig(window=16, sink_factor=10.0)
    st = layer_attention_stats(q, k, config=cfg, scale=1.0)
    assert st.head_sinks == [[pos], [pos]]
    entry = next(s for s in st.sinks if s.position == pos)
    assert not entry.initial and entry.heads == [0, 1] and entry.share > 0.5
    # the initial token is always listed, but here it is not a sink in any head
    first = next(s for s in st.sinks if s.position == 0)
    assert first.initial and first.heads == []
    # the sink counts as sink mass, not as distant "retrieval" mass
    assert min(st.sink_mass) > 0.5 and max(st.far_topk_mass) < 0.3


# ------------------------------------------------------------------------------ head classes


def test_head_classes_on_constructed_patterns():
    kinds = ["local", "streaming", "retrieval", "diffuse"]
    q, k = pattern_qk(320, kinds)
    cfg = AnalysisConfig(window=16, chunk=64)
    st = layer_attention_stats(q, k, config=cfg, scale=1.0)
    assert st.classify(cfg) == kinds
    local, streaming, retrieval, diffuse = range(4)
    assert st.recent_mass[local] > 0.99 and st.sink_mass[local] < 0.01
    assert 0.3 < st.sink_mass[streaming] < 0.7 and st.recent_mass[streaming] + st.sink_mass[streaming] > 0.99
    assert st.far_topk_mass[retrieval] > 0.6
    assert st.norm_entropy[diffuse] == pytest.approx(1.0, rel=1e-4)
    # a needle's retrieval score overrides the pattern rule, both ways
    assert classify_head(recent_mass=1.0, sink_mass=0.0, far_topk_mass=0.0, norm_entropy=0.1, config=cfg,
                         retrieval_score=0.5) == "retrieval"
    assert classify_head(recent_mass=0.0, sink_mass=0.0, far_topk_mass=0.9, norm_entropy=0.9, config=cfg,
                         retrieval_score=0.0) == "diffuse"


# ------------------------------------------------------------------------------ retrieval score


def test_copy_paste_retrieval_score_on_a_known_case():
    # prompt: answer tokens 7 8 9 at positions 10-12 and again at 20-22; token 8 also at 5
    ctx = [1] * 30
    ctx[10:13] = ctx[20:23] = [7, 8, 9]
    ctx[5] = 8
    span = NeedleSpan("789", [[10, 11, 12], [20, 21, 22]])
    generated = [7, 8, 9, 2]
    argmax = torch.tensor([[
        [10, 11, 12, 0],   # copies every answer token: 1
        [10, 10, 10, 10],  # copies only the first: 1/3
        [0, 5, 0, 0],      # right token (8) but outside the needle: 0
        [20, 11, 22, 3],   # mixes the two occurrences: still 1
        [11, 12, 10, 0],   # points into the needle at the wrong tokens: 0
    ]])  # [L=1, H=5, steps=4]
    scores = copy_paste_scores(argmax, generated, ctx, span)
    assert scores.tolist() == [[1.0, pytest.approx(1 / 3), 0.0, 1.0, 0.0]]
    with pytest.raises(ValueError, match="steps"):
        copy_paste_scores(argmax[..., :2], generated, ctx, span)


def test_argmax_keys_and_needle_location_feed_the_score():
    tok = CharTokenizer()
    prompt = "lorem ipsum. The code is 4821. dolor sit amet. The code is"
    needle = "The code is 4821."
    ids, span = locate_needle(tok, prompt, needle, "4821")
    assert span.occurrences == [[prompt.index("4821") + i for i in range(4)]]
    T = ids.shape[1]
    generated = [ord(c) for c in " 4821"]
    ctx = ids[0].tolist() + generated
    n = len(generated)
    # head 0 attends, at each generation step t (query row T-1+t), the needle token generated[t]
    # (and for the leading space, some earlier space); head 1 always the first key
    D = len(ctx)
    q = torch.zeros(1, 2, len(ctx), D)
    k = torch.eye(len(ctx), D)[None, None] * 50.0
    for t, w in enumerate(generated):
        target = prompt.index("4821") + t - 1 if t else prompt.index(" ")
        q[0, 0, T - 1 + t, target] = 1.0
        q[0, 1, T - 1 + t, 0] = 1.0
    am = argmax_keys(q, k, range(T - 1, T - 1 + n), scale=1.0)  # [1, 2, n]
    scores = copy_paste_scores(am[0][None], generated, ctx, span)
    assert scores.tolist() == [[1.0, 0.0]]
    with pytest.raises(ValueError, match="not in the prompt"):
        locate_needle(tok, prompt, "The code is 9999.", "9999")


# ------------------------------------------------------------------------------ pictures and output


def _png_size(path) -> tuple[int, int]:
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_analysis_writes_pictures_json_and_markdown(tmp_path):
    import json

    model = tiny_llama(layers=3, heads=4, kv_heads=2)
    ids = torch.randint(0, 128, (1, 700), generator=torch.Generator().manual_seed(5))
    result = analyze_model(model, CharTokenizer(), Prompt(ids, {"kind": "ids", "tokens": 700}),
                           model_name="tiny", config=AnalysisConfig(window=32), picture_layers=[0, 2],
                           picture_heads=[1, 3], max_pixels=100)
    paths = write_outputs(result, tmp_path)
    maps = sorted(p.name for p in tmp_path.glob("attn_*.png"))
    assert maps == ["attn_L00_H01.png", "attn_L00_H03.png", "attn_L02_H01.png", "attn_L02_H03.png"]
    assert result.layers[0].pictures[1].shape == (100, 100)  # 700 tokens in 7-token tiles
    for name in maps:
        assert _png_size(tmp_path / name) == (640, 560)
    assert _png_size(paths["entropy.png"])[0] > 0
    data = json.loads((tmp_path / "analysis.json").read_text())
    assert data["format"] == "longattn-analysis" and len(data["layers"]) == 3
    assert {h["class"] for layer in data["layers"] for h in layer["heads"]} <= {
        "retrieval", "streaming", "local", "diffuse", "mixed"}
    report = (tmp_path / "report.md").read_text()
    assert "## Per layer" in report and "## Sinks" in report and "attn_L02_H03.png" in report


# ------------------------------------------------------------------------------ bad input


def test_unknown_layer_index_is_an_error():
    model = tiny_llama(layers=2)
    ids = torch.randint(0, 128, (1, 64))
    with pytest.raises(ValueError, match=r"layer 5 does not exist; the model has layers 0\.\.1"):
        analyze_model(model, CharTokenizer(), Prompt(ids, {}), picture_layers=[5])


def test_unknown_head_index_is_an_error():
    model = tiny_llama(layers=2, heads=4)
    ids = torch.randint(0, 128, (1, 64))
    with pytest.raises(ValueError, match=r"head 4 does not exist; the model has query heads 0\.\.3"):
        analyze_model(model, CharTokenizer(), Prompt(ids, {}), picture_heads=[0, 4])
    with pytest.raises(ValueError, match="comma-separated integers"):
        parse_index_list("0,x", "--heads")


def test_length_below_16_is_an_error():
    from typer.testing import CliRunner

    from longattn.cli import app

    with pytest.raises(ValueError, match="at least 16"):
        check_length(8)
    with pytest.raises(ValueError, match="at least 16"):
        needle_prompt(CharTokenizer(), 15)
    res = CliRunner().invoke(app, ["analyze", "--length", "8", "--out", "unused"])
    assert res.exit_code != 0 and "below 16" in res.output


# ------------------------------------------------------------------------------ the real model


def test_smollm2_needle_analysis():
    """SmolLM2-135M on a 512-token NIAH prompt: it answers, some heads copy the needle,
    the first token is a sink in some layer, and the numbers are in range."""
    from longattn import models

    try:
        models.gguf_path("smollm2-135m")
    except models.ModelNotAvailableError as err:  # pragma: no cover - make test installs it
        pytest.skip(str(err))
    model, tok = models.load("smollm2-135m")
    prompt = needle_prompt(tok, 512, task="niah", haystack="synthetic")
    result = analyze_model(model, tok, prompt, model_name="smollm2-135m", picture_layers=[], picture_heads=[])
    assert result.answer["correct"], result.answer["reply"]
    assert len(result.layers) == 30 and all(l.num_heads == 9 and l.num_kv_heads == 3 for l in result.layers)
    best = max(s for l in result.layers for s in l.retrieval_score)
    assert best >= 0.5  # some head copies most of the answer
    assert any(0 in {s.position for s in l.sinks if s.heads} for l in result.layers)
    for l in result.layers:
        assert all(0.0 <= x <= 1.0 + 1e-6 for x in l.norm_entropy + l.recent_mass + l.sink_mass)
        assert all(0.0 <= r + s <= 1.0 + 1e-6 for r, s in zip(l.recent_mass, l.sink_mass))
