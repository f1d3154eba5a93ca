"""Conformance: every registered method, every backend, against the fp32 reference.

Tolerance (DESIGN.md): a backend's error against the reference computed on fp32 copies of
the inputs is at most twice the error of plain PyTorch in the same dtype (the reference's
math run in that dtype) plus a small floor. Forward and backward; T in {1, 63, 1000}, D in
{64, 128}, with and without GQA, fp32 and bf16, queries equal to or shorter than keys.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import pytest
import torch

import longattn
from longattn.backends import plain_precision

from .conftest import poison_device_memory, rand_qkv, stable_seed

# Configs that make every method genuinely sparse at these small lengths (defaults target 32k).
SMALL_CONFIGS = {
    "full": {},
    "window": {"window": 100},
    "sink": {"sink": 4, "window": 60},
    "bigbird": {},
    "topk": {"block_size": 64, "top_k": 4},
    "moba": {"block_size": 128, "top_k": 3},
    "nsa": {"num_selected": 4, "window": 128},
}
FLOOR = {torch.float32: 2e-5, torch.bfloat16: 2e-3, torch.float64: 1e-10}

SHAPES = [  # (Tq, Tk)
    (1, 1),
    (63, 63),
    (1000, 1000),
    (63, 1000),  # chunked prefill: queries at the end
    (1, 1000),  # decoding
]
HEADS = [(4, 4), (4, 2)]  # (H, Hkv): MHA and GQA


def method_backend_cases():
    cases = []
    for name in longattn.list_methods():
        for backend in longattn.get_method(name).all_backends():
            if backend != "reference":
                cases.append((name, backend))
    return cases


def test_every_method_has_a_fast_backend_and_a_test_config():
    for name in longattn.list_methods():
        assert name in SMALL_CONFIGS, f"add a small conformance config for {name!r}"
        assert set(longattn.get_method(name).all_backends()) - {"reference"}, name


def _skip_interpreted_triton(device, backend):
    if backend == "triton" and device == "cpu":
        pytest.skip("on CPU the Triton kernels run interpreted: tests/test_block_sparse_kernel.py "
                    "covers every method there at interpreter sizes; this grid runs them on the GPU")


def _backends_here(name, device):
    """Every backend of ``name``, less the interpreted Triton kernels on CPU (see above)."""
    return [b for b in longattn.get_method(name).all_backends() if not (b == "triton" and device == "cpu")]


def _run(q, k, v, name, backend, causal, config):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = longattn.attention(q, k, v, method=name, backend=backend, causal=causal, **config)
    return out, [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]


def _error(a, b):
    return (a.double() - b.double()).abs().max().item()


# The fp32 reference and the plain same-dtype computation depend on the case, not on the backend
# under test: a worker that runs a case's backends one after another (the usual order: the backend
# is the innermost parameter) computes them once. For fp32 inputs the plain computation is the
# reference itself (both accumulate in fp32), so it is not run twice.
_REFS: OrderedDict = OrderedDict()


def _cached(key, compute):
    if key in _REFS:
        _REFS.move_to_end(key)
        return _REFS[key]
    _REFS[key] = value = compute()
    while len(_REFS) > 8:
        _REFS.popitem(last=False)
    return value


@pytest.mark.parametrize("name,backend", method_backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Tq,Tk", SHAPES, ids=[f"{a}x{b}" for a, b in SHAPES])
def test_forward_matches_reference(device, name, backend, dtype, H, Hkv, D, Tq, Tk):
    _skip_interpreted_triton(device, backend)
    spec = longattn.get_method(name)
    config = SMALL_CONFIGS[name]
    causal_modes = [True, False] if spec.bidirectional and Tq == Tk else [True]
    for i, causal in enumerate(causal_modes):
        q, k, v = rand_qkv(2, H, Hkv, Tq, Tk, D, dtype=dtype, device=device, seed=stable_seed(name, D, Tq, i))

        def references():
            ref = longattn.attention(q.float(), k.float(), v.float(), method=name, backend="reference", causal=causal,
                                     **config)
            if dtype == torch.float32:
                return ref, ref
            with plain_precision():
                return ref, longattn.attention(q, k, v, method=name, backend="reference", causal=causal, **config)

        ref, plain = _cached(("fwd", device, name, dtype, H, Hkv, D, Tq, Tk, causal, i), references)
        poison_device_memory(device)
        out, _ = _run(q, k, v, name, backend, causal, config)
        assert out.shape == q.shape and out.dtype == dtype
        assert torch.isfinite(out).all(), "unwritten or non-finite output elements"
        bound = 2 * _error(plain, ref) + FLOOR[dtype]
        assert _error(out, ref) <= bound, (name, backend, causal, _error(out, ref), bound)


@pytest.mark.parametrize("name,backend", method_backend_cases())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("H,Hkv", HEADS, ids=["mha", "gqa"])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("Tq,Tk", [(1, 1), (63, 63), (1000, 1000), (63, 1000)], ids=["1", "63", "1000", "63x1000"])
def test_backward_matches_reference(device, name, backend, dtype, H, Hkv, D, Tq, Tk):
    _skip_interpreted_triton(device, backend)
    config = SMALL_CONFIGS[name]
    q, k, v = rand_qkv(1, H, Hkv, Tq, Tk, D, dtype=dtype, device=device, seed=D + Tq, requires_grad=True)
    g = torch.randn(q.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)

    def grads(qq, kk, vv, **kw):
        out = longattn.attention(qq, kk, vv, method=name, **config, **kw)
        return torch.autograd.grad(out, (qq, kk, vv), g.to(out.dtype))

    def references():
        q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
        ref = grads(q32, k32, v32, backend="reference")
        if dtype == torch.float32:
            return ref, ref
        with plain_precision():
            return ref, grads(q, k, v, backend="reference")

    ref, plain = _cached(("bwd", device, name, dtype, H, Hkv, D, Tq, Tk), references)
    poison_device_memory(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = grads(q, k, v, backend=backend)
    fell_back = [w for w in caught if "falling back" in str(w.message)]
    if device == "cpu" and backend == "flex":
        # FlexAttention has no CPU backward: the call must say so and fall back, not fail
        assert fell_back, "flex on CPU with autograd must warn and fall back"
    else:
        assert not fell_back, [str(w.message) for w in fell_back]
    for which, f, p, r in zip("qkv", fast, plain, ref):
        assert torch.isfinite(f).all(), f"d{which} has non-finite elements"
        bound = 2 * _error(p, r) + FLOOR[dtype] * max(1.0, r.abs().max().item())
        assert _error(f, r) <= bound, (name, backend, "d" + which, _error(f, r), bound)


@pytest.mark.parametrize("name", [m for m in longattn.list_methods() if longattn.get_method(m).has_lse])
def test_return_lse_matches_reference(device, name):
    """Methods whose output is one softmax (NSA's gated sum is not: test_bad_input checks that
    return_lse=True raises for it)."""
    spec = longattn.get_method(name)
    q, k, v = rand_qkv(1, 4, 2, 200, 300, 64, device=device, seed=3)
    config = SMALL_CONFIGS[name]
    ref_out, ref_lse = longattn.attention(q, k, v, method=name, backend="reference", return_lse=True, **config)
    # an independent LSE from the selection's dense mask (or the plain causal mask for full)
    scores = (q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) / 8.0
    if spec.selector is not None:
        mask = spec.selector(q, k, True, spec.make_config(**config)).to_dense_mask()
        mask = mask.repeat_interleave(4 // mask.shape[1], 1) if mask.shape[1] != 1 else mask
    else:
        mask = torch.arange(300, device=device)[None, :] <= torch.arange(200, device=device)[:, None] + 100
    expected = scores.masked_fill(~mask, float("-inf")).logsumexp(-1)
    assert _error(ref_lse, expected) < 1e-4
    for backend in _backends_here(name, device):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, lse = longattn.attention(q, k, v, method=name, backend=backend, return_lse=True, **config)
        assert lse.shape == (1, 4, 200)
        assert _error(lse, expected) < 1e-4, backend
        assert _error(out, ref_out) < 1e-5, backend


@pytest.mark.parametrize("name", longattn.list_methods())
def test_odd_head_dim(device, name):
    """A head dim that is not a power of two (D = 40), GQA, queries shorter than keys."""
    q, k, v = rand_qkv(2, 4, 2, 100, 257, 40, device=device, seed=13)
    config = SMALL_CONFIGS[name]
    ref = longattn.attention(q, k, v, method=name, backend="reference", **config)
    for backend in _backends_here(name, device):
        out = longattn.attention(q, k, v, method=name, backend=backend, **config)
        assert _error(out, ref) < 1e-5, backend


@pytest.mark.parametrize("name", longattn.list_methods())
def test_defaults_run_at_small_t(device, name):
    """Paper defaults (blocks/windows larger than T) still give the reference's answer."""
    q, k, v = rand_qkv(1, 4, 2, 300, 300, 64, device=device, seed=5)
    ref = longattn.attention(q, k, v, method=name, backend="reference")
    for backend in _backends_here(name, device):
        out = longattn.attention(q, k, v, method=name, backend=backend)
        assert _error(out, ref) < 1e-5, backend
