"""longattn.hf inside the real pretrained SmolLM2-135M (Llama architecture, GQA 9/3)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import longattn.hf as lh  # noqa: E402
from longattn import list_methods, models  # noqa: E402

try:
    models.gguf_path("smollm2-135m")
except models.ModelNotAvailableError as err:  # pragma: no cover - make test installs it
    pytest.skip(str(err), allow_module_level=True)

SMALL = {  # sparse at 512 tokens
    "full": {},
    "window": {"window": 128},
    "sink": {"sink": 4, "window": 124},
    "bigbird": {"block_size": 64, "num_random_blocks": 1},
    "topk": {"block_size": 64, "top_k": 2},
    "moba": {"block_size": 64, "top_k": 2},
    "nsa": {"num_selected": 3, "window": 64},
}
COVERING = {  # budgets covering all 512 tokens
    "window": {"window": 4096},
    "sink": {"window": 4096},
    "bigbird": {"block_size": 64, "num_random_blocks": 16},
    "topk": {"block_size": 64, "top_k": 16},
    "moba": {"block_size": 64, "top_k": 16},
}


@pytest.fixture(scope="module")
def smollm():
    model, tok = models.load("smollm2-135m")
    text = (
        "It is a truth universally acknowledged, that a single man in possession of a good "
        "fortune, must be in want of a wife. " * 40
    )
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[:, :512]
    assert ids.shape[1] == 512
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids).logits
        ref_gen = model.generate(ids[:, :200], max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    return model, tok, ids, ref, ref_gen


def test_full_reproduces_sdpa_logits_and_greedy_generation(smollm):
    model, tok, ids, ref, ref_gen = smollm
    lh.apply(model, "full")
    with torch.no_grad():
        out = model(ids).logits
        gen = model.generate(ids[:, :200], max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_token_id)
    assert (out - ref).abs().max().item() < 1e-4
    assert torch.equal(gen, ref_gen)


@pytest.mark.parametrize("method", sorted(COVERING))
def test_budget_covering_the_context_reproduces_full(smollm, method):
    model, tok, ids, ref, _ = smollm
    lh.apply(model, method, **COVERING[method])
    with torch.no_grad():
        out = model(ids).logits
    assert (out - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("method", list_methods())
def test_every_method_prefills_and_decodes(smollm, method):
    model, tok, ids, ref, _ = smollm
    lh.apply(model, method, **SMALL[method])
    with torch.no_grad():
        out = model(ids).logits
        gen = model.generate(ids[:, :300], max_new_tokens=4, do_sample=False, pad_token_id=tok.eos_token_id)
    assert torch.isfinite(out).all() and gen.shape == (1, 304)
    if method != "full":
        assert (out - ref).abs().max().item() > 1e-3  # the sparse pattern really changed something
