"""transformers integration on tiny randomly initialised models of several families."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is part of make test's install")

import longattn.hf as lh  # noqa: E402


from .conftest import tiny_causal_lm  # noqa: E402

tiny = tiny_causal_lm


FAMILIES = [
    ("llama", {}),
    ("llama", {"head_dim": 256}),  # head dim 256 (hidden 64 projected to 4 x 256)
    ("qwen2", {}),
    ("mistral", {"sliding_window": None}),
]


def ids(T, seed=0):
    return torch.randint(0, 128, (1, T), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family,extra", FAMILIES, ids=["llama", "llama-d256", "qwen2", "mistral"])
def test_full_reproduces_sdpa_logits_and_generation(family, extra):
    model = tiny(family, **extra)
    x = ids(300)
    with torch.no_grad():
        ref = model(x).logits
        ref_gen = model.generate(x[:, :40], max_new_tokens=16, do_sample=False)
        lh.apply(model, "full", backend="reference")
        assert model.config._attn_implementation == "longattn"
        out = model(x).logits
        gen = model.generate(x[:, :40], max_new_tokens=16, do_sample=False)
    assert (out - ref).abs().max().item() < 1e-4
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("family,extra", FAMILIES, ids=["llama", "llama-d256", "qwen2", "mistral"])
@pytest.mark.parametrize("method,config", [
    ("window", {"window": 4096}),
    ("sink", {"sink": 4, "window": 4096}),
    ("topk", {"block_size": 64, "top_k": 64}),
    ("moba", {"block_size": 64, "top_k": 64}),
    ("bigbird", {"block_size": 64, "num_random_blocks": 64}),
])
def test_budget_covering_the_context_reproduces_full(family, extra, method, config):
    model = tiny(family, **extra)
    x = ids(300, seed=1)
    with torch.no_grad():
        ref = model(x).logits
        lh.apply(model, method, **config)
        out = model(x).logits
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("method,config", [
    ("window", {"window": 32}),
    ("sink", {"sink": 4, "window": 32}),
    ("topk", {"block_size": 32, "top_k": 2}),
    ("moba", {"block_size": 32, "top_k": 2}),
    ("bigbird", {"block_size": 32, "num_random_blocks": 1}),
    ("nsa", {"num_selected": 3, "window": 32, "select_block": 32}),
])
def test_sparse_prefill_and_decoding_go_through_the_method(method, config, monkeypatch):
    """Every forward, including each decoding step (one query over the cache), calls the
    method. Where a query's keys depend on that query alone (all but block top-k, whose
    gate averages the queries of a block: a decoding query is a block of its own), the
    cached decoding equals a from-scratch recomputation with the same method."""
    import longattn

    model = tiny("llama")
    lh.apply(model, method, **config)
    calls = []
    real = longattn.attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[2], k.shape[2], kw["method"]))
        return real(q, k, v, **kw)

    monkeypatch.setattr(longattn, "attention", spy)
    x = ids(150, seed=2)
    with torch.no_grad():
        gen = model.generate(x, max_new_tokens=8, do_sample=False)
        # the same tokens by full recomputation (no cache) with the same sparse method
        seq = x
        for _ in range(8):
            nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert gen.shape == seq.shape == (1, 158)
    if method != "topk":
        assert torch.equal(gen, seq)
    decode_calls = [c for c in calls if c[0] == 1]
    assert len(decode_calls) >= 7 * 2 and all(c[2] == method for c in calls)
    assert any(c[1] > 150 for c in decode_calls)  # one query over a longer cache


def test_per_layer_and_per_head_plans():
    model = tiny("llama")
    lh.apply(model, "full")
    lh.apply(model, "moba", layers=[1], heads=[2, 3], block_size=32, top_k=2)
    plan = lh.plan_of(model)
    assert [p.method for p in plan[0]] == ["full"]
    assert sorted((p.method, p.heads) for p in plan[1]) == [("full", (0, 1)), ("moba", (2, 3))]
    x = ids(200, seed=3)
    with torch.no_grad():
        mixed = model(x).logits
        lh.apply(model, "full")
        full = model(x).logits
    assert (mixed - full).abs().max() > 1e-3  # the sparse heads really changed the result


def test_plan_errors():
    model = tiny("llama")
    with pytest.raises(ValueError, match=r"heads must be whole GQA groups of 2"):
        lh.apply(model, "moba", heads=[1, 2])
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        lh.apply(model, "full", layers=[5])
    with pytest.raises(TypeError, match="unknown config"):
        lh.apply(model, "window", size=3)


@pytest.mark.parametrize("method,covering,small", [
    ("topk", {"block_size": 16, "top_k": 64}, {"block_size": 16, "top_k": 2}),
    ("moba", {"block_size": 16, "top_k": 64}, {"block_size": 16, "top_k": 2}),
    ("sink", {"sink": 4, "window": 4096}, {"sink": 4, "window": 8}),
])
def test_sliding_window_layers_keep_their_mask(method, covering, small):
    """Mistral with a 16-token sliding window: 'full' applies the model's window mask
    exactly; a selection method intersects it with its own keys (a covering budget gives the
    windowed model exactly, a small one changes it and decodes); NSA refuses."""
    model = tiny("mistral", sliding_window=16)
    x = ids(100, seed=4)
    with torch.no_grad():
        ref = model(x).logits
        lh.apply(model, "full", backend="reference")
        assert (model(x).logits - ref).abs().max().item() < 1e-4
        lh.apply(model, method, **covering)
        assert (model(x).logits - ref).abs().max().item() < 1e-4
        lh.apply(model, method, **small)
        assert (model(x).logits - ref).abs().max().item() > 1e-3
        assert model.generate(x, max_new_tokens=4, do_sample=False).shape == (1, 104)
        lh.apply(model, "nsa", num_selected=3, window=16)
        with pytest.raises(NotImplementedError, match="not the plain causal mask"):
            model(x)


def test_padded_batch_with_a_selection_method_matches_unpadded_rows():
    """Left padding: each row of a padded batch equals that sequence run alone (a covering
    budget, so the selection of the padded row cannot differ)."""
    model = tiny("llama")
    lh.apply(model, "moba", block_size=32, top_k=64)
    a, b = ids(60, seed=6), ids(45, seed=7)
    pad = torch.zeros(1, 15, dtype=torch.long)
    batch = torch.cat([a, torch.cat([pad, b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :15] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask).logits
        alone = model(b).logits
    assert (out[1, 15:] - alone[0]).abs().max().item() < 1e-4
