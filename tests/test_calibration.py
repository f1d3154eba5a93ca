"""longattn.analysis.calibrate: DuoAttention gates, LightTransfer lazy layers, retrieval-head
scores, calibration files, and applying them to a model (tiny random Llamas only)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")

import longattn  # noqa: E402
import longattn.hf as lh  # noqa: E402
from longattn.analysis import AnalysisConfig, layer_attention_stats  # noqa: E402
from longattn.analysis.calibrate import (  # noqa: E402
    Calibration, CalibrationError, apply_calibration, calibrate_duo, calibrate_headkv,
    calibrate_lighttransfer, check_ratio, duo_gates, duo_mixed_attention, lazy_layers, load_calibration,
    optimize_duo_gates, save_calibration, streaming_mask, top_fraction,
)

from .analysis_helpers import CharTokenizer, pattern_qk, tiny_llama  # noqa: E402


def _batches(n=2, T=96, rows=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 128, (1, T), generator=g), slice(T - rows, T)) for _ in range(n)]


# ------------------------------------------------------------------------------ DuoAttention


def test_duo_mixture_endpoints_are_full_and_the_sink_method():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 4, 100, 16, generator=g)
    k = torch.randn(1, 2, 100, 16, generator=g)
    v = torch.randn(1, 2, 100, 16, generator=g)
    full = longattn.attention(q, k, v, method="full", backend="reference")
    stream = longattn.attention(q, k, v, method="sink", sink=4, window=16, block_size=16, backend="reference")
    ones, zeros = torch.ones(2), torch.zeros(2)
    assert torch.allclose(duo_mixed_attention(q, k, v, ones, sink=4, window=16), full, atol=1e-5)
    assert torch.allclose(duo_mixed_attention(q, k, v, zeros, sink=4, window=16), stream, atol=1e-5)
    # one gate per KV head: KV head 0 (query heads 0, 1) full, KV head 1 (2, 3) streaming
    mixed = duo_mixed_attention(q, k, v, torch.tensor([1.0, 0.0]), sink=4, window=16)
    assert torch.allclose(mixed[:, :2], full[:, :2], atol=1e-5) and torch.allclose(mixed[:, 2:], stream[:, 2:], atol=1e-5)
    m = streaming_mask(6, 6, sink=1, window=2)
    assert m.int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0],
                                [1, 0, 1, 1, 0, 0], [1, 0, 0, 1, 1, 0], [1, 0, 0, 0, 1, 1]]


def test_duo_gates_at_one_reproduce_the_model_and_restore_its_attention():
    model = tiny_llama()
    x = _batches(1)[0][0]
    with torch.no_grad():
        ref = model(x).logits
        with duo_gates(model, torch.ones(2, 2), sink=4, window=16):
            assert model.config._attn_implementation == "longattn_duo"
            out = model(x).logits
            with duo_gates(model, torch.zeros(2, 2), sink=4, window=16):
                streamed = model(x).logits
    assert model.config._attn_implementation == "sdpa"
    assert (out - ref).abs().max() < 1e-4
    assert (streamed - ref).abs().max() > 1e-3


def test_duo_optimisation_decreases_its_loss_and_keeps_gates_in_unit_interval():
    model = tiny_llama()
    params = [p.detach().clone() for p in model.parameters()]
    res = optimize_duo_gates(model, _batches(), steps=12, lr=0.05, lam=0.05, sink=2, window=8)
    assert res.loss[-1]["loss"] < res.loss[0]["loss"]
    assert res.alpha.shape == (2, 2) and res.alpha.min() >= 0 and res.alpha.max() <= 1
    # the model is frozen during training and left as it was found
    assert all(torch.equal(a, b) and b.requires_grad for a, b in zip(params, model.parameters()))
    # without the penalty, gates started half way rise towards full attention, the loss falls
    res = optimize_duo_gates(model, _batches(), steps=12, lr=0.05, lam=0.0, sink=2, window=8, init=0.5)
    assert res.loss[-1]["distill"] < 0.5 * res.loss[0]["distill"]
    assert res.alpha.mean() > 0.6 and res.alpha.max() <= 1


def test_duo_with_a_large_penalty_sends_every_gate_to_streaming():
    model = tiny_llama()
    res = optimize_duo_gates(model, _batches(), steps=25, lr=0.1, lam=100.0, sink=2, window=8)
    assert res.alpha.max() < 0.05


# ------------------------------------------------------------------------------ LightTransfer


def test_lazy_layers_from_constructed_attention():
    cfg = AnalysisConfig(window=16, sink_tokens=4)
    patterns = {  # one "layer" per pattern
        "streaming": ["streaming"] * 4,
        "retrieval": ["retrieval"] * 4,
        "local": ["local"] * 4,
        "diffuse": ["diffuse", "diffuse", "retrieval", "local"],
    }
    mass = {}
    for name, kinds in patterns.items():
        q, k = pattern_qk(320, kinds)
        mass[name] = layer_attention_stats(q, k, config=cfg, scale=1.0).lazy_mass
    assert mass["streaming"] > 0.99 and mass["local"] > 0.99
    assert mass["retrieval"] < 0.4 and mass["diffuse"] < 0.5
    names = list(patterns)
    flags = lazy_layers([mass[n] for n in names], 0.5)
    assert {n for n, f in zip(names, flags) if f} == {"streaming", "local"}
    assert top_fraction([0.1, 0.9, 0.5, 0.9], 0.5) == [False, True, False, True]
    assert top_fraction([0.3, 0.2], 0.0) == [False, False]


# ------------------------------------------------------------------------------ end to end, files


@pytest.fixture(scope="module")
def tiny_and_tokenizer():
    return tiny_llama(), CharTokenizer()


def test_calibrations_round_trip_through_files(tmp_path, tiny_and_tokenizer):
    model, tok = tiny_and_tokenizer
    common = dict(model_name="tiny", length=400, samples=2)
    cals = [
        calibrate_duo(model, tok, steps=3, ratio=0.5, sink=2, window=16, **common),
        calibrate_lighttransfer(model, tok, ratio=0.5, window=16, task="passkey", **common),
        calibrate_headkv(model, tok, ratio=0.25, task="passkey", **common),
    ]
    for cal in cals:
        path = save_calibration(cal, tmp_path / f"{cal.method}.json")
        back = load_calibration(path)
        assert back.to_dict() == json.loads(json.dumps(cal.to_dict()))
        assert back.format == "longattn-calibration" and back.version == 1
        assert back.tool_version == longattn.__version__ and back.model == "tiny"
    duo, lt, hk = cals
    assert sum(map(sum, duo.data["retrieval"])) == 2  # half of 2 x 2 KV heads
    assert all(0 <= a <= 1 for row in duo.data["alpha"] for a in row) and len(duo.data["loss"]) == 3
    assert sum(lt.data["lazy"]) == 1 and len(lt.data["lazy_mass"]) == 2
    assert sum(map(sum, hk.data["retrieval"])) == 2  # a quarter of 2 x 4 heads
    assert hk.data["settings"]["correct"] == 0 and hk.data["settings"]["used_failed_samples"]


def _valid() -> dict:
    return Calibration(model="tiny", method="lighttransfer", ratio=0.5,
                       data={"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "lazy_mass": [0.9, 0.2],
                             "lazy": [True, False], "window": 16, "sink": 4}).to_dict()


@pytest.mark.parametrize("change,message", [
    (lambda d: d.update(format="something-else"), "not a calibration file"),
    (lambda d: d.update(version=2), "version 2 is not supported"),
    (lambda d: d.pop("date"), "missing the field 'date'"),
    (lambda d: d.update(method="magic"), "unknown method 'magic'"),
    (lambda d: d.update(ratio=1.5), "ratio must be a number in"),
    (lambda d: d["data"].pop("lazy"), "data.lazy is missing"),
    (lambda d: d["data"].update(lazy_mass=[0.1]), "one per layer"),
])
def test_load_rejects_bad_files_with_a_clear_message(tmp_path, change, message):
    d = _valid()
    change(d)
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(d))
    with pytest.raises(CalibrationError, match=message):
        load_calibration(path)
    path.write_text("{not json")
    with pytest.raises(CalibrationError, match="invalid JSON"):
        load_calibration(path)


def test_applying_calibrations_gives_the_planned_attention():
    model = tiny_llama()
    x = _batches(1, T=128)[0][0]
    with torch.no_grad():
        ref = model(x).logits
    base = {"num_layers": 2, "num_heads": 4, "num_kv_heads": 2, "sink": 4, "window": 16}
    all_full = Calibration("tiny", "duo", 1.0, dict(base, alpha=[[1, 1], [1, 1]], retrieval=[[True, True]] * 2))
    with torch.no_grad():
        assert (apply_calibration(model, all_full)(x).logits - ref).abs().max() < 1e-4
    duo = Calibration("tiny", "duo", 0.75, dict(base, alpha=[[1, 1], [1, 0]], retrieval=[[True, True], [True, False]]))
    apply_calibration(model, duo)
    plan = lh.plan_of(model)
    assert [p.method for p in plan[0]] == ["full"]
    assert sorted((p.method, p.heads) for p in plan[1]) == [("full", (0, 1)), ("sink", (2, 3))]
    lt = Calibration("tiny", "lighttransfer", 0.5, dict(base, lazy_mass=[0.9, 0.1], lazy=[True, False]))
    apply_calibration(model, lt)
    plan = lh.plan_of(model)
    assert [p.method for p in plan[0]] == ["sink"] and plan[0][0].config == {"sink": 4, "window": 16}
    assert [p.method for p in plan[1]] == ["full"]
    wrong = Calibration("tiny", "lighttransfer", 0.5, dict(base, num_layers=3, lazy_mass=[0.1] * 3, lazy=[False] * 3))
    with pytest.raises(ValueError, match="3 layers"):
        apply_calibration(model, wrong)


# ------------------------------------------------------------------------------ bad input


def test_bad_ratio_is_an_error(tiny_and_tokenizer):
    from typer.testing import CliRunner

    from longattn.cli import app

    for bad in (-0.1, 1.5, float("nan"), "half"):
        with pytest.raises(ValueError, match=r"ratio must"):
            check_ratio(bad)
    model, tok = tiny_and_tokenizer
    with pytest.raises(ValueError, match=r"ratio must lie in \[0, 1\]"):
        calibrate_duo(model, tok, model_name="tiny", length=400, ratio=2.0)
    res = CliRunner().invoke(app, ["calibrate", "--method", "duo", "--out", "unused.json", "--ratio", "1.5"])
    assert res.exit_code != 0 and "ratio must lie in [0, 1]" in res.output
