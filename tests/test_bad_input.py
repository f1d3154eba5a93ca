"""Bad input: one test per case, each checking the error type and that the message names the
argument and what is allowed."""

from __future__ import annotations


import pytest
import torch

import longattn
from longattn.selection import BlockSelection

from .conftest import rand_qkv


def qkv(**kw):
    return rand_qkv(1, 4, 2, 16, 16, 8, **kw)


def test_wrong_rank():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"q must have 4 dims \[B, H, T, D\]"):
        longattn.attention(q[0], k, v)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        longattn.attention(q, k.numpy(), v)


def test_mismatched_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch size differs: q has B=2, k/v have B=1"):
        longattn.attention(torch.cat([q, q]), k, v)


def test_empty_batch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="batch size 0"):
        longattn.attention(q[:0], k[:0], v[:0])


def test_mismatched_kv_lengths():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        longattn.attention(q, k, v[:, :, :8])


def test_mismatched_head_dim():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="head dim differs: q has D=4"):
        longattn.attention(q[..., :4], k, v)


def test_gqa_ratio():
    q, k, v = rand_qkv(1, 4, 3, 16, 16, 8)
    with pytest.raises(ValueError, match=r"H=4 must be a positive multiple of key/value heads Hkv=3"):
        longattn.attention(q, k, v)


def test_queries_longer_than_keys():
    q, k, v = rand_qkv(1, 4, 2, 32, 16, 8)
    with pytest.raises(ValueError, match="queries must be the last positions"):
        longattn.attention(q, k, v)


def test_zero_length():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="sequence lengths must be >= 1"):
        longattn.attention(q[:, :, :0], k[:, :, :0], v[:, :, :0])


def test_t_equals_one_is_valid():
    q, k, v = rand_qkv(1, 4, 2, 1, 1, 8)
    for name in longattn.list_methods():
        out = longattn.attention(q, k, v, method=name)
        # one key: every softmax returns its value; NSA's compressed branch sees no complete
        # block, so its output is (g_selected + g_window) * v
        weight = 2 / 3 if name == "nsa" else 1.0
        assert torch.allclose(out, weight * v.repeat_interleave(2, 1), atol=1e-6), name


def test_integer_dtype():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q has dtype torch.int64; allowed: float16, bfloat16, float32, float64"):
        longattn.attention(q.long(), k.long(), v.long())


def test_dtype_mismatch():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="q, k, v must share one dtype"):
        longattn.attention(q, k.double(), v)


def test_device_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q, k, v must be on one device"):
        longattn.attention(q, k.to("meta"), v)


@pytest.mark.parametrize("scale", [0.0, -1.0, float("nan"), float("inf"), "0.1"])
def test_bad_scale(scale):
    q, k, v = qkv()
    with pytest.raises(ValueError, match="scale must be a finite positive number"):
        longattn.attention(q, k, v, scale=scale)


def test_causal_not_bool():
    q, k, v = qkv()
    with pytest.raises(TypeError, match="causal must be a bool"):
        longattn.attention(q, k, v, causal=1)


def test_unknown_method():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"unknown method 'flash'; allowed: \[.*'moba'.*\]"):
        longattn.attention(q, k, v, method="flash")


def test_unknown_backend():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="unknown backend 'cuda'; allowed: 'auto', 'reference', 'sdpa', 'flex'"):
        longattn.attention(q, k, v, backend="cuda")


def test_backend_the_method_lacks():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"method 'nsa' has no 'sdpa' backend; allowed: \['flex', 'reference', 'triton'\]"):
        longattn.attention(q, k, v, method="nsa", backend="sdpa")


def test_sdpa_of_a_sparse_method_declines_a_mask_too_large_on_cuda():
    # the dense-mask path of a sparse method declines past its memory cap on CUDA (where the
    # kernels serve without a mask), naming the cap; on CPU it serves (the reference would
    # materialise more); return_lse is declined everywhere
    import types

    from longattn.backends import dense

    def inputs(device, T, lse=False):
        q = types.SimpleNamespace(device=torch.device(device), element_size=lambda: 2)
        return types.SimpleNamespace(q=q, batch=1, num_heads=32, q_len=T, kv_len=T, return_lse=lse)

    assert dense.dense_mask_bytes(1, 32, 3300, 3300, 2) < dense.DENSE_MASK_MAX_BYTES < dense.dense_mask_bytes(
        1, 32, 3400, 3400, 2)
    assert dense.sdpa_mask_can_serve(inputs("cuda", 3300)) is None
    reason = dense.sdpa_mask_can_serve(inputs("cuda", 3400))
    assert reason.startswith("the dense token mask of 1x32x3400x3400 pairs would take 1.03 GiB > "
                             "longattn.backends.dense.DENSE_MASK_MAX_BYTES (1.00 GiB)"), reason
    assert dense.sdpa_mask_can_serve(inputs("cpu", 100_000)) is None
    assert "return_lse=True" in dense.sdpa_mask_can_serve(inputs("cpu", 10, lse=True))


def test_sdpa_of_a_sparse_method_with_return_lse_falls_back_with_a_warning():
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match=r"backend 'sdpa' cannot serve this call \(SDPA does not return the "
                      r"log-sum-exp"):
        out, lse = longattn.attention(q, k, v, method="window", backend="sdpa", window=4, return_lse=True)
    ref, ref_lse = longattn.attention(q, k, v, method="window", backend="reference", window=4, return_lse=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)


def test_unknown_config_key():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"method 'window' got unknown config \['windw'\]; allowed: \['block_size', 'window'\]"):
        longattn.attention(q, k, v, method="window", windw=4)


@pytest.mark.parametrize(
    "method,config,field",
    [
        ("window", {"window": 0}, "WindowConfig.window"),
        ("window", {"window": -5}, "WindowConfig.window"),
        ("window", {"block_size": 100}, "WindowConfig.block_size"),
        ("sink", {"sink": 0}, "SinkConfig.sink"),
        ("sink", {"window": 0}, "SinkConfig.window"),
        ("bigbird", {"num_window_blocks": 2}, "BigBirdConfig.num_window_blocks"),
        ("bigbird", {"num_random_blocks": -1}, "BigBirdConfig.num_random_blocks"),
        ("topk", {"top_k": 0}, "TopKConfig.top_k"),
        ("topk", {"block_size": 0}, "TopKConfig.block_size"),
        ("moba", {"top_k": 0}, "MoBAConfig.top_k"),
        ("moba", {"block_size": 256, "gate_block": 512}, "MoBAConfig.gate_block"),
        ("moba", {"block_size": 3.5}, "MoBAConfig.block_size"),
    ],
)
def test_bad_budgets_and_windows(method, config, field):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=field):
        longattn.attention(q, k, v, method=method, **config)


def test_budget_larger_than_t_is_full_not_an_error():
    q, k, v = qkv()
    full = longattn.attention(q, k, v, method="full")
    out = longattn.attention(q, k, v, method="topk", top_k=1000, block_size=16)
    assert torch.allclose(out, full, atol=1e-6)


@pytest.mark.parametrize("deferred", [False, True], ids=["checked-first", "checked-after"])
@pytest.mark.parametrize("method", ["topk", "moba", "nsa"])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_finite_inputs_rejected_by_selecting_methods(method, which, deferred, monkeypatch):
    """Checked before the work (CPU) or read after it is queued (CUDA; forced here): either way
    the call raises, naming the tensor."""
    import longattn.api as api

    monkeypatch.setattr(api, "_defer_finite_check", lambda device: deferred)
    if method not in longattn.list_methods():
        pytest.fail(f"{method} is not registered")
    tensors = dict(zip("qkv", qkv()))
    tensors[which] = tensors[which].clone()
    tensors[which][0, 0, 3, 1] = float("nan")
    with pytest.raises(ValueError, match=f"{which} contains NaN or Inf"):
        longattn.attention(tensors["q"], tensors["k"], tensors["v"], method=method)


def test_deferred_check_reports_non_finite_inputs_over_a_failure_they_caused(monkeypatch):
    """When the check is read after the work and the work itself fails on the bad values, the
    error names the non-finite input, not the failure."""
    import longattn.api as api

    monkeypatch.setattr(api, "_defer_finite_check", lambda device: True)

    def broken(*args, **kwargs):
        raise RuntimeError("kernel failed on NaN")

    monkeypatch.setattr(api, "_run", broken)
    q, k, v = qkv()
    with pytest.raises(RuntimeError, match="kernel failed"):  # finite inputs: the failure itself
        longattn.attention(q, k, v, method="topk")
    k = k.clone()
    k[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="k contains NaN or Inf"):
        longattn.attention(q, k, v, method="topk")


def test_return_lse_on_sdpa_falls_back_with_warning():
    q, k, v = qkv()
    with pytest.warns(RuntimeWarning, match="backend 'sdpa' cannot serve this call .*return_lse"):
        out, lse = longattn.attention(q, k, v, backend="sdpa", return_lse=True)
    ref, ref_lse = longattn.attention(q, k, v, backend="reference", return_lse=True)
    assert torch.allclose(out, ref, atol=1e-6) and torch.allclose(lse, ref_lse, atol=1e-5)


def test_nsa_rejects_bidirectional_and_lse():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="method 'nsa' is causal only"):
        longattn.attention(q, k, v, method="nsa", causal=False)
    with pytest.raises(ValueError, match="method 'nsa' has no single log-sum-exp"):
        longattn.attention(q, k, v, method="nsa", return_lse=True)


# ------------------------------------------------------------------ BlockSelection
def _sel(counts, idx, **kw):
    args = dict(q_block=16, kv_block=16, q_len=32, kv_len=32, num_heads=1)
    args.update(kw)
    return BlockSelection(kv_num_blocks=torch.tensor(counts, dtype=torch.int32), kv_indices=torch.tensor(idx, dtype=torch.int32), **args)


def test_selection_valid():
    sel = _sel([[[1, 2]]], [[[[0, 1], [1, 0]]]])
    assert sel.to_dense_mask().sum().item() == 16 * 16 * 3


def test_selection_count_out_of_range():
    with pytest.raises(ValueError, match=r"kv_num_blocks must lie in \[0, 2\]"):
        _sel([[[1, 3]]], [[[[0, 1], [1, 0]]]])


def test_selection_index_out_of_range():
    with pytest.raises(ValueError, match=r"kv_indices must lie in \[0, 2\)"):
        _sel([[[1, 2]]], [[[[0, 1], [1, 2]]]])


def test_selection_duplicate_index():
    with pytest.raises(ValueError, match="repeats a key block"):
        _sel([[[1, 2]]], [[[[0, 1], [1, 1]]]])


def test_selection_wrong_number_of_query_blocks():
    with pytest.raises(ValueError, match="needs 2"):
        _sel([[[1]]], [[[[0, 1]]]])


def test_selection_bad_block_size():
    with pytest.raises(ValueError, match="BlockSelection.q_block must be a positive int"):
        _sel([[[1, 2]]], [[[[0, 1], [1, 0]]]], q_block=0)


def test_selection_bad_heads():
    with pytest.raises(ValueError, match="head axis has 3 entries"):
        BlockSelection(
            kv_num_blocks=torch.ones(1, 3, 2, dtype=torch.int32),
            kv_indices=torch.zeros(1, 3, 2, 1, dtype=torch.int32),
            q_block=16, kv_block=16, q_len=32, kv_len=32, num_heads=4,
        )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_nonfinite_check_finds_every_nan_and_infinity(dtype):
    """The one-pass check (aminmax) against torch.isfinite, position by position: NaN, +inf and
    -inf anywhere are found; the largest finite values and an empty tensor are fine."""
    from longattn.api import _nonfinite_flag

    x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert not _nonfinite_flag(x)
    for val in (float("nan"), float("inf"), float("-inf")):
        for i in range(x.numel()):
            y = x.clone()
            y.view(-1)[i] = val
            assert bool(_nonfinite_flag(y)) == (not torch.isfinite(y).all().item()) is True, (val, i)
    assert not _nonfinite_flag(torch.full((4,), torch.finfo(dtype).max, dtype=dtype))
    assert not _nonfinite_flag(torch.full((4,), torch.finfo(dtype).min, dtype=dtype))
    assert not _nonfinite_flag(x[:0])
