"""``backend="auto"``: the order of backends per device, method, mode and key length."""

from __future__ import annotations

import types

import pytest
import torch

import longattn
from longattn.api import resolve_backend
from longattn.auto import GPU_STEPS, SMALL_QUERY, auto_order
from longattn.registry import AttnInputs

from .conftest import rand_qkv


def fake_inputs(device: str, q_len: int, kv_len: int, grad: bool = False):
    """What auto_order reads from AttnInputs, on a device this machine may not have."""
    return types.SimpleNamespace(q=types.SimpleNamespace(device=torch.device(device)), q_len=q_len, kv_len=kv_len,
                                 needs_grad=grad)


def order(name, device="cuda", q_len=4096, kv_len=4096, grad=False):
    return auto_order(longattn.get_method(name), fake_inputs(device, q_len, kv_len, grad))


def test_cpu_and_few_queries_take_sdpa_then_the_reference():
    for name in longattn.list_methods():
        have = longattn.get_method(name).all_backends()
        assert order(name, device="cpu") == [b for b in ("sdpa", "reference") if b in have], name
        # on the GPU a decoding query past the mask's cap goes to the kernels, not the reference
        assert order(name, q_len=SMALL_QUERY, kv_len=100_000) == [b for b in ("sdpa", "triton", "reference")
                                                                   if b in have], name
    assert order("topk", q_len=SMALL_QUERY + 1, kv_len=100_000)[0] == "triton"


MASK = ["sdpa", "triton", "flex", "reference"]
OURS = ["triton", "flex", "sdpa", "reference"]


def test_block_sparse_kernels_take_over_at_the_break_even_length():
    # window: the kernels at every length in inference; in training the masked path below 4k
    assert order("window", kv_len=256) == order("window", kv_len=1 << 20) == OURS
    assert order("window", kv_len=4095, grad=True) == MASK
    assert order("window", kv_len=4096, grad=True) == OURS
    # top-k: the masked path below 1k, the kernels from 1k; in training Flex from 64k
    assert order("topk", kv_len=1023) == order("topk", kv_len=512, grad=True) == MASK
    assert order("topk", kv_len=1024) == order("topk", kv_len=1 << 20) == OURS
    assert order("topk", kv_len=65535, grad=True) == OURS
    assert order("topk", kv_len=65536, grad=True) == ["flex", "triton", "sdpa", "reference"]
    # sink: the kernels in inference, the masked path below 4k in training
    assert order("sink", kv_len=256) == order("sink", kv_len=1 << 20) == OURS
    assert order("sink", kv_len=4095, grad=True) == MASK and order("sink", kv_len=4096, grad=True) == OURS
    # BigBird: the kernels from 2k in inference, from 1k in training
    assert order("bigbird", kv_len=2047) == MASK and order("bigbird", kv_len=2048) == OURS
    assert order("bigbird", kv_len=1023, grad=True) == MASK and order("bigbird", kv_len=1024, grad=True) == OURS
    # chunked prefill: the key length decides, not the number of queries
    assert order("topk", q_len=64, kv_len=8192)[0] == "triton"
    assert order("bigbird", q_len=64, kv_len=1024)[0] == "sdpa"


def test_measured_orders_of_moba_nsa_and_full():
    assert order("moba", kv_len=1 << 17) == ["sdpa", "triton", "flex", "reference"]
    assert order("nsa", kv_len=1024) == order("nsa", kv_len=1 << 17, grad=True) == ["triton", "flex", "reference"]
    assert "full" not in GPU_STEPS
    assert order("full") == ["sdpa", "flex", "reference"]


def test_every_step_names_real_backends_in_increasing_length():
    for name, modes in GPU_STEPS.items():
        have = longattn.get_method(name).all_backends()
        assert set(modes) == {"infer", "train"}, name
        for steps in modes.values():
            starts = [s for s, _ in steps]
            assert starts[0] == 0 and starts == sorted(set(starts)), name
            for _, o in steps:
                assert o and set(o) <= set(have) and len(set(o)) == len(o), (name, o)


def test_auto_on_cpu_runs_the_sparse_method_through_its_masked_sdpa_path():
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 32, seed=2)
    spec = longattn.get_method("topk")
    cfg = spec.make_config(block_size=64, top_k=2)
    inputs = AttnInputs(q=q, k=k, v=v, causal=True, scale=32 ** -0.5)
    assert resolve_backend(spec, inputs, cfg, "auto") == "sdpa"  # CPU
    out = longattn.attention(q, k, v, method="topk", block_size=64, top_k=2)
    ref = longattn.attention(q, k, v, method="topk", block_size=64, top_k=2, backend="reference")
    assert (out - ref).abs().max().item() < 1e-5
    # on CPU the masked path serves whatever the size: the reference would materialise more
    from longattn.backends import dense

    old = dense.DENSE_MASK_MAX_BYTES
    dense.DENSE_MASK_MAX_BYTES = 1024
    try:
        assert resolve_backend(spec, inputs, cfg, "auto") == "sdpa"
    finally:
        dense.DENSE_MASK_MAX_BYTES = old


def test_a_backend_that_fails_to_compile_hands_over_to_the_next(monkeypatch):
    # Inductor can find no FlexAttention kernel for some inputs (seen on the H200); that is known
    # only when the call compiles, after the backend was chosen: the next backend must serve,
    # and flex must not be compiled again for the same call
    import dataclasses
    import warnings

    from longattn import registry
    from longattn.backends import flex as flex_mod
    from longattn.backends.flex import FlexCompileError, _no_kernel

    monkeypatch.setattr(flex_mod, "_FAILED", set())
    real = longattn.get_method("window")
    calls = []

    def no_kernel(inputs, config):
        calls.append(1)
        raise FlexCompileError("Inductor found no FlexAttention kernel (test)")

    fake = dataclasses.replace(real, backends={**real.backends, "flex": dataclasses.replace(real.backends["flex"],
                                                                                           impl=no_kernel)})
    monkeypatch.setitem(registry._REGISTRY, "window", fake)
    q, k, v = rand_qkv(1, 4, 2, 50, 80, 16, seed=4)
    ref = longattn.attention(q, k, v, method="window", window=20, backend="reference")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = longattn.attention(q, k, v, method="window", window=20, backend="flex")
    assert [str(w.message) for w in caught] == [
        "backend 'flex' failed on this call (Inductor found no FlexAttention kernel (test)); falling back"]
    assert (out - ref).abs().max().item() < 1e-5 and len(calls) == 1
    # the same call again: flex declines up front (one warning, no second compilation)
    with pytest.warns(RuntimeWarning, match=r"backend 'flex' cannot serve this call \(Inductor found no "
                      r"FlexAttention kernel for this call earlier in this process\)"):
        out2 = longattn.attention(q, k, v, method="window", window=20, backend="flex")
    assert len(calls) == 1 and (out2 - ref).abs().max().item() < 1e-5
    # another window size or shape is still tried
    with pytest.warns(RuntimeWarning, match="failed on this call"):
        longattn.attention(q, k, v, method="window", window=21, backend="flex")
    assert len(calls) == 2
    # how the compiled call recognises the failure inside Inductor's wrapped exceptions
    assert _no_kernel(RuntimeError("LoweringException: NoValidChoicesError: No choices to select"))
    assert not _no_kernel(RuntimeError("CUDA out of memory"))


def test_a_failure_of_the_reference_itself_is_raised(monkeypatch):
    import dataclasses

    from longattn import registry
    from longattn.backends.flex import FlexCompileError

    real = longattn.get_method("window")

    def broken(inputs, config):
        raise FlexCompileError("test")

    monkeypatch.setitem(registry._REGISTRY, "window", dataclasses.replace(real, reference=broken))
    q, k, v = rand_qkv(1, 4, 2, 20, 20, 16, seed=4)
    with pytest.raises(FlexCompileError, match="test"):
        longattn.attention(q, k, v, method="window", window=4, backend="reference")
