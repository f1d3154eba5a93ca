"""KV-cache policies (longattn.kv): each policy against an independent computation of what it
should keep and read, memory really released, and generate() inside tiny random models."""

from __future__ import annotations

import math

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="the hf extra is part of make test's install")

import longattn.hf as lh  # noqa: E402
import longattn.kv as kv  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")

SHAPE = kv.ModelShape(num_layers=1, num_heads=4, num_kv_heads=2, head_dim=8)  # GQA groups of 2
G = SHAPE.group
SCALE = SHAPE.head_dim ** -0.5


# ------------------------------------------------------------------------------ helpers
def stream(B=2, T=48, seed=0, shape=SHAPE):
    """A whole sequence of post-RoPE keys/values ``[B, Hkv, T, D]`` and queries ``[B, H, T, D]``."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, shape.num_kv_heads, T, shape.head_dim, generator=g)
    v = torch.randn(B, shape.num_kv_heads, T, shape.head_dim, generator=g)
    q = torch.randn(B, shape.num_heads, T, shape.head_dim, generator=g) * 2
    return k, v, q


def forward(cache, k, v, q, a, b, layer=0):
    """Tokens ``a..b-1`` through the cache: update, then attend."""
    cache.update(k[:, :, a:b], v[:, :, a:b], layer)
    return cache.attend(layer, q[:, :, a:b])


def softmax_read(q_vec, keys, values):
    """Plain fp64 softmax attention of one query vector over ``keys/values [n, D]``:
    ``(out [D], probabilities [n])``."""
    p = torch.softmax((keys.double() @ q_vec.double()) * SCALE, dim=0)
    return p @ values.double(), p


def expected_out(q, k, v, t, readable):
    """Output ``[B, H, D]`` of query ``t`` when (batch b, KV head j) reads token indices
    ``readable(b, j)``."""
    B, H = q.shape[:2]
    out = torch.zeros(B, H, q.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            idx = sorted(readable(b, h // G))
            out[b, h] = softmax_read(q[b, h, t], k[b, h // G, idx], v[b, h // G, idx])[0]
    return out


def prefill_ref(q, k, v, T):
    """Causal full attention over the first ``T`` tokens: ``[B, H, T, D]``."""
    B, H = q.shape[:2]
    out = torch.zeros(B, H, T, q.shape[-1], dtype=torch.float64)
    for t in range(T):
        out[:, :, t] = expected_out(q, k, v, t, lambda b, j: range(t + 1))
    return out


def kept(cache, layer=0, seg=0):
    """Token indices kept per (batch, KV head of the segment): nested lists."""
    return cache.layers[layer].segments[seg].pos.tolist()


from .conftest import tiny_causal_lm  # noqa: E402

tiny = tiny_causal_lm


def ids(T, seed=0, B=1):
    return torch.randint(0, 128, (B, T), generator=torch.Generator().manual_seed(seed))


def generate(model, x, cache=None, n=8, **kw):
    extra = {} if cache is None else {"past_key_values": cache}
    with torch.no_grad():
        out = model.generate(x, max_new_tokens=n, do_sample=False, output_scores=True,
                             return_dict_in_generate=True, **extra, **kw)
    return out.sequences, torch.stack(out.scores)


def reference(model, x, n=8, **kw):
    """Greedy generation with transformers' own SDPA attention and DynamicCache."""
    model.set_attn_implementation("sdpa")
    return generate(model, x, n=n, **kw)


# ------------------------------------------------------------------------------ streaming
def test_streaming_keeps_sinks_and_window_and_attends_exactly_to_them():
    sinks, window, T0, T = 3, 10, 20, 40
    k, v, q = stream(T=T)
    cache = kv.make_cache(SHAPE, "streaming", sinks=sinks, window=window)
    out = forward(cache, k, v, q, 0, T0)
    assert torch.allclose(out.double(), prefill_ref(q, k, v, T0), atol=1e-5)  # the prefill is exact
    sizes = []
    for t in range(T0, T):
        # before this step the cache held the sinks and the `window` newest of tokens 0..t-1
        held = set(range(sinks)) | set(range(t - window, t))
        out = forward(cache, k, v, q, t, t + 1)
        assert torch.allclose(out[:, :, 0].double(), expected_out(q, k, v, t, lambda b, j: held | {t}), atol=1e-5)
        want = sorted(set(range(sinks)) | set(range(t + 1 - window, t + 1)))
        assert kept(cache) == [[want] * 2] * 2  # every batch row and KV head
        sizes.append(cache.layers[0].segments[0].keys.shape[2])
    assert sizes == [sinks + window] * (T - T0)  # constant once full
    assert cache.get_seq_length() == T  # the true token count, not the kept count


def test_streaming_cache_stays_constant_in_generate_and_never_drops_the_sinks():
    model = tiny()
    cache = kv.make_cache(model, "streaming", sinks=4, window=12)
    x = ids(30)
    generate(model, x, cache, n=10)
    for layer in cache.layers:
        assert layer.seen == 39 and layer.segments[0].keys.shape == (1, 2, 16, 16)
        assert layer.segments[0].pos[0, 0].tolist() == [0, 1, 2, 3] + list(range(27, 39))


# ------------------------------------------------------------------------------ h2o
def h2o_simulation(q, k, v, heavy, recent, T0, T):
    """H2O by hand: per (batch, KV head) a dict token -> accumulated attention, softmax over
    the kept tokens, eviction to the `recent` newest + the `heavy` best older ones. Yields,
    per forward, the outputs [B, H, Tq, D] and the kept tokens per (b, KV head)."""
    B, H = q.shape[:2]
    Hkv = k.shape[1]
    score = [[{} for _ in range(Hkv)] for _ in range(B)]
    for a, b_ in [(0, T0)] + [(t, t + 1) for t in range(T0, T)]:
        out = torch.zeros(B, H, b_ - a, q.shape[-1], dtype=torch.float64)
        for b in range(B):
            for j in range(Hkv):
                for t in range(a, b_):
                    score[b][j][t] = 0.0
                for t in range(a, b_):
                    idx = sorted(p for p in score[b][j] if p <= t)
                    for h in range(j * G, (j + 1) * G):
                        o, p = softmax_read(q[b, h, t], k[b, j, idx], v[b, j, idx])
                        out[b, h, t - a] = o
                        for pos, pr in zip(idx, p.tolist()):
                            score[b][j][pos] += pr
                toks = sorted(score[b][j])
                if len(toks) > heavy + recent:
                    older = toks[: len(toks) - recent]
                    top = sorted(older, key=lambda p: -score[b][j][p])[:heavy]
                    keep = set(top) | set(toks[len(toks) - recent:])
                    score[b][j] = {p: s for p, s in score[b][j].items() if p in keep}
        yield out, [[sorted(score[b][j]) for j in range(Hkv)] for b in range(B)], score


def test_h2o_budget_per_head_and_heavy_hitters_match_an_independent_accumulation():
    heavy, recent, T0, T = 5, 4, 16, 30
    k, v, q = stream(T=T, seed=1)
    cache = kv.make_cache(SHAPE, "h2o", heavy=heavy, recent=recent)
    sim = h2o_simulation(q, k, v, heavy, recent, T0, T)
    for a, b_ in [(0, T0)] + [(t, t + 1) for t in range(T0, T)]:
        out = forward(cache, k, v, q, a, b_)
        want_out, want_kept, scores = next(sim)
        assert torch.allclose(out.double(), want_out, atol=1e-5)
        seg = cache.layers[0].segments[0]
        assert seg.keys.shape[2] <= heavy + recent  # budget respected for every head, every step
        assert kept(cache) == want_kept  # different tokens per head, the same count
        for b in range(2):
            for j in range(2):
                mine = dict(zip(seg.pos[b, j].tolist(), seg.score[b, j].tolist()))
                assert all(math.isclose(mine[p], s, abs_tol=1e-4) for p, s in scores[b][j].items())
    heads = [tuple(r) for r in kept(cache)[0]]
    assert heads[0] != heads[1]  # the heads really chose differently


def test_h2o_fractions_resolve_against_the_prompt_length():
    k, v, q = stream(T=40, seed=2)
    cache = kv.make_cache(SHAPE, "h2o", heavy=0.25, recent=0.1)
    forward(cache, k, v, q, 0, 40)
    layer = cache.layers[0]
    assert (layer.heavy, layer.recent) == (10, 4) and layer.segments[0].keys.shape[2] == 14


# ------------------------------------------------------------------------------ quest
def quest_page_scores(qt, keys, page):
    """Per KV head: Quest's bound of every page, summed over the group's query heads.
    ``qt [H, D]``, ``keys [Hkv, n, D]`` -> list of lists (plain loops, fp64)."""
    Hkv, n, _ = keys.shape
    scores = []
    for j in range(Hkv):
        row = []
        for p0 in range(0, n, page):
            kp = keys[j, p0:p0 + page].double()
            lo, hi = kp.min(0).values, kp.max(0).values
            row.append(sum(float(torch.maximum(qt[h].double() * lo, qt[h].double() * hi).sum())
                           for h in range(j * G, (j + 1) * G)))
        scores.append(row)
    return scores


def test_quest_reads_the_top_pages_by_bound_and_never_misses_a_higher_one():
    page, budget, T0, T = 4, 12, 30, 38
    k, v, q = stream(T=T, seed=3)
    cache = kv.make_cache(SHAPE, "quest", budget=budget, page_size=page, dense_layers=0)
    forward(cache, k, v, q, 0, T0)
    for t in range(T0, T):
        out = forward(cache, k, v, q, t, t + 1)
        pages, counts = cache.layers[0].last_selection
        assert counts.tolist() == [[3, 3]] * 2
        chosen = {}
        for b in range(2):
            bounds = quest_page_scores(q[b, :, t], k[b, :, : t + 1], page)
            for j in range(2):
                sel = pages[b, j].tolist()
                last = t // page  # the current token's page is always read
                ranked = sorted((p for p in range(last)), key=lambda p: -bounds[j][p])
                assert sorted(sel) == sorted([last] + ranked[: budget // page - 1])
                by_rank = [bounds[j][p] for p in sel if p != last]
                unread = [bounds[j][p] for p in range(last + 1) if p not in sel]
                assert max(unread) <= min(by_rank)  # the defining property
                chosen[b, j] = {i for p in sel for i in range(p * page, min((p + 1) * page, t + 1))}
        want = expected_out(q, k, v, t, lambda b, j: chosen[b, j])  # dense over the chosen pages only
        assert torch.allclose(out[:, :, 0].double(), want, atol=1e-5)
    assert cache.kv_bytes() == cache.full_kv_bytes()  # Quest keeps every entry
    assert 0 < cache.bytes_read() < cache.full_bytes_read()  # and reads fewer


def test_quest_budget_covering_the_cache_equals_full_attention():
    k, v, q = stream(T=24, seed=4)
    cache = kv.make_cache(SHAPE, "quest", budget=32, page_size=4, dense_layers=0)
    forward(cache, k, v, q, 0, 16)
    for t in range(16, 24):
        out = forward(cache, k, v, q, t, t + 1)
        assert torch.allclose(out[:, :, 0].double(), expected_out(q, k, v, t, lambda b, j: range(t + 1)), atol=1e-5)


# ------------------------------------------------------------------------------ recycled
def test_recycled_steps_read_the_top_k_of_the_last_full_step_plus_new_tokens():
    stride, top_k, T0, T = 3, 5, 16, 28
    k, v, q = stream(T=T, seed=5)
    cache = kv.make_cache(SHAPE, "recycled", stride=stride, top_k=top_k)
    forward(cache, k, v, q, 0, T0)
    full_at, pattern = T0 - 1, None

    def top_of(t):  # per (b, KV head): the top_k tokens of query t's full attention, summed over the group
        res = {}
        for b in range(2):
            for j in range(2):
                tot = sum(softmax_read(q[b, h, t], k[b, j, : t + 1], v[b, j, : t + 1])[1] for h in range(j * G, (j + 1) * G))
                res[b, j] = set(tot.topk(top_k).indices.tolist())
        return res

    pattern = top_of(full_at)
    for step, t in enumerate(range(T0, T), start=1):
        out = forward(cache, k, v, q, t, t + 1)
        layer = cache.layers[0]
        if step % stride == 0:
            readable = lambda b, j, t=t: range(t + 1)  # noqa: E731
            assert layer.last_step_full
        else:
            readable = lambda b, j, t=t, fa=full_at, pat=pattern: pat[b, j] | set(range(fa + 1, t + 1))  # noqa: E731
            assert not layer.last_step_full
        assert torch.allclose(out[:, :, 0].double(), expected_out(q, k, v, t, readable), atol=1e-5)
        if step % stride == 0:
            full_at, pattern = t, top_of(t)
    assert (layer.full_steps, layer.recycled_steps) == (4, 8)
    assert cache.bytes_read() < cache.full_bytes_read()


def test_recycled_similarity_trigger_forces_full_steps():
    k, v, q = stream(T=24, seed=6)
    always = kv.make_cache(SHAPE, "recycled", stride=100, top_k=3, threshold=1.0)
    never = kv.make_cache(SHAPE, "recycled", stride=100, top_k=3, threshold=-1.0)
    for cache in (always, never):
        forward(cache, k, v, q, 0, 16)
    for t in range(16, 24):
        out = forward(always, k, v, q, t, t + 1)
        forward(never, k, v, q, t, t + 1)
        assert torch.allclose(out[:, :, 0].double(), expected_out(q, k, v, t, lambda b, j: range(t + 1)), atol=1e-5)
    assert always.layers[0].triggered == always.layers[0].full_steps == 8
    assert never.layers[0].triggered == never.layers[0].full_steps == 0


def test_recycled_stride_one_is_full_decoding():
    model = tiny()
    x = ids(40, seed=7)
    ref_seq, ref_logits = reference(model, x, n=12)
    seq, logits = generate(model, x, kv.make_cache(model, "recycled", stride=1, top_k=2), n=12)
    assert torch.equal(seq, ref_seq)
    assert (logits - ref_logits).abs().max().item() < 1e-5


# ------------------------------------------------------------------------------ duo / lighttransfer
def test_duo_all_retrieval_is_full_and_all_streaming_is_streaming():
    model = tiny()
    x = ids(40, seed=8)
    ref_seq, ref_logits = reference(model, x)
    seq, logits = generate(model, x, kv.make_cache(model, "duo", retrieval=[[True, True]] * 2))
    assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max().item() < 1e-5
    duo = kv.make_cache(model, "duo", retrieval=[[False, False]] * 2, sinks=2, window=6)
    seq_d, logits_d = generate(model, x, duo)
    sc = kv.make_cache(model, "streaming", sinks=2, window=6)
    seq_s, logits_s = generate(model, x, sc)
    assert torch.equal(seq_d, seq_s) and torch.equal(logits_d, logits_s)
    assert duo.kv_bytes() == sc.kv_bytes() < sc.full_kv_bytes()


def test_duo_mixed_heads_keep_separate_tensors_of_different_lengths():
    model = tiny()
    cache = kv.make_cache(model, "duo", scores=[[0.9, 0.1], [0.2, 0.8]], retrieval_ratio=0.5, sinks=2, window=6)
    assert cache.policy.retrieval_flags() == ((True, False), (False, True))
    generate(model, ids(40, seed=9), cache)
    for layer, (ret, st) in zip(cache.layers, [(0, 1), (1, 0)]):
        by_heads = {seg.heads: seg for seg in layer.segments}
        assert by_heads[(ret,)].keys.shape == (1, 1, 47, 16)  # the retrieval head: every token
        assert by_heads[(st,)].keys.shape == (1, 1, 8, 16)  # the streaming head: 2 sinks + 6 recent
        assert by_heads[(st,)].pos[0, 0].tolist() == [0, 1] + list(range(41, 47))
    full = 2 * 2 * 47 * 16 * 4 * 2  # layers x KV heads x tokens x D x fp32 x (K and V)
    assert cache.full_kv_bytes() == full and cache.kv_bytes() == 2 * (47 + 8) * 16 * 4 * 2


def test_lighttransfer_bounds_lazy_layers_only():
    model = tiny()
    x = ids(40, seed=10)
    ref_seq, ref_logits = reference(model, x)
    seq, logits = generate(model, x, kv.make_cache(model, "lighttransfer"))
    assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max().item() < 1e-5
    cache = kv.make_cache(model, "lighttransfer", lazy_layers=[1], sinks=2, window=6)
    generate(model, x, cache)
    assert [layer.segments[0].keys.shape[2] for layer in cache.layers] == [47, 8]
    assert cache.kv_bytes() < cache.full_kv_bytes()


# ------------------------------------------------------------------------------ memory
@pytest.mark.parametrize("policy,config", [
    ("streaming", dict(sinks=4, window=16)),
    ("h2o", dict(heavy=8, recent=8)),
    ("duo", dict(retrieval=[[True, False], [False, False]], sinks=4, window=16)),
    ("lighttransfer", dict(lazy_layers=[0, 1], sinks=4, window=16)),
])
def test_evicting_policies_hold_fewer_bytes_than_full(policy, config):
    model = tiny()
    x = ids(100, seed=11)
    full = kv.make_cache(model, "full")
    generate(model, x, full, n=4)
    cache = kv.make_cache(model, policy, **config)
    generate(model, x, cache, n=4)
    assert full.kv_bytes() == full.full_kv_bytes() == cache.full_kv_bytes() == 2 * 2 * 103 * 16 * 4 * 2
    # what the tensors really hold, counted here from the stored tensors themselves
    held = sum(t.numel() * t.element_size() for layer in cache.layers for s in layer.segments for t in (s.keys, s.values))
    assert held == cache.kv_bytes() < full.kv_bytes()
    assert cache.kv_bytes() + cache.meta_bytes() < full.kv_bytes()


# ------------------------------------------------------------------------------ generate()
COVERING = {  # budgets covering prompt + generated tokens: every policy must equal full decoding
    "full": {},
    "streaming": dict(sinks=4, window=64),
    "h2o": dict(heavy=32, recent=32),
    "quest": dict(budget=64, page_size=8, dense_layers=0),
    "recycled": dict(stride=3, top_k=64),
    "duo": dict(retrieval=[[False, True], [True, False]], sinks=4, window=64),
    "lighttransfer": dict(lazy_layers=[0], sinks=4, window=64),
}
MODELS = [("llama", {}), ("llama", {"head_dim": 256}), ("qwen2", {})]


@pytest.mark.parametrize("family,extra", MODELS, ids=["llama", "llama-d256", "qwen2"])
def test_generate_with_covering_budgets_equals_full(family, extra):
    model = tiny(family, **extra)
    x = ids(36, seed=12)
    ref_seq, ref_logits = reference(model, x, n=10)
    assert sorted(COVERING) == kv.list_policies()
    for name, config in COVERING.items():
        cache = kv.make_cache(model, name, **config)
        seq, logits = generate(model, x, cache, n=10)
        assert torch.equal(seq, ref_seq), name
        assert (logits - ref_logits).abs().max().item() < 1e-5, name
        assert cache.get_seq_length() == 45


@pytest.mark.parametrize("name,config", [
    ("streaming", dict(sinks=2, window=8)),
    ("h2o", dict(heavy=4, recent=4)),
    ("quest", dict(budget=16, page_size=4, dense_layers=1)),
    ("recycled", dict(stride=4, top_k=6)),
    ("duo", dict(retrieval=[[True, False], [False, False]], sinks=2, window=8)),
])
def test_manual_prefill_and_decode_loop_equals_generate_with_true_positions(name, config):
    """A hand-written prefill + decode loop produces what generate() produces, whether the
    model derives each token's position from ``cache.get_seq_length()`` (the loop passes no
    position_ids) or the loop passes the true index; generate derives them from its attention
    mask. All three agree only if the cache reports the true token count although it keeps
    fewer entries. The small budgets really change the result."""
    model = tiny()
    x = ids(40, seed=13)
    _, ref_logits = reference(model, x, n=8)
    seq, logits = generate(model, x, kv.make_cache(model, name, **config), n=8)
    assert (logits - ref_logits).abs().max().item() > 1e-3
    for explicit_positions in (False, True):
        cache = kv.make_cache(model, name, **config)
        with torch.no_grad():
            out = model(x, past_key_values=cache, use_cache=True)
            steps, toks = [out.logits[:, -1]], [out.logits[:, -1].argmax(-1, keepdim=True)]
            for t in range(40, 47):
                extra = {"position_ids": torch.tensor([[t]])} if explicit_positions else {}
                out = model(toks[-1], past_key_values=cache, use_cache=True, **extra)
                steps.append(out.logits[:, -1])
                toks.append(out.logits[:, -1].argmax(-1, keepdim=True))
        assert cache.get_seq_length() == 47
        assert torch.equal(torch.cat([x] + toks, dim=1), seq)
        assert (torch.stack(steps) - logits).abs().max().item() < 1e-5


def test_left_padded_batch_rows_equal_their_unpadded_runs():
    """The model's padding mask is read at the kept entries' token indices."""
    model = tiny()
    a, b = ids(30, seed=14), ids(22, seed=15)
    batch = torch.cat([a, torch.cat([torch.zeros(1, 8, dtype=torch.long), b], 1)])
    mask = torch.ones_like(batch)
    mask[1, :8] = 0
    for name, config in [("full", {}), ("h2o", dict(heavy=40, recent=40))]:
        seq, logits = generate(model, batch, kv.make_cache(model, name, **config), n=6, attention_mask=mask)
        for row, alone in ((0, a), (1, b)):
            seq1, logits1 = generate(model, alone, kv.make_cache(model, name, **config), n=6)
            assert torch.equal(seq[row, -6:], seq1[0, -6:])
            assert (logits[:, row] - logits1[:, 0]).abs().max().item() < 1e-4


def test_sliding_window_model_mask_is_read_at_the_kept_token_indices():
    """Mistral with a 16-token sliding window: the model's window mask, indexed by token,
    still applies to the entries a cache keeps (a budget covering the window equals the
    model's own decoding)."""
    model = tiny("mistral", sliding_window=16)
    x = ids(40, seed=16)
    ref_seq, ref_logits = reference(model, x)
    for name, config in [("full", {}), ("streaming", dict(sinks=4, window=20)), ("h2o", dict(heavy=30, recent=30))]:
        seq, logits = generate(model, x, kv.make_cache(model, name, **config))
        assert torch.equal(seq, ref_seq) and (logits - ref_logits).abs().max().item() < 1e-5, name


def test_cache_refuses_a_model_that_does_not_hand_it_the_query():
    model = tiny()
    cache = kv.make_cache(model, "streaming", sinks=2, window=4)
    model.set_attn_implementation("sdpa")  # switched away after make_cache
    with torch.no_grad(), pytest.raises(RuntimeError, match="never attended through longattn"):
        model(ids(20), past_key_values=cache, use_cache=True)


def test_cache_refuses_a_sparse_method_plan_on_the_same_layer():
    model = tiny()
    lh.apply(model, "window", window=8)
    cache = kv.make_cache(model, "streaming", sinks=2, window=4)
    with torch.no_grad(), pytest.raises(NotImplementedError, match="not combined with the sparse method plan"):
        model(ids(20), past_key_values=cache, use_cache=True)


# ------------------------------------------------------------------------------ SmolLM2
def test_smollm2_evicting_caches_hold_a_fraction_of_the_full_cache():
    from longattn import models

    try:
        models.gguf_path("smollm2-135m")
    except models.ModelNotAvailableError as err:  # pragma: no cover - make test installs it
        pytest.skip(str(err))
    model, tok = models.load("smollm2-135m")
    model.generation_config.eos_token_id = None
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 60
    x = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :1000]
    assert x.shape[1] == 1000
    per_token = 30 * 3 * 64 * 4 * 2  # layers x KV heads (9 query / 3 KV) x D x fp32 x (K and V)
    for name, config, kept_tokens in [
        ("streaming", dict(sinks=4, window=252), 256),
        ("h2o", dict(heavy=128, recent=128), 256),
    ]:
        cache = kv.make_cache(model, name, **config)
        seq, logits = generate(model, x, cache, n=4, pad_token_id=0)
        assert seq.shape == (1, 1004) and torch.isfinite(logits).all()
        assert cache.get_seq_length() == 1003
        assert cache.full_kv_bytes() == 1003 * per_token
        assert cache.kv_bytes() == kept_tokens * per_token  # a quarter of the full cache


# ------------------------------------------------------------------------------ registry and bad input
def test_registry():
    assert kv.list_policies() == ["duo", "full", "h2o", "lighttransfer", "quest", "recycled", "streaming"]
    assert kv.get_policy("streaming") == kv.StreamingPolicy(sinks=4, window=1020)
    assert kv.get_policy("quest").page_size == 16 and kv.get_policy("h2o").heavy == 0.1
    assert kv.POLICIES["duo"] is kv.DuoPolicy
    from longattn.kv.cache import TAG

    assert lh._KV_TAG == TAG  # longattn.hf recognises the keys the cache hands out


BAD = [
    ("streaming", dict(window=0), "window must be an int >= 1"),
    ("streaming", dict(sinks=-1), "sinks must be an int >= 1"),
    ("streaming", dict(sinks=0), "sinks must be an int >= 1"),
    ("streaming", dict(window="8"), r"window must be an int >= 1, got '8' \(str\)"),
    ("streaming", dict(window=8.0), r"window must be an int >= 1, got 8.0 \(float\)"),
    ("streaming", dict(sinks=True), "sinks must be an int >= 1"),
    ("h2o", dict(heavy=0), "heavy must be an int >= 1"),
    ("h2o", dict(recent=1.5), r"recent as a float is a fraction of the prompt length and must lie in \(0, 1\]"),
    ("h2o", dict(heavy=None), "heavy must be a token count"),
    ("quest", dict(budget=0), "budget must be an int >= 1"),
    ("quest", dict(page_size=0), "page_size must be an int >= 1"),
    ("quest", dict(budget=20, page_size=16), "budget must be a multiple of page_size=16"),
    ("quest", dict(dense_layers=-1), "dense_layers must be an int >= 0"),
    ("recycled", dict(stride=0), "stride must be an int >= 1"),
    ("recycled", dict(top_k=-3), "top_k must be an int >= 1"),
    ("recycled", dict(threshold=1.5), r"threshold must be None or a cosine similarity in \[-1, 1\]"),
    ("duo", dict(), "give exactly one of retrieval"),
    ("duo", dict(retrieval=[[True]], scores=[[1.0]]), "give exactly one of retrieval"),
    ("duo", dict(retrieval=[[1, 0]]), r"retrieval\[0\] must hold bools"),
    ("duo", dict(scores="high"), "scores must be a list with one list per layer"),
    ("duo", dict(scores=[[1.0]], retrieval_ratio=2), r"retrieval_ratio must be a number in \[0, 1\]"),
    ("duo", dict(retrieval=[[True]], window=0), "window must be an int >= 1"),
    ("lighttransfer", dict(lazy_layers=[1, 1]), "lazy_layers must not repeat a layer"),
    ("lighttransfer", dict(lazy_layers=[-1]), "lazy_layers entries must be an int >= 0"),
    ("lighttransfer", dict(lazy_layers=3), "lazy_layers must be a list of layer indices"),
    ("lighttransfer", dict(sinks=0), "sinks must be an int >= 1"),
]


@pytest.mark.parametrize("name,config,message", BAD, ids=[f"{n}-{'-'.join(c) or 'none'}-{i}" for i, (n, c, _) in enumerate(BAD)])
def test_bad_policy_arguments(name, config, message):
    with pytest.raises(ValueError, match=message):
        kv.get_policy(name, **config)


def test_unknown_policy_name():
    with pytest.raises(ValueError, match=r"unknown KV policy 'sink'; known: \['duo', 'full'"):
        kv.get_policy("sink")


def test_unknown_policy_option():
    with pytest.raises(ValueError, match=r"policy 'streaming' has no option\(s\) \['size'\]; its options are \['sinks', 'window'\]"):
        kv.get_policy("streaming", size=3)


def test_duo_flags_must_match_the_model():
    model = tiny()
    with pytest.raises(ValueError, match="retrieval has 1 layers, the model has 2"):
        kv.make_cache(model, "duo", retrieval=[[True, False]])
    with pytest.raises(ValueError, match=r"retrieval\[1\] has 4 entries; give one per KV head \(2"):
        kv.make_cache(model, "duo", retrieval=[[True, False], [True, False, True, True]])


def test_lighttransfer_layers_must_exist():
    with pytest.raises(ValueError, match=r"lazy_layers \[5\] do not exist; the model has layers 0..1"):
        kv.make_cache(tiny(), "lighttransfer", lazy_layers=[0, 5])


def test_make_cache_rejects_options_beside_a_policy_object():
    with pytest.raises(ValueError, match="pass options either inside the policy object or with a policy name"):
        kv.make_cache(SHAPE, kv.StreamingPolicy(), window=3)


def test_attend_checks_the_query_shape():
    k, v, q = stream(T=8)
    cache = kv.make_cache(SHAPE, "full")
    cache.update(k, v, 0)
    with pytest.raises(ValueError, match=r"query must be \[B, 4, 8, 8\]"):
        cache.attend(0, q[:, :, :3])


def test_duo_and_lighttransfer_policies_from_calibration_files(tmp_path):
    from longattn.analysis.calibrate import Calibration, save_calibration
    from longattn.kv.duo import DuoPolicy
    from longattn.kv.lighttransfer import LightTransferPolicy

    flags = [[True, False], [False, False], [False, True]]
    duo = Calibration(model="tiny", method="duo", ratio=0.33,
                      data={"num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                            "alpha": [[0.9, 0.1], [0.2, 0.3], [0.1, 0.8]], "retrieval": flags,
                            "sink": 4, "window": 16})
    path = save_calibration(duo, tmp_path / "duo.json")
    policy = DuoPolicy.from_calibration(path)
    assert policy.retrieval_flags() == tuple(tuple(r) for r in flags)
    assert (policy.sinks, policy.window) == (4, 16)
    assert DuoPolicy.from_calibration(duo, window=32).window == 32

    lazy = Calibration(model="tiny", method="lighttransfer", ratio=0.5,
                       data={"num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
                             "lazy_mass": [0.2, 0.9, 0.95], "lazy": [False, True, True], "sink": 4, "window": 60})
    lt = LightTransferPolicy.from_calibration(save_calibration(lazy, tmp_path / "lt.json"))
    assert lt.lazy_layers == (1, 2) and (lt.sinks, lt.window) == (4, 60)
    with pytest.raises(ValueError, match="calibration is for method 'duo'"):
        LightTransferPolicy.from_calibration(path)
